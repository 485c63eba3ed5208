"""Cross-tokenizer alignment and the vocabulary map: pure, with fake decoders and real tiny BPEs."""

import pytest

from datasets_pipeline.alignment import (
    align_by_start,
    align_tokens,
    decoded_starts,
    token_keys,
    tokenizer_decoder,
    tokenizer_vocab_map,
    vocab_map,
)


def _decoder(pieces: dict[int, str]):
    return lambda ids: "".join(pieces[i] for i in ids)


def test_decoded_starts_are_character_offsets():
    decode = _decoder({0: "ab", 1: "c", 2: "", 3: "def"})
    assert decoded_starts(decode, [0, 1, 3, 2]) == ([0, 2, 3, 6], 6)


def test_decoded_starts_give_a_partial_character_zero_width():
    # Two "bytes" that decode to one character only together, like a split UTF-8 sequence.
    def decode(ids):
        text = "".join({0: "x", 1: "\x00", 2: "\x01"}[i] for i in ids)
        return text.replace("\x00\x01", "€").replace("\x00", "\ufffd").replace("\x01", "\ufffd")

    starts, length = decoded_starts(decode, [0, 1, 2, 0])
    assert length == len("x€x")
    assert starts == [0, 1, 2, 2]


def test_align_by_start_takes_the_first_teacher_token_at_each_offset():
    # student: "num|bers| |are" ; teacher: "numbers| are" (+ a zero-width eos at the end of both)
    assert align_by_start([0, 3, 7, 8, 11], [0, 7, 11, 11]) == [0, -1, 1, -1, 2]


def test_align_tokens_refuses_texts_that_decode_differently():
    s = _decoder({0: "ab", 1: "c"})
    t = _decoder({0: "a", 1: "bc"})
    assert align_tokens(s, [0, 1], t, [0, 1], "abc") == [0, -1]
    assert align_tokens(s, [0, 1], t, [0], "abc") == [-1, -1]
    assert align_tokens(s, [0, 1], t, [0, 1], "abcd") == [-1, -1]


def test_vocab_map_same_key_then_first_student_token():
    student_keys = ["a", "b", "num", None, "a", ("raw", "Ã")]
    first = {"numbers": 2, "zz": None}
    mapping = vocab_map(["b", "a", "numbers", None, "zz", ("raw", "Ã"), ("raw", "Â")], student_keys,
                        lambda text: first.get(text))
    assert mapping == [1, 0, 2, -1, -1, 5, -1]


def test_token_keys_use_the_piece_for_partial_characters():
    decode = _decoder({0: "a", 1: "\ufffd", 2: ""})
    assert token_keys(decode, ["a", "Ã", None]) == ["a", ("raw", "Ã"), None]


@pytest.fixture(scope="module")
def toks():
    from rayjobs.demo.tokenizers import END_OF_TEXT, IM_END, IM_START, train_chat_tokenizer

    convs = [[{"role": "user", "content": f"What is {a} + {b}?"},
              {"role": "assistant", "content": f"<think>\n{a}+{b}\n</think>\n{a + b} numbers"}]
             for a, b in [(12, 34), (5, 77), (903, 18)]]
    teacher = train_chat_tokenizer(convs, vocab_size=140)
    student = train_chat_tokenizer(convs, vocab_size=100, special_tokens=(IM_START, IM_END, END_OF_TEXT),
                                   pre_tokenizer="gpt2")
    return teacher, student


def test_real_tokenizers_align_and_map(toks):
    teacher, student = toks
    text = "<think>\n12+34\n</think>\n46 numbers"
    t_ids = teacher(text, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id]
    s_ids = student(text, add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    align = align_tokens(tokenizer_decoder(student), s_ids, tokenizer_decoder(teacher), t_ids, text)
    assert align[0] == 0 and align[-1] == len(t_ids) - 1  # first token and the eos
    mapping = tokenizer_vocab_map(teacher, student)
    assert mapping[teacher.eos_token_id] == student.eos_token_id
    for i, j in enumerate(align):
        if j >= 0 and teacher.decode([t_ids[j]]) == student.decode([s_ids[i]]):
            assert mapping[t_ids[j]] == s_ids[i]  # same text, same token
