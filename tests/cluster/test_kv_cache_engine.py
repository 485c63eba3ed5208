"""The guard against host-sized KV caches (#13), with a real vLLM CPU engine and the real CLI.

A KV cache larger than the node's free memory must end in one line naming the setting and a
size that fits: before anything starts when the engine runs on this node (the preflight), and
from the engine's own failure when it runs elsewhere (the translation of vLLM's message).
"""

import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from cluster.kv_cache import GIB, explain_engine_failure, node_available_bytes

pytestmark = pytest.mark.slow


def _too_big_gib() -> float:
    return round(node_available_bytes() / GIB + 64, 1)


def test_engine_failure_on_a_too_large_kv_cache_becomes_one_line(tiny_world):
    """Starts vLLM with the engine arguments generation builds, asking for more KV than the node has."""
    from datasets_pipeline.config import GenerationConfig
    from datasets_pipeline.engine import kv_cache_size, processor_kwargs

    cfg = GenerationConfig(teacher=str(tiny_world.teacher), input={"path": "x.jsonl"}, output="out",
                           engine={"batch_size": 4, "max_model_len": 128, "kv_cache_gib": _too_big_gib()})
    kv = kv_cache_size(cfg, str(tiny_world.teacher))
    engine = processor_kwargs(cfg, str(tiny_world.teacher), kv.bytes)["engine_kwargs"]
    script = textwrap.dedent(f"""
        import json
        from vllm import LLM
        if __name__ == "__main__":
            LLM(model={str(tiny_world.teacher)!r}, **json.loads({json.dumps(json.dumps(engine))}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    line = explain_engine_failure(proc.stdout + proc.stderr, "generation.engine.kv_cache_gib")
    assert line is not None, (proc.stdout + proc.stderr)[-3000:]
    assert "\n" not in line and "--set generation.engine.kv_cache_gib=" in line


def test_cli_refuses_a_kv_cache_that_does_not_fit_before_starting_ray(tiny_world, tmp_path):
    cfg = {"name": "kv", "generation": {"teacher": str(tiny_world.teacher), "input": {"path": str(tiny_world.train_jsonl)},
                                        "output": str(tmp_path / "gen"), "engine": {"max_model_len": 128}},
           "distillation": {"student": str(tiny_world.student), "output": str(tmp_path / "distill")}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "rayjobs.cli", "generate", str(path),
                           "--set", f"generation.engine.kv_cache_gib={_too_big_gib()}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: generation.engine.kv_cache_gib:"), proc.stderr[-3000:]
    assert "at most" in lines[0]
    assert not (tmp_path / "gen").exists()
