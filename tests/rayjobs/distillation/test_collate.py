"""Collation: shifted labels, teacher top-k alignment, packing. Pure, no engines."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rayjobs.distillation.collate import (
    IGNORE_INDEX,
    CollateSettings,
    aligned_teacher,
    collate,
    model_inputs,
    pack_first_fit,
    pad_id,
    shifted_labels,
)
from rayjobs.distillation.losses import LossSettings, TopKTeacher, distill_loss

PAD = 0
K = 3


def make_row(prompt_len: int, n_teacher: int, *, eos: bool = True, offset: bool = True, k: int = K, seed: int = 0):
    """A sample as the generation stage writes it: prompt + teacher tokens (+ appended eos).

    The teacher's top-1 at token j is the token itself, so alignment is checkable: at every KD
    position t, teacher_ids[t, 0] must equal the label (the token at t + 1).
    """
    rng = np.random.default_rng(seed)
    prompt = rng.integers(10, 50, prompt_len).tolist()
    teacher = rng.integers(50, 90, n_teacher).tolist()
    ids = prompt + teacher + ([2] if eos else [])
    topk_ids, topk_lps = [], []
    for tok in teacher:
        others = [t for t in rng.choice(np.arange(100, 200), k - 1, replace=False).tolist()]
        topk_ids += [tok, *others]
        topk_lps += [-0.1, *[-3.0 - i for i in range(k - 1)]]
    return {
        "input_ids": np.asarray(ids, np.int32),
        "prompt_len": prompt_len,
        "teacher_offset": prompt_len if offset else -1,
        "topk_k": k if n_teacher else 0,
        "topk_ids": np.asarray(topk_ids, np.int32),
        "topk_logprobs": np.asarray(topk_lps, np.float16),
    }


def as_columns(rows):
    """Ray Data's numpy batch format: one (object) array per column."""
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if isinstance(values[0], np.ndarray):
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[key] = arr
        else:
            out[key] = np.asarray(values)
    return out


def settings(**kw):
    return CollateSettings(**{"pad_id": PAD, "max_seq_len": 64, **kw})


def test_shifted_labels():
    ids = np.array([5, 6, 7, 8, 9])
    assert shifted_labels(ids, prompt_len=2).tolist() == [-100, 7, 8, 9, -100]
    assert shifted_labels(ids, prompt_len=0).tolist() == [6, 7, 8, 9, -100]
    assert shifted_labels(np.array([5]), 1).tolist() == [-100]


def test_padding_labels_and_mask():
    rows = [make_row(3, 4), make_row(5, 2, seed=1)]
    b = collate(as_columns(rows), settings())
    assert b["input_ids"].shape == (2, 8)
    assert b["attention_mask"].tolist() == [[1] * 8, [1] * 8]
    rows = [make_row(3, 1), make_row(5, 2, seed=1)]
    b = collate(as_columns(rows), settings())
    assert b["attention_mask"][0].tolist() == [1] * 5 + [0] * 3
    assert b["input_ids"][0, 5:].tolist() == [PAD] * 3
    assert (b["labels"][0, 4:] == IGNORE_INDEX).all()
    assert int(b["num_tokens"]) == 5 + 8
    for r, row in enumerate(rows):
        ids, p = row["input_ids"], row["prompt_len"]
        labels = b["labels"][r]
        assert (labels[: p - 1] == IGNORE_INDEX).all()
        assert labels[p - 1: len(ids) - 1].tolist() == ids[p:].tolist()


def test_teacher_aligned_to_the_predicting_position():
    rows = [make_row(4, 6), make_row(2, 3, seed=1), make_row(6, 5, eos=False, seed=2)]
    b = collate(as_columns(rows), settings())
    assert b["teacher_ids"].shape == (3, b["input_ids"].shape[1], K)
    mask = b["teacher_mask"]
    # Every KD position predicts exactly the teacher's own token, found at top-1.
    assert torch.equal(b["teacher_ids"][..., 0][mask], b["labels"][mask])
    assert mask.sum(1).tolist() == [6, 3, 5]
    for r, row in enumerate(rows):
        p = row["prompt_len"]
        assert mask[r].nonzero().squeeze(1).tolist() == list(range(p - 1, p - 1 + [6, 3, 5][r]))
    # The appended eos is trained by CE but has no teacher distribution.
    eos_pos = 4 + 6 - 1  # position predicting the eos at index 10
    assert b["labels"][0, eos_pos] == 2 and not mask[0, eos_pos]
    assert b["teacher_logprobs"][mask][:, 0].allclose(torch.tensor(-0.1), atol=1e-3)
    assert (b["teacher_ids"][~mask] == -1).all()


