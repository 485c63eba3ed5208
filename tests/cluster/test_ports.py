import random
import socket

from cluster.ports import ephemeral_start, free_port, is_free


def test_ports_come_from_below_the_ephemeral_range_and_above_rays_worker_ports():
    rng = random.Random(0)
    ports = {free_port(rng) for _ in range(20)}
    assert all(20000 <= p < ephemeral_start() for p in ports)


def test_a_listening_port_is_not_free():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        assert not is_free(s.getsockname()[1])


def test_a_taken_port_is_skipped():
    first = free_port(random.Random(1))
    with socket.socket() as s:
        s.bind(("0.0.0.0", first))
        s.listen()
        assert free_port(random.Random(1)) != first


def test_the_range_falls_back_to_linux_default_when_unreadable(tmp_path):
    assert ephemeral_start(str(tmp_path / "missing")) == 32768
    (tmp_path / "range").write_text("40000\t60999\n")
    assert ephemeral_start(str(tmp_path / "range")) == 40000
