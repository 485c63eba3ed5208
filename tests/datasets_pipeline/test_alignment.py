"""Cross-tokenizer alignment and the vocabulary map: pure, with fake decoders and real tiny BPEs."""

import pytest

from datasets_pipeline.alignment import (
    align_by_start,
    align_tokens,
    NO_START,
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


def _byte_decoder(pieces: dict[int, bytes], per_byte: bool):
    """Decodes bytes as UTF-8 with replacement: one U+FFFD per incomplete sequence (a byte-level BPE,
    Python's and Rust's lossy decoding) or, ``per_byte``, one per byte (a byte-fallback decoder)."""
    def decode(ids):
        data = b"".join(pieces[i] for i in ids)
        return _per_byte_replace(data) if per_byte else data.decode("utf-8", "replace")
    return decode


def _per_byte_replace(data: bytes) -> str:
    out, i = [], 0
    while i < len(data):
        for n in (4, 3, 2, 1):
            try:
                out.append(data[i:i + n].decode("utf-8"))
                i += n
                break
            except UnicodeDecodeError:
                continue
        else:
            out.append("\ufffd")
            i += 1
    return "".join(out)


@pytest.mark.parametrize("per_byte", [False, True])
def test_decoded_starts_give_no_start_inside_a_character(per_byte):
    # "x€x€x": € (3 bytes) split over two ids, then over three: the ids that start
    # inside a character get NO_START, the one that opens it carries its width.
    decode = _byte_decoder({0: b"x", 1: b"\xe2", 2: b"\x82\xac", 3: b"\x82", 4: b"\xac"}, per_byte)
    starts, length = decoded_starts(decode, [0, 1, 2, 0, 1, 3, 4, 0])
    assert length == len("x€x€x")
    assert starts == [0, 1, NO_START, 2, 3, NO_START, NO_START, 4]


def test_align_by_start_never_pairs_mid_character_tokens():
    assert align_by_start([0, NO_START, 2], [0, NO_START, 2]) == [0, -1, 2]


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
    student_keys = ["a", "b", "num", None, "a", ("raw", "Ã"), ("special", "<|im_end|>")]
    first = {"numbers": 2, "zz": None}
    mapping = vocab_map(["b", "a", "numbers", None, "zz", ("raw", "Ã"), ("raw", "Â"), ("special", "<|im_end|>"),
                         ("special", "<s>")], student_keys, lambda texts: [first.get(t) for t in texts])
    assert mapping == [1, 0, 2, -1, -1, 5, -1, 6, -1]


def test_token_keys_use_the_piece_for_partial_characters_and_mark_specials():
    keys = token_keys(["a", "\ufffd", "", "<|im_end|>"], ["a", "Ã", None, "<|im_end|>"], [False, False, False, True])
    assert keys == ["a", ("raw", "Ã"), None, ("special", "<|im_end|>")]


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