def test_no_kd_without_teacher_offset():
    b = collate(as_columns([make_row(3, 4, offset=False), make_row(3, 4, seed=1)]), settings())
    assert not b["teacher_mask"][0].any()
    assert b["teacher_mask"][1].sum() == 4
    assert (b["labels"][0] != IGNORE_INDEX).sum() == 5  # CE still trains the row


def test_rows_without_topk_get_width_one():
    b = collate(as_columns([make_row(3, 0, k=0)]), settings())
    assert b["teacher_ids"].shape[-1] == 1
    assert not b["teacher_mask"].any()


def test_truncation_keeps_alignment():
    row = make_row(4, 20)
    b = collate(as_columns([row]), settings(max_seq_len=10))
    assert b["input_ids"].shape == (1, 10)
    assert b["labels"][0, -1] == IGNORE_INDEX
    mask = b["teacher_mask"][0]
    assert mask.nonzero().squeeze(1).tolist() == list(range(3, 9))
    assert torch.equal(b["teacher_ids"][0, mask, 0], b["labels"][0, mask])


def test_aligned_teacher_offset_zero_skips_unpredictable_first_token():
    ids, _, mask = aligned_teacher(4, 0, 1, 1, [7, 8, 9, 10], [-1.0] * 4)
    assert mask.tolist() == [True, True, True, False]
    assert ids[:, 0].tolist() == [8, 9, 10, -1]


def test_without_teacher_columns():
    row = make_row(3, 4)
    cols = {k: v for k, v in as_columns([row]).items() if k in ("input_ids", "prompt_len", "teacher_offset")}
    b = collate(cols, settings(with_teacher=False))
    assert "teacher_ids" not in b and "attention_mask" in b
    assert settings(with_teacher=False).columns == ("input_ids", "prompt_len", "teacher_offset")


def test_pack_first_fit():
    bins = pack_first_fit([5, 3, 4, 2, 6], capacity=8)
    assert sorted(i for b in bins for i in b) == [0, 1, 2, 3, 4]
    lengths = [5, 3, 4, 2, 6]
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    assert len(bins) == 3
    with pytest.raises(ValueError):
        pack_first_fit([9], capacity=8)


def test_packing_preserves_labels_and_teacher():
    rows = [make_row(3, 4, seed=i) for i in range(3)] + [make_row(5, 8, seed=9)]
    plain = collate(as_columns(rows), settings(max_seq_len=16))
    packed = collate(as_columns(rows), settings(max_seq_len=16, packing=True))
    assert "attention_mask" not in packed and "position_ids" in packed
    assert packed["input_ids"].shape[0] < len(rows)
    assert int(packed["num_tokens"]) == int(plain["num_tokens"])
    valid = lambda b: sorted(b["labels"][b["labels"] != IGNORE_INDEX].tolist())  # noqa: E731
    assert valid(packed) == valid(plain)
    m = packed["teacher_mask"]
    assert int(m.sum()) == int(plain["teacher_mask"].sum())
    assert torch.equal(packed["teacher_ids"][..., 0][m], packed["labels"][m])
    # Positions restart at every sample.
    assert (packed["position_ids"] == 0).sum() >= len(rows)


def test_loss_consumes_collated_batch():
    rows = [make_row(3, 4), make_row(4, 2, offset=False, seed=3)]
    b = collate(as_columns(rows), settings())
    vocab = 256
    logits = torch.randn(*b["input_ids"].shape, vocab)
    teacher = TopKTeacher(b["teacher_ids"], b["teacher_logprobs"], b["teacher_mask"])
    out = distill_loss(logits, b["labels"], teacher, LossSettings(kind="logit"))
    assert torch.isfinite(out.total)
    assert int(out.num_kd_tokens) == 4
    assert int(out.num_tokens) == int((b["labels"] != IGNORE_INDEX).sum())


def test_packed_forward_matches_padded_forward():
    """transformers must see packed samples as independent: same logits as the padded batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    model.eval()
    rows = [make_row(3, 4, seed=i) for i in range(3)]
    plain = collate(as_columns(rows), settings(max_seq_len=32))
    packed = collate(as_columns(rows), settings(max_seq_len=32, packing=True))
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        a = model(**model_inputs(plain), use_cache=False).logits
        b = model(**model_inputs(packed), use_cache=False).logits
    got = b[packed["labels"] != IGNORE_INDEX]
    want = a[plain["labels"] != IGNORE_INDEX]
    # Same multiset of rows; compare sorted by first logit to avoid depending on packing order.
    order = lambda x: x[torch.argsort(x[:, 0])]  # noqa: E731
    torch.testing.assert_close(order(got), order(want), atol=1e-4, rtol=1e-4)


def test_pad_id_falls_back_to_eos_for_tokenizers_without_a_pad_token():
    assert pad_id(SimpleNamespace(pad_token_id=3, eos_token_id=7)) == 3
    assert pad_id(SimpleNamespace(pad_token_id=0, eos_token_id=7)) == 0
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
