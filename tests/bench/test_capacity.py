"""bench/capacity.py's arithmetic on a case small enough to do by hand, and its CLI's JSON line.

The calculator is what an operator sizes a cluster with, so a wrong factor would go unnoticed until
the bill: every figure below was worked out on paper from the formulas in docs/CAPACITY.md.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("capacity", ROOT / "bench" / "capacity.py")
cap = importlib.util.module_from_spec(_spec)
sys.modules["capacity"] = cap  # dataclasses look their module up while the class is built
_spec.loader.exec_module(cap)

# Round numbers: 1 PFLOP/s, 1 TB/s, 100 GB; every efficiency 1 except the MFU.
GPU = cap.Gpu(peak_flops=1e15, hbm_bytes_per_s=1e12, memory_bytes=100e9, source="test")
TEACHER = cap.Model(params=1e9, layers=10, hidden=1000, kv_heads=2, head_dim=100)  # KV 8,000 B/token
STUDENT = cap.Model(params=1e8, layers=4, hidden=500, kv_heads=1, head_dim=100)
S = cap.Settings(mfu=0.5, bw_efficiency=1.0, decode_compute_efficiency=1.0, memory_utilization=1.0,
                 max_batch=64, min_step_ms=0.0, gpus_per_node=8, cpu_cores_per_gpu=2.0, target_hours=1.0,
                 pipeline_cpu_us_per_token=100.0, pipeline_vs_direct_cpu=0.5, ray_train_vs_plain=1.0,
                 serve_vs_bare=0.5, topk_bytes_per_token=100.0)
WORK = {"prompts": 1000, "tokens_per_sample": 300, "prompt_tokens": 100, "generated_tokens": 200,
        "epochs": 2, "oversample": 1.0}


def test_decode_step_is_weights_plus_kv_over_bandwidth():
    # mean context 100 + 200/2 = 200; the KV budget (98 GB) holds 61,250 such sequences, capped at 64;
    # a step reads 2 GB of weights + 64 x 200 x 8,000 B of KV = 2.1024 GB at 1 TB/s = 2.1024 ms
    # (compute: 64 x (2e9 + 2·10·200·1000) FLOPs = 0.128 ms, below it).
    assert TEACHER.kv_bytes_per_token() == 8000
    e = cap.decode(TEACHER, GPU, S, 100, 200)
    assert (e["gpus"], e["batch"], e["bound"]) == (1, 64, "memory")
    assert e["step_ms"] == pytest.approx(2.1024)
    assert e["tokens_per_s"] == pytest.approx(64 / 2.1024e-3)


def test_moe_reads_only_the_experts_a_small_batch_touches():
    moe = cap.Model(params=1e10, layers=10, hidden=1000, kv_heads=2, head_dim=100, active_params=1e9)
    one = cap.Settings(**{**S.__dict__, "max_batch": 2})
    # batch 2 touches at most 2 x 1e9 of the 1e10 parameters: 4 GB + 2 x 200 x 8,000 B of KV
    assert cap.decode(moe, GPU, one, 100, 200)["step_ms"] == pytest.approx((4e9 + 3.2e6) / 1e12 * 1e3)


def test_generation_hours_prefill_and_pipeline_cores():
    g = cap.generation(TEACHER, GPU, S, WORK)
    # decode: 200,000 tokens / 64 per step x 2.1024 ms = 6.57 s; prefill: 1000 x 100 tokens x
    # (2e9 + 2·10·100·1000) FLOPs at 0.5 PFLOP/s = 0.4004 s
    assert g["engine_gpu_hours"] == pytest.approx((6.57 + 0.4004) / 3600)
    # our pipeline: 100 µs x 30,441 tok/s = 3.044 cores per GPU, one spare (2 minus the engine's):
    # throughput x 1/3.044
    cores = 1e-4 * 64 / 2.1024e-3
    assert g["cpu_cores_per_gpu"] == pytest.approx(cores)
    assert g["gpu_hours"] == pytest.approx((6.57 + 0.4004) / 3600 * cores)
    assert g["gpu_hours_at_cpu_ratio"] == pytest.approx((6.57 + 0.4004) / 3600 / 0.5)
    assert g["topk_storage_gb"] == pytest.approx(1000 * 200 * 100 / 1e9)
    assert (g["replicas"], g["gpus"], g["nodes"]) == (1, 1, 1)


def test_distillation_flops_stored_and_online_teacher():
    # 1000 samples x 300 tokens x 2 epochs = 6e5 tokens; student 3 x (2e8 + 2·4·300·500) per token
    d = cap.distillation(STUDENT, TEACHER, GPU, S, WORK, online=False)
    assert d["tokens"] == 6e5
    assert d["student_flops"] == pytest.approx(3 * 2.012e8 * 6e5)
    assert d["teacher_flops"] == 0
    assert d["gpu_hours"] == pytest.approx(3 * 2.012e8 * 6e5 / 0.5e15 / 3600)
    assert d["min_gpus"] == 1  # 16 B x 1e8 = 1.6 GB in 50 GB
    online = cap.distillation(STUDENT, TEACHER, GPU, S, WORK, online=True)
    assert online["teacher_flops"] == pytest.approx((2e9 + 2 * 10 * 300 * 1000) * 6e5)
    assert online["min_gpus"] == 2  # plus the teacher's own replica


def test_serving_applies_our_serve_ratio():
    s = cap.serving(STUDENT, GPU, S, WORK)
    assert s["tokens_per_s_per_replica"] == pytest.approx(s["engine"]["tokens_per_s"] * 0.5)


def test_r1_example_shapes():
    # MLA: one 576-wide bf16 latent per layer x 61 layers; 671 GB of FP8 weights fit one H200
    # node (8 x 141 GB x 0.9) but need two H100 nodes
    r = cap.estimate(cap.parse_args(["--gpu", "h200"]))
    assert cap.model_from(cap.parse_args([]), "teacher").kv_bytes_per_token() == 61 * 576 * 2
    assert r["figures"]["generation_replica_gpus"] == 8
    assert r["figures"]["estimate_over_reference"] is not None
    assert cap.estimate(cap.parse_args([]))["figures"]["generation_replica_gpus"] == 16


@pytest.mark.parametrize("example", ["r1-7b", "demo"])
def test_cli_prints_table_and_json_line(example):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "capacity.py"), "--example", example],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    lines = out.strip().splitlines()
    figures = json.loads(lines[-1])
    for key in ("generation_gpu_hours", "distillation_gpu_hours", "nodes", "cpu_cores_per_gpu_for_pipeline",
                "serving_tokens_per_s_per_replica"):
        assert figures[key] > 0
    assert any(line.startswith("generation ") for line in lines[:-1])
