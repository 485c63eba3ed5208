"""Fixtures of the generation stage's tests: two tiny chat tokenizers; DeepSeek-R1's and Qwen2.5's real
tokenizers (~2 s and ~4 s to build), once per session, and their vocabulary map built once into a
session cache root, with what the build cost."""

import time

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


@pytest.fixture(scope="session")
def r1():
    from rayjobs.demo.real_tokenizers import r1_tokenizer

    return r1_tokenizer()


@pytest.fixture(scope="session")
def qwen():
    from rayjobs.demo.real_tokenizers import qwen_tokenizer

    return qwen_tokenizer()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


@pytest.fixture(scope="session")
def r1_qwen_map(r1, qwen, tmp_path_factory):
    """``(map, facts)``: the R1 -> Qwen map from an empty cache root; facts hold the root, the build
    time and the peak RSS growth during the build (``/proc/self/clear_refs`` resets the peak)."""
    from datasets_pipeline.vocab_cache import cached_vocab_map

    root = str(tmp_path_factory.mktemp("vocab-cache"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kib("VmRSS:")
    start = time.perf_counter()
    mapping = cached_vocab_map(r1, qwen, root=root)
    facts = {"root": root, "build_s": time.perf_counter() - start, "peak_growth_mib": (_rss_kib("VmHWM:") - before) / 1024}
    print(f"R1 -> Qwen vocabulary map: {facts['build_s']:.2f} s, peak RSS +{facts['peak_growth_mib']:.0f} MiB")
    return mapping, facts
