"""Teacher diagnostics on the tiny demo world's shards (issue #21 item 4): what the generation
manifest would carry, from the shards' committed statistics, checked against the rows' own arrays."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.slow  # builds the tiny world (about a minute)
def test_diagnostics_of_the_tiny_worlds_stored_topk(xtok_world):
    from datasets_pipeline.diagnostics import position_measures, summarize
    from datasets_pipeline.shards import ShardStore

    store = ShardStore(str(xtok_world / "generated"))
    diag = summarize(store.committed_stats())
    table = store.read_samples(["split", "topk_k", "topk_logprobs", "teacher_token_ids"])
    k = table["topk_k"][0].as_py()
    flat = np.concatenate([np.asarray(v, np.float32) for v in table["topk_logprobs"].to_pylist()])
    entropy, top1 = position_measures(flat, k)
    assert diag["positions"] == sum(len(t) for t in table["teacher_token_ids"].to_pylist()) == entropy.size
    assert diag["mean_entropy"] == pytest.approx(entropy.mean(), rel=1e-6)
    assert diag["mean_top1"] == pytest.approx(top1.mean(), rel=1e-6)
    assert diag["near_one_hot_share"] == pytest.approx((top1 >= 0.99).mean())
    assert set(diag["per_split"]) == {"train", "val"}
    print(f"tiny world teacher: {diag['positions']} positions, mean entropy {diag['mean_entropy']:.3f} nats, "
          f"mean top-1 {diag['mean_top1']:.3f}, near one-hot {diag['near_one_hot_share']:.1%}")
