"""KV cache sizing in bytes: pure arithmetic and the one-line errors, no engine started."""

import json

import pytest

from cluster.errors import UserError
from cluster.kv_cache import (
    DEFAULT_CAP_BYTES,
    GIB,
    KVCacheDoesNotFit,
    check_fits,
    derived_kv_cache_bytes,
    engine_failures_explained,
    explain_engine_failure,
    kv_bytes_per_token,
    node_available_bytes,
    resolve_kv_cache,
)

QWEN25_7B = {"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_size": 3584,
             "max_position_embeddings": 32768, "torch_dtype": "bfloat16"}

# What vLLM CPU 0.32 raised in the fresh-clone failure (#13), verbatim.
VLLM_FRACTION_FAILURE = (
    "ValueError: Available memory on node 0 (9.32/14.46 GiB) on kv cache allocation is less than requested "
    "memory for kv (-0.06/0.72 GiB). Reduce CPU memory used by other processes.")


def test_per_token_size_of_a_real_shape():
    # 2 (K, V) x 28 layers x 4 KV heads x 128 head dim x 2 bytes
    assert kv_bytes_per_token(QWEN25_7B) == 57344
    assert kv_bytes_per_token({**QWEN25_7B, "head_dim": 64}) == 28672
    assert kv_bytes_per_token({"text_config": QWEN25_7B}) == 57344


def test_derived_size_is_capped_but_holds_one_sequence():
    small = derived_kv_cache_bytes(QWEN25_7B, 1024, 4)
    assert 4 * 1024 * 57344 <= small < 2 * 4 * 1024 * 57344
    assert derived_kv_cache_bytes(QWEN25_7B, None, 16) == DEFAULT_CAP_BYTES  # 16 x 32k would be ~30 GB
    huge_context = {**QWEN25_7B, "max_position_embeddings": 131072}
    assert derived_kv_cache_bytes(huge_context, None, 1) >= 131072 * 57344  # one sequence beats the cap


def test_derived_size_does_not_depend_on_the_host(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B))
    a = resolve_kv_cache(None, str(tmp_path), 2048, 8)
    monkeypatch.setattr("psutil.virtual_memory", lambda: (_ for _ in ()).throw(AssertionError("read host memory")))
    assert resolve_kv_cache(None, str(tmp_path), 2048, 8) == a
    assert resolve_kv_cache(1.5, None, None, 8).bytes == int(1.5 * GIB)


def test_missing_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_kv_cache(None, str(tmp_path), 128, 1)


def test_check_fits_names_the_setting_and_the_size_that_fits():
    kv = resolve_kv_cache(8.0, None, None, 1)
    check_fits(kv, "serving.kv_cache_gib", available_bytes=20 * GIB, weights_bytes=GIB)
    with pytest.raises(KVCacheDoesNotFit) as e:
        check_fits(kv, "serving.kv_cache_gib", available_bytes=6 * GIB, weights_bytes=GIB)
    msg = str(e.value)
    assert "\n" not in msg and "serving.kv_cache_gib" in msg and "at most 4" in msg
    with pytest.raises(KVCacheDoesNotFit, match="at most 2.5"):
        check_fits(kv, "x", available_bytes=9 * GIB, weights_bytes=GIB, engines=2)


def test_node_memory_is_read_like_vllm():
    assert node_available_bytes() > 0


def test_vllm_failures_become_one_line():
    line = explain_engine_failure("RuntimeError: Deploying application raystill failed\n" + VLLM_FRACTION_FAILURE,
                                  "serving.kv_cache_gib")
    assert line and "\n" not in line and "serving.kv_cache_gib" in line and "9.32" in line
    assert explain_engine_failure("ValueError: something else", "x") is None


def test_engine_failures_explained_keeps_other_errors():
    with pytest.raises(KVCacheDoesNotFit, match="generation.engine.kv_cache_gib"):
        with engine_failures_explained("generation.engine.kv_cache_gib"):
            try:
                raise ValueError(VLLM_FRACTION_FAILURE)
            except ValueError as inner:
                raise RuntimeError("actor died") from inner
    with pytest.raises(RuntimeError, match="unrelated"):
        with engine_failures_explained("x"):
            raise RuntimeError("unrelated")
