import numpy as np

from datasets_pipeline.topk import PAD_ID, compact_topk, expand_topk


def test_keeps_exactly_k_sorted_and_pads():
    per_token = [
        {5: {"logprob": -0.1}, 9: {"logprob": -3.0}, 2: {"logprob": -1.0}},  # k+1 entries
        {"7": {"logprob": -0.5}},  # keys may arrive as strings after Arrow
    ]
    ids, lps = compact_topk(per_token, 2)
    assert ids.dtype == np.int32 and lps.dtype == np.float16
    e_ids, e_lps = expand_topk(ids, lps, 2)
    assert e_ids.tolist() == [[5, 2], [7, PAD_ID]]
    assert np.allclose(e_lps[0], [-0.1, -1.0], atol=1e-2) and np.isneginf(e_lps[1, 1])


def test_off_is_empty():
    ids, lps = compact_topk([{1: {"logprob": 0.0}}], 0)
    assert ids.size == 0 and lps.size == 0


def test_six_bytes_per_entry():
    per_token = [{i: {"logprob": -float(i)} for i in range(20)} for _ in range(10)]
    ids, lps = compact_topk(per_token, 20)
    assert (ids.nbytes + lps.nbytes) / 10 == 6 * 20
