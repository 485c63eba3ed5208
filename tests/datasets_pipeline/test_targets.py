import pytest

from datasets_pipeline.targets import TooLong, build_student_example, same_vocabulary

CONVS = [[{"role": "user", "content": f"What is {a} + {b}?"},
          {"role": "assistant", "content": f"<think>{a}+{b}</think>{a + b}"}] for a, b in [(12, 34), (5, 77)]]


@pytest.fixture(scope="module")
def toks():
    from rayjobs.demo.tokenizers import IM_END, IM_START, END_OF_TEXT, train_chat_tokenizer

    a = train_chat_tokenizer(CONVS, vocab_size=120)
    b = train_chat_tokenizer(CONVS, vocab_size=100, special_tokens=(IM_START, IM_END, END_OF_TEXT))
    return a, b


MSGS = [{"role": "user", "content": "What is 12 + 34?"}]


def test_same_vocab_uses_teacher_tokens_verbatim(toks):
    tok, _ = toks
    teacher_ids = tok("<think>12+34</think>46", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ex = build_student_example(tok, MSGS, "<think>12+34</think>46", "46", teacher_ids,
                               reasoning_policy="keep", max_len=512, aligned_vocab=True)
    assert ex.teacher_offset == ex.prompt_len
    assert ex.input_ids[ex.prompt_len:] == teacher_ids  # eos not doubled


def test_other_vocab_retokenizes_and_appends_eos(toks):
    teacher, student = toks
    assert not same_vocabulary(teacher, student)
    ex = build_student_example(student, MSGS, "<think>12+34</think>46", "46", [1, 2, 3],
                               reasoning_policy="keep", max_len=512, aligned_vocab=False)
    assert ex.teacher_offset == -1
    assert ex.input_ids[-1] == student.eos_token_id
    assert "46" in student.decode(ex.input_ids[ex.prompt_len:])


def test_strip_reasoning_targets_only_the_answer(toks):
    tok, _ = toks
    ex = build_student_example(tok, MSGS, "<think>12+34</think>46", "46", [9, 9],
                               reasoning_policy="strip", max_len=512, aligned_vocab=True)
    assert ex.teacher_offset == -1
    assert "think" not in tok.decode(ex.input_ids[ex.prompt_len:])


def test_too_long_for_student(toks):
    tok, _ = toks
    with pytest.raises(TooLong, match="max_len 8"):
        build_student_example(tok, MSGS, "x", "x", [1], reasoning_policy="keep", max_len=8, aligned_vocab=False)


def test_other_vocab_aligns_target_tokens_with_teacher_tokens(toks):
    from datasets_pipeline.alignment import tokenizer_decoder

    teacher, student = toks
    completion = "<think>12+34</think>46"
    teacher_ids = teacher(completion, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
    ex = build_student_example(student, MSGS, completion, "46", teacher_ids, reasoning_policy="keep",
                               max_len=512, aligned_vocab=False, teacher_decode=tokenizer_decoder(teacher))
    target = ex.input_ids[ex.prompt_len:]
    assert len(ex.teacher_align) == len(target)
    assert ex.teacher_align[0] == 0 and ex.teacher_align[-1] == len(teacher_ids) - 1  # first token, eos
    assert all(-1 <= j < len(teacher_ids) for j in ex.teacher_align)
    # Aligned pairs start at the same character: their decoded prefixes are equal.
    for i, j in enumerate(ex.teacher_align):
        if j >= 0:
            assert student.decode(target[:i], skip_special_tokens=True) == teacher.decode(teacher_ids[:j],
                                                                                           skip_special_tokens=True)


def test_no_alignment_without_teacher_decoder_or_with_stripped_reasoning(toks):
    from datasets_pipeline.alignment import tokenizer_decoder

    teacher, student = toks
    ids = teacher("<think>12+34</think>46", add_special_tokens=False)["input_ids"]
    plain = build_student_example(student, MSGS, "<think>12+34</think>46", "46", ids, reasoning_policy="keep",
                                  max_len=512, aligned_vocab=False)
    stripped = build_student_example(student, MSGS, "<think>12+34</think>46", "46", ids, reasoning_policy="strip",
                                     max_len=512, aligned_vocab=False, teacher_decode=tokenizer_decoder(teacher))
    assert plain.teacher_align == [] and stripped.teacher_align == []
