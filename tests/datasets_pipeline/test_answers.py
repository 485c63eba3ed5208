import pytest

from datasets_pipeline.answers import CHECKERS, check_answer, normalize_answer, parse_number, split_reasoning


@pytest.mark.parametrize(
    ("text", "reasoning", "answer"),
    [
        ("<think>\n3+4=7\n</think>\n7", "3+4=7", "7"),
        ("  <think>a</think>  b c ", "a", "b c"),
        ("<think></think>42", "", "42"),
        ("3+4=7\n</think>\n7", "3+4=7", "7"),  # opening tag was part of the prompt
        ("<think>\n3+4=", "3+4=", ""),  # ran out of tokens mid-thought
        ("<think>", "", ""),
        ("just 7", None, "just 7"),
        ("", None, ""),
        ("<think>a</think>b</think>c", "a", "b</think>c"),
    ],
)
def test_split_reasoning(text, reasoning, answer):
    assert split_reasoning(text) == (reasoning, answer)


def test_unterminated_trace_has_no_answer_to_accept():
    _, answer = split_reasoning("<think>the answer is 7")
    assert not check_answer(answer, "7", "numeric")


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [(" Paris. ", "paris"), ("New\n  York", "new york"), ("'42'", "42"), ("", ""), ("A-B", "a-b")],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


@pytest.mark.parametrize(
    ("predicted", "reference", "expected"),
    [
        ("Paris", "paris", True),
        ("  paris.", "Paris", True),
        ("1017", "1017", True),
        ("1,017", "1017", False),
        ("Lyon", "Paris", False),
        ("", "", True),
    ],
)
def test_exact(predicted, reference, expected):
    assert check_answer(predicted, reference, "exact") is expected


@pytest.mark.parametrize(
    ("predicted", "reference", "expected"),
    [
        ("1017", "1017", True),
        ("1,017", "1017", True),
        ("1017.0", "1017", True),
        ("The answer is 1,234,567.", "1234567", True),
        ("-12", "-12", True),
        ("0.1", "0.10000000001", True),
        ("0.5", ".5", True),
        ("1e3", "1000", True),
        ("3 + 4 = 7", "7", True),  # the last number is the answer
        ("1018", "1017", False),
        ("12345678901234567891", "12345678901234567890", False),  # no float rounding for big ints
        ("seven", "7", False),
        ("", "7", False),
        ("7", "", False),
    ],
)
def test_numeric(predicted, reference, expected):
    assert check_answer(predicted, reference, "numeric") is expected


def test_parse_number():
    assert parse_number("x = 1,234.5") == parse_number("1234.5")
    assert parse_number("no digits") is None


def test_default_mode_is_exact_and_registry_is_pluggable(monkeypatch):
    assert check_answer("A", "a")
    monkeypatch.setitem(CHECKERS, "always", lambda predicted, reference: True)
    assert check_answer("x", "y", "always")


def test_unknown_checker_names_the_known_ones():
    with pytest.raises(ValueError, match="exact"):
        check_answer("1", "1", "fuzzy")
