"""The array path from vLLM to the shard (#20): flat top-k, Arrow blocks <-> rows, the engine pool's settings."""

import numpy as np
import pytest
import pyarrow as pa

from datasets_pipeline import records as R
from datasets_pipeline.config import GenerationConfig
from datasets_pipeline.engine import engine_request_params, engine_stage_kwargs, sampling_params, scoring_params
from datasets_pipeline.stages import compact_scored_output
from datasets_pipeline.topk import compact_topk, topk_from_flat


def _positions(rng, T, k, vocab=50):
    """Per position: vLLM's sampled token first, then the top k by rank (the sampled one may repeat)."""
    out = []
    for _ in range(T):
        ids = rng.choice(vocab, k, replace=False)
        lps = np.sort(rng.uniform(-9, 0, k))[::-1]
        sampled = int(rng.choice(ids)) if rng.random() < 0.7 else int(rng.integers(vocab, 2 * vocab))
        out.append(([sampled, *ids.tolist()], [float(rng.uniform(-12, -9)) if sampled >= vocab else
                                              float(lps[list(ids).index(sampled)]), *lps.tolist()]))
    return out


def _both_forms(positions, k, prompt=False):
    """vLLM's flat container and the per-position dicts of the same logprobs (prompt: None first)."""
    from vllm.logprobs import append_logprobs_for_next_position, create_prompt_logprobs, create_sample_logprobs

    flat = create_prompt_logprobs(True) if prompt else create_sample_logprobs(True)
    dicts = [None] if prompt else []
    for ids, lps in positions:
        append_logprobs_for_next_position(flat, ids, lps, [None] * len(ids), 1, k)
        dicts.append({t: {"logprob": lp} for t, lp in zip(ids, lps)})
    return flat, dicts


def test_flat_logprobs_give_the_same_arrays_as_the_dict_form():
    rng = np.random.default_rng(0)
    k = 5
    flat, dicts = _both_forms(_positions(rng, 7, k), k)
    got, want = topk_from_flat(flat, k), compact_topk(dicts, k)
    assert got[0].dtype == np.int32 and got[1].dtype == np.float16
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    # The dict form (a vLLM without flat logprobs) and "off" take compact_topk's path.
    assert all(np.array_equal(a, b) for a, b in zip(topk_from_flat(dicts, k), want))
    assert topk_from_flat(None, k)[0].size == 0 and topk_from_flat(flat, 0)[0].size == 0


def test_scored_response_slice_is_the_same_from_flat_and_dict_prompt_logprobs():
    """Scoring: the response's positions of the prompt logprobs (the first position is None)."""
    rng = np.random.default_rng(2)
    k, start = 3, 4
    flat, dicts = _both_forms(_positions(rng, 9, k), k, prompt=True)
    request = {"prompt_id": "p", "sample_id": "p/0", "sample_index": 0, "split": "train", "messages": "[]",
               "reference": None, "response": "r", "response_tokens": list(range(6)), "response_start": start}
    got = compact_scored_output({**request, "prompt_logprobs": flat}, k)
    want = compact_scored_output({**request, "prompt_logprobs": dicts}, k)
    assert got["topk_ids"].size == 6 * k
    assert np.array_equal(got["topk_ids"], want["topk_ids"]) and np.array_equal(got["topk_logprobs"], want["topk_logprobs"])
    # The whole container, None position included, falls back to the per-position path.
    assert np.array_equal(topk_from_flat(flat, k)[0], compact_topk(dicts, k)[0])


def test_rows_table_equals_from_pylist_and_table_rows_inverts_it_on_slices():
    rng = np.random.default_rng(1)
    schema = pa.schema([pa.field("sample_id", pa.string()), pa.field("topk_ids", pa.list_(pa.int32())),
                        pa.field("topk_logprobs", pa.list_(pa.float16())), pa.field("verified", pa.bool_())])
    rows = [{"sample_id": f"p{i}/0", "topk_ids": rng.integers(0, 99, 3 * i).astype(np.int32),
             "topk_logprobs": rng.uniform(-5, 0, 3 * i).astype(np.float16), "verified": None if i % 2 else True}
            for i in range(6)]
    rows[2]["topk_ids"] = list(map(int, rows[2]["topk_ids"]))  # Python lists are accepted too
    table = R.rows_table(rows, schema)
    assert table.equals(pa.Table.from_pylist(rows, schema=schema))
    back = list(R.table_rows(table.slice(2, 3)))
    assert [r["sample_id"] for r in back] == ["p2/0", "p3/0", "p4/0"]
    assert isinstance(back[1]["topk_ids"], np.ndarray) and back[1]["topk_ids"].dtype == np.int32
    assert R.rows_table(back, schema).equals(table.slice(2, 3))


def _cfg(**engine):
    return GenerationConfig(teacher="t", input={"path": "in.jsonl"}, output="out",
                            sampling={"logprobs_topk": 8}, engine=engine)


def test_engine_pool_keeps_the_processor_settings():
    cpu = engine_stage_kwargs(_cfg(min_replicas=1, max_replicas=3), "/m", 1 << 20)
    assert cpu["actor"] == {"num_cpus": 1, "num_gpus": 0} and cpu["placement_group"] is None
    assert cpu["replicas"] == (1, 3)
    assert cpu["engine_kwargs"]["kv_cache_memory_bytes"] == 1 << 20
    assert cpu["engine_kwargs"]["distributed_executor_backend"] == "uni"
    assert cpu["engine_kwargs"]["max_num_seqs"] == 64 and cpu["engine_kwargs"]["load_format"] == "safetensors"
    spread = engine_stage_kwargs(_cfg(min_replicas=2, max_replicas=2, bundle_resources={"vllm": 1}), "/m")
    assert spread["actor"] == {"num_cpus": 1, "num_gpus": 0, "resources": {"vllm": 1}} and spread["replicas"] == (2, 2)
    gpu = engine_stage_kwargs(_cfg(accelerator="gpu", accelerator_type="A10G"), "/m")
    assert gpu["actor"] == {"num_cpus": 1, "num_gpus": 1, "accelerator_type": "A10G"}
    tp = engine_stage_kwargs(_cfg(accelerator="gpu", tensor_parallel_size=2, accelerator_type="A10G"), "/m")
    assert tp["actor"] == {"num_cpus": 0, "num_gpus": 0}
    assert tp["placement_group"]["bundles"] == [{"GPU": 1, "CPU": 1, "accelerator_type:A10G": 0.001}] * 2
    assert tp["engine_kwargs"]["distributed_executor_backend"] == "ray"


def test_requests_keep_their_params_and_the_engine_adds_flat_undecoded_logprobs():
    gen = engine_request_params(sampling_params(_cfg()))
    assert gen["logprobs"] == 8 and gen["flat_logprobs"] and not gen["detokenize"]
    score = engine_request_params(scoring_params(_cfg()))
    assert score["prompt_logprobs"] == 8 and score["flat_logprobs"] and score["max_tokens"] == 1


def test_rows_table_names_the_fields_a_row_lacks():
    schema = pa.schema([pa.field("sample_id", pa.string()), pa.field("topk_ids", pa.list_(pa.int32()))])
    with pytest.raises(ValueError, match=r"\['topk_ids'\]"):
        R.rows_table([{"sample_id": "p0/0"}], schema)
