"""KV cache sizes in bytes, derived from the model's shape, never from the host's memory.

vLLM on CPU sizes its KV cache as ``gpu_memory_utilization x (the NUMA node's total memory)``
minus what the engine process already holds. The same fraction means 0.7 GiB on a 2-core CI
box, 50 GiB on a 1-TiB host, and a negative budget the moment the process grows past it. So on
CPU we always pass ``kv_cache_memory_bytes`` (vLLM then ignores the fraction): either the size
the user asked for, or one derived here from what the engine can actually use — ``max_num_seqs``
sequences of ``max_model_len`` tokens at the model's per-token KV size, with headroom, capped.
On GPU the fraction stays the default (vLLM measures the device there) unless a size is set.

Pure: reads a model's ``config.json`` (local or s3://) and ``/sys`` meminfo, nothing else.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass

from pydantic import Field

from cluster.config import StrictModel
from cluster.errors import UserError
from cluster.model_refs import read_model_file

GIB = 1 << 30
MIB = 1 << 20
HEADROOM = 1.2
# A derived size never exceeds this (one full sequence is always allowed): vLLM then simply runs
# fewer sequences at once, where an uncapped product (16 x 32k tokens x 57 KB) would ask for 30 GB.
DEFAULT_CAP_BYTES = 4 * GIB
MIN_BYTES = 16 * MIB
# What an engine process holds besides weights and KV (runtime, buffers): ~0.8 GiB measured here.
ENGINE_OVERHEAD_BYTES = 1 * GIB
_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float8_e4m3fn": 1}


class EngineMemory(StrictModel):
    """The settings every vLLM engine config shares (generation's pool, serving's replicas): memory and
    where an engine may be placed."""

    memory_utilization: float = Field(
        0.9, gt=0.0, le=0.95,
        description="vLLM gpu_memory_utilization on GPU: the device share for weights, activations and KV (vLLM's "
                    "default). Not used on CPU, where the KV cache is sized in bytes (kv_cache_gib).",
    )
    kv_cache_gib: float | None = Field(
        None, gt=0.0,
        description="KV cache per engine in GiB (vLLM kv_cache_memory_bytes). Default on CPU: derived from the "
                    "model's per-token KV size x max_model_len x the sequences one engine runs at once, with "
                    "headroom (README: Engine memory); on GPU: unset uses memory_utilization.",
    )
    bundle_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each engine bundle asks for besides its CPU/GPU. A CPU cluster whose "
                    "worker nodes each advertise one unit (ray start --resources '{\"vllm\": 1}', or rayStartParams "
                    "on KubeRay) gets at most one engine per node with {vllm: 1}; GPUs already do that by count.",
    )


class KVCacheDoesNotFit(UserError):
    """The requested KV cache is larger than the memory the engine's node has free."""


def kv_bytes_per_token(hf_config: dict) -> int:
    """K and V for every layer: 2 x layers x kv_heads x head_dim x dtype bytes."""
    cfg = {**hf_config, **hf_config.get("text_config", {})}
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")
    return 2 * layers * kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 4)


def model_max_len(hf_config: dict) -> int:
    cfg = {**hf_config, **hf_config.get("text_config", {})}
    return int(cfg.get("max_position_embeddings") or 2048)


def derived_kv_cache_bytes(hf_config: dict, max_model_len: int | None, max_num_seqs: int,
                           cap_bytes: int = DEFAULT_CAP_BYTES) -> int:
    """Room for ``max_num_seqs`` full sequences with headroom, capped, but never below one sequence."""
    per_token = kv_bytes_per_token(hf_config)
    length = max_model_len or model_max_len(hf_config)
    one_sequence = math.ceil(length * per_token * HEADROOM)
    wanted = max(one_sequence * max_num_seqs, MIN_BYTES)
    size = max(min(wanted, cap_bytes), one_sequence)
    return math.ceil(size / MIB) * MIB


def read_model_config(model_dir: str) -> dict:
    """``config.json`` of a local or s3:// model directory."""
    data = read_model_file(model_dir, "config.json")
    if data is None:
        raise UserError(f"{model_dir}: no config.json (is it a Hugging Face model directory?)")
    return json.loads(data)


@dataclass(frozen=True)
class KVCacheSize:
    bytes: int
    derived: bool
    how: str  # one line saying where the number came from, for logs and `config show`

    @property
    def gib(self) -> float:
        return self.bytes / GIB


