"""Cross-tokenizer logit distillation (rayjobs.distillation.xtok): merging, alignment, ULD. Pure, milliseconds."""

import numpy as np
import pytest
import torch

from rayjobs.distillation.collate import CollateSettings, aligned_teacher, collate
from rayjobs.distillation.losses import LossSettings, TopKTeacher, distill_loss
from rayjobs.distillation.xtok import aligned_teacher_xtok, gather_positions, map_teacher_topk, merge_topk, uld_loss


def test_merge_topk_sums_duplicates_and_drops_unmapped():
    ids = torch.tensor([[5, 3, 5, -1], [7, -1, -1, -1]])
    lps = torch.log(torch.tensor([[0.4, 0.3, 0.1, 0.2], [0.9, 0.05, 0.03, 0.02]]))
    out_ids, out_lps = merge_topk(ids, lps)
    assert out_ids.tolist() == [[3, 5, -1, -1], [7, -1, -1, -1]]
    assert out_lps.exp()[0, :2].tolist() == pytest.approx([0.3, 0.5])
    assert out_lps.exp()[1, 0].item() == pytest.approx(0.9)
    assert (out_lps[out_ids < 0] == 0).all()


def _row(prompt_len=4, n=6, k=3, seed=0):
    rng = np.random.default_rng(seed)
    teacher = rng.integers(20, 60, n)
    ids = np.stack([teacher, rng.integers(60, 80, n), rng.integers(80, 99, n)], 1)[:, :k]
    lps = np.log(np.tile([0.7, 0.2, 0.05][:k], (n, 1))).astype(np.float32)
    input_ids = np.concatenate([rng.integers(1, 20, prompt_len), teacher])
    return input_ids, ids.reshape(-1), lps.reshape(-1)


def test_identity_alignment_matches_the_same_tokenizer_path():
    """With every token aligned to itself, cross-tokenizer KD is exactly same-tokenizer KD."""
    input_ids, ids, lps = _row()
    p, k, n, width = 4, 3, 6, 3
    same = aligned_teacher(len(input_ids), p, k, width, ids, lps)
    xtok = aligned_teacher_xtok(len(input_ids), p, list(range(n)), k, width, ids, lps)
    assert (same[2] == xtok[2]).all()
    logits = torch.randn(1, len(input_ids), 100, dtype=torch.float64)
    labels = torch.full((1, len(input_ids)), -100)
    labels[0, p - 1:-1] = torch.from_numpy(input_ids[p:])
    losses = [distill_loss(logits, labels, TopKTeacher(torch.from_numpy(i)[None], torch.from_numpy(lp)[None],
                                                       torch.from_numpy(m)[None]), LossSettings(kind="logit")).kd
              for i, lp, m in (same, xtok)]
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-6)


def test_xtok_alignment_skips_unaligned_tokens_and_truncation():
    input_ids, ids, lps = _row()
    align = [0, -1, 2, 3, -1, 5]
    t_ids, _, mask = aligned_teacher_xtok(len(input_ids), 4, align, 3, 4, ids, lps)
    # Student token i is predicted at position 4 + i - 1.
    assert np.nonzero(mask)[0].tolist() == [3, 5, 6, 8]
    assert (t_ids[~mask] == -1).all() and (t_ids[:, 3] == -1).all()
    _, _, cut = aligned_teacher_xtok(7, 4, align, 3, 3, ids, lps)
    assert np.nonzero(cut)[0].tolist() == [3, 5]  # position 6 would predict a token past the cut


def test_collate_uses_the_stored_alignment_for_cross_tokenizer_rows():
    input_ids, ids, lps = _row()
    vocab_map = np.arange(100, dtype=np.int32) + 1000  # the student's ids for the same tokens
    row = {"input_ids": [input_ids], "prompt_len": [4], "teacher_offset": [-1], "topk_k": [3],
           "topk_ids": [ids], "topk_logprobs": [lps], "teacher_align": [list(range(6))]}
    out = collate(row, CollateSettings(pad_id=0, max_seq_len=64, vocab_map=vocab_map))
    kd = out["teacher_mask"][0]
    assert kd.sum() == 6
    assert set(out["teacher_ids"][0][kd].reshape(-1).tolist()) <= set((ids + 1000).tolist())
    raw = collate(row, CollateSettings(pad_id=0, max_seq_len=64, xtok_map=False))
    assert (raw["teacher_ids"][0][kd][:, 0] == torch.from_numpy(ids.reshape(6, 3)[:, 0])).all()
    with pytest.raises(ValueError, match="vocab_map"):
        collate(row, CollateSettings(pad_id=0, max_seq_len=64))


def test_map_teacher_topk_moves_mass_onto_student_ids():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    ids, lps = map_teacher_topk(logits, torch.tensor([1, 0, 1, -1]), k=4)
    assert ids[0, 0].tolist() == [0, 1, -1, -1]
    assert lps.exp()[0, 0, :2].tolist() == pytest.approx([0.3, 0.65])


def test_gather_positions():
    values = torch.arange(2 * 5 * 3).reshape(2, 5, 3)
    index = torch.tensor([[4, 0, -1], [1, 1, 2]])
    out = gather_positions(values, index)
    assert out.shape == (2, 3, 3)
    assert out[0, 0].tolist() == values[0, 4].tolist() and out[1, 2].tolist() == values[1, 2].tolist()


def _uld_case(seed=0, k=5, v=5):
    g = torch.Generator().manual_seed(seed)
    teacher_logits = torch.randn(2, 4, v, generator=g, dtype=torch.float64) * 2
    lps, ids = torch.log_softmax(teacher_logits, -1).topk(k, dim=-1)
    labels = torch.randint(0, v, (2, 4), generator=g)
    labels[0, 0] = -100
    return teacher_logits, TopKTeacher(ids, lps), labels


def test_uld_is_zero_for_the_same_sorted_distribution_in_any_token_order():
    teacher_logits, teacher, labels = _uld_case()
    settings = LossSettings(kind="logit", alpha=1.0)
    assert uld_loss(teacher_logits, labels, teacher, settings).kd.item() == pytest.approx(0.0, abs=1e-12)
    shuffled = teacher_logits[..., torch.randperm(5)]
    assert uld_loss(shuffled, labels, teacher, settings).kd.item() == pytest.approx(0.0, abs=1e-12)
    other = torch.zeros_like(teacher_logits)
    assert uld_loss(other, labels, teacher, settings).kd.item() > 0.1


def test_uld_gradients_are_finite_with_padding_and_masks():
    teacher_logits, teacher, labels = _uld_case(k=3, v=9)
    ids = teacher.ids.clone()
    ids[0, 1, 2] = -1
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False
    student = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    out = uld_loss(student, labels, TopKTeacher(ids, teacher.logprobs, mask),
                   LossSettings(kind="logit", alpha=0.5, temperature=2.0))
    out.total.backward()
    assert torch.isfinite(out.total) and torch.isfinite(student.grad).all()
    assert out.num_kd_tokens.item() == 6
