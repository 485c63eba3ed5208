"""Fixtures of the generation stage's tests."""

import pytest


@pytest.fixture(scope="session")
def tok_dirs(tmp_path_factory):
    """Two tiny chat tokenizers trained in a second: (teacher dir, student dir, teacher, student); they
    differ in merges, vocabulary size and special-token ids, as a real teacher/student pair does."""
    from rayjobs.demo.tokenizers import END_OF_TEXT, IM_END, IM_START, PAD, save_tokenizer, train_chat_tokenizer

    convs = [[{"role": "user", "content": f"What is {a} + {b}?"},
              {"role": "assistant", "content": f"<think>\n{a}+{b}\n</think>\n{a + b}"}] for a, b in [(47, 85), (3, 9)]]
    root = tmp_path_factory.mktemp("toks")
    teacher = train_chat_tokenizer(convs, vocab_size=120)
    student = train_chat_tokenizer(convs, vocab_size=100, special_tokens=(END_OF_TEXT, PAD, IM_START, IM_END),
                                   pad_token=PAD, pre_tokenizer="gpt2")
    save_tokenizer(teacher, root / "teacher")
    save_tokenizer(student, root / "student")
    return str(root / "teacher"), str(root / "student"), teacher, student
