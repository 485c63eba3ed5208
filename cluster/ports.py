"""Free TCP ports that stay free until something listens on them.

A port found by binding to port 0 comes from the kernel's ephemeral range, the same range
every outgoing connection and every other ``bind(0)`` draws from. When minutes pass between
choosing a port and listening on it (a pipeline picks Serve's and HAProxy's ports before
generating and training), Ray's own gRPC connections, torch's rendezvous or any client can
take it in between: HAProxy then fails with "Address already in use". Ports below the
ephemeral range and above Ray's worker ports (10002-19999 by default) are only ever taken by
someone who names them.
"""

from __future__ import annotations

import random
import socket

_RAY_WORKER_PORTS_END = 20000
_DEFAULT_EPHEMERAL_START = 32768


def ephemeral_start(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    """First port of the kernel's ephemeral range (Linux's default where it cannot be read)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _DEFAULT_EPHEMERAL_START


def is_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(rng: random.Random | None = None) -> int:
    """A port free now on every interface, outside the ephemeral range where that leaves room."""
    low, high = _RAY_WORKER_PORTS_END, ephemeral_start()
    if high - low >= 1000:
        rng = rng or random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(low, high)
            if is_free(port):
                return port
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]