def resolve_kv_cache(kv_cache_gib: float | None, model_dir: str | None, max_model_len: int | None,
                     max_num_seqs: int) -> KVCacheSize:
    """The explicit size, or the one derived from the model at ``model_dir``."""
    if kv_cache_gib is not None:
        return KVCacheSize(int(kv_cache_gib * GIB), False, f"{kv_cache_gib:g} GiB as configured")
    if model_dir is None:
        raise ValueError("model_dir is needed to derive the KV cache size")
    hf = read_model_config(model_dir)
    size = derived_kv_cache_bytes(hf, max_model_len, max_num_seqs)
    length = max_model_len or model_max_len(hf)
    how = (f"derived: {max_num_seqs} seqs x {length} tokens x {kv_bytes_per_token(hf)} B/token "
           f"x {HEADROOM}, capped at {DEFAULT_CAP_BYTES // GIB} GiB")
    return KVCacheSize(size, True, how)


def node_available_bytes(node: int = 0) -> int:
    """Free memory of NUMA node ``node`` as vLLM's CPU worker counts it (free + file cache +
    reclaimable slab), clamped to the cgroup's limit; the whole host where there are no nodes."""
    path = f"/sys/devices/system/node/node{node}/meminfo"
    fields: dict[str, int] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.split()
                fields[parts[2].rstrip(":")] = int(parts[3]) * 1024
        available = sum(fields.get(k, 0) for k in ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable"))
    else:
        import psutil

        available = psutil.virtual_memory().available
    limit = _read_int("/sys/fs/cgroup/memory.max")
    usage = _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and usage is not None:
        available = min(available, max(0, limit - usage))
    return available


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def fits_bytes(available_bytes: int, weights_bytes: int, engines: int = 1) -> int:
    """The largest KV size per engine that ``engines`` engines can each get on the node."""
    return max(0, (available_bytes - engines * (weights_bytes + ENGINE_OVERHEAD_BYTES)) // max(1, engines))


def check_fits(requested: KVCacheSize, setting: str, available_bytes: int, weights_bytes: int,
               engines: int = 1) -> None:
    """Raise ``KVCacheDoesNotFit`` with one line naming ``setting`` and the size that would fit."""
    fit = fits_bytes(available_bytes, weights_bytes, engines)
    if requested.bytes <= fit:
        return
    raise KVCacheDoesNotFit(
        f"{setting}: {_gib(requested.bytes)} GiB of KV cache ({requested.how}) x {engines} engine(s) does not fit: "
        f"the node has {_gib(available_bytes)} GiB free and each engine also needs {_gib(weights_bytes)} GiB of "
        f"weights + {_gib(ENGINE_OVERHEAD_BYTES)} GiB; set {setting} to at most {_floor_gib(fit)} "
        f"(e.g. --set {setting}={_floor_gib(fit)})"
    )


_VLLM_KV_FAILURE = re.compile(
    r"Available memory on node \d+ \((?P<avail>[\d.]+)/(?P<total>[\d.]+) GiB\) on (?:kv cache allocation|startup)"
    r" is less than (?:requested memory for kv|desired CPU memory utilization) \((?P<asked>[^)]*)\)"
)


def explain_engine_failure(text: str, setting: str) -> str | None:
    """One line for vLLM's CPU "not enough memory for the KV cache" failure found in ``text``
    (an exception's message, however deeply Ray wrapped it), or None when it is not that."""
    m = _VLLM_KV_FAILURE.search(text)
    if not m:
        return None
    avail = float(m.group("avail"))
    fit = max(0.0, avail - ENGINE_OVERHEAD_BYTES / GIB)
    return (f"{setting}: the engine could not allocate its KV cache ({m.group('asked').strip()} GiB asked; "
            f"its node has {avail:.2f} of {float(m.group('total')):.2f} GiB free); set {setting} to at most "
            f"{math.floor(fit * 100) / 100:g} (e.g. --set {setting}={math.floor(fit * 100) / 100:g})")


def weights_bytes(model_dir: str) -> int:
    """Size of a local model's weight files (0 for remote models: the check then counts KV only)."""
    if not os.path.isdir(model_dir):
        return 0
    return sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
               if f.endswith((".safetensors", ".bin", ".pt")))


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _floor_gib(n: int) -> str:
    return f"{math.floor(n / GIB * 100) / 100:g}"


def preflight(kv: KVCacheSize | None, setting: str, model_dir: str, engines: int = 1) -> None:
    """Before an engine starts on this node: the KV size must fit in what the node has free."""
    if kv is not None:
        check_fits(kv, setting, node_available_bytes(), weights_bytes(model_dir), engines)


@contextmanager
def engine_failures_explained(setting: str):
    """Turn vLLM's KV-cache allocation failure, wrapped in whatever Ray raised, into one line."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        line = explain_engine_failure(_chain_text(e), setting)
        if line is None:
            raise
        raise KVCacheDoesNotFit(line) from None


def _chain_text(e: BaseException) -> str:
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)
