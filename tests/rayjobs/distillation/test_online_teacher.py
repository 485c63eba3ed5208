"""The online teacher's tokens, position map and logits on the student's grid; tiny real models."""

import pytest
import torch

from rayjobs.distillation.chunked_head import DenseTeacherHead, fit_vocab
from rayjobs.distillation.config import TeacherConfig
from rayjobs.distillation.losses import TopKTeacher
from rayjobs.distillation.online_teacher import OnlineTeacher, load_teacher, position_map
from rayjobs.distillation.xtok import gather_positions


def test_position_map_shifts_the_token_map_by_one():
    # Student token i+1 aligned with teacher token j: positions i and j - 1 have read the same text.
    assert position_map([0, 1, -1, 4, 5], 5) == [0, -1, 3, 4, -1]
    assert position_map([0, 0], 2) == [-1, -1]  # teacher token 0 has no position before it


@pytest.mark.parametrize("student", ["student", "student_same"])
def test_aligned_positions_have_read_the_same_text(online_batch, tiny_rows, student):
    s_tok, t_tok, cols, batch = online_batch(student)
    align = batch["align_index"]
    for r in range(len(tiny_rows)):
        s_ids = batch["input_ids"][r].tolist()
        t_ids = batch["teacher_input_ids"][r].tolist()
        n = int(batch["attention_mask"][r].sum())
        prompt_len = int(cols["prompt_len"][r])
        aligned = [p for p in range(n) if align[r, p] >= 0]
        # Identical chat templates: the whole prompt aligns too, up to the last position before the end.
        assert set(range(prompt_len - 1, n - 1)) <= set(aligned) or student == "student"
        assert prompt_len - 1 in aligned and n - 1 not in aligned
        for p in aligned:
            q = int(align[r, p])
            assert s_tok.decode(s_ids[:p + 1]) == t_tok.decode(t_ids[:q + 1])
    assert (align[batch["attention_mask"] == 0] == -1).all()


def test_teacher_is_frozen_and_its_logits_land_on_student_ids(tiny_pair, online_batch):
    s_tok, t_tok, _, batch = online_batch("student")
    model = load_teacher(tiny_pair["teacher"], TeacherConfig(), eager_attention=False, device="cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    teacher = OnlineTeacher(model, s_tok, t_tok, online_topk=8, with_attention=False)
    out = teacher.run(batch, "cpu")
    assert len(out.hidden_states) == 5 and out.logits.shape[1] == 0  # the head runs chunked, later
    student_vocab = 320
    with teacher.head() as head:
        target = teacher.logit_teacher(out, batch["align_index"], student_vocab, head, chunk_tokens=5)
        raw = teacher.logit_teacher(out, batch["align_index"], student_vocab, head, chunk_tokens=5, raw=True)
        full = model(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    assert isinstance(target, TopKTeacher) and target.ids.shape == (*batch["input_ids"].shape, 8)
    valid = target.ids >= 0
    assert (target.ids[valid] < len(s_tok)).all()
    assert (raw.logprobs[..., :-1] >= raw.logprobs[..., 1:]).all()  # sorted, for ULD
    # Chunk by chunk, the same top-k as the teacher's full logits gathered onto the student's grid.
    expected = torch.log_softmax(gather_positions(full, batch["align_index"]).float(), -1).topk(8, dim=-1)
    torch.testing.assert_close(raw.logprobs, expected.values)
    # Every real teacher token maps somewhere here; only embedding rows past the tokenizer (a random
    # model gives them mass) map nowhere, and their mass goes to the rest bin.
    mass = torch.where(valid, target.logprobs.exp(), 0.0).sum(-1)[target.mask]
    real = torch.where(raw.ids < len(t_tok), raw.logprobs.exp(), 0.0).sum(-1)[target.mask]
    assert torch.allclose(mass, real, atol=1e-5) and (mass > 0).all()


def test_same_tokenizer_teacher_gives_its_full_logits_chunk_by_chunk(tiny_pair, online_batch):
    s_tok, t_tok, _, batch = online_batch("student_same")
    model = load_teacher(tiny_pair["teacher"], TeacherConfig(), eager_attention=False, device="cpu")
    teacher = OnlineTeacher(model, s_tok, t_tok, online_topk=8, with_attention=False)
    with teacher.head() as head:
        target = teacher.logit_teacher(teacher.run(batch, "cpu"), batch["align_index"], 320, head, chunk_tokens=5)
        assert isinstance(target, DenseTeacherHead)
        made = target.chunk(0, 1)  # its positions' logits, made only when a chunk asks for them
    full = model(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    expected = fit_vocab(gather_positions(full, batch["align_index"]), 320)[:1]
    torch.testing.assert_close(made.logits, expected)
    torch.testing.assert_close(made.mask, batch["align_index"][:1] >= 0)
