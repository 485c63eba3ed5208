"""The real R1 and Qwen2.5 tokenizers built from the registry packages' files."""

import random

import pytest
import tiktoken

from rayjobs.demo.real_tokenizers import (
    QWEN_SPLIT, _tiktoken_ranks, package_file, qwen_tokenizer, r1_tokenizer, save_real_tokenizer,
)

SAMPLES = [
    "计算 4821 + 397，并给出步骤。",
    "Hello   world\n\n\tfoo 😀🇨🇳 ΑΒΓ  café",
    "<think>\nLet me add 12+30.\n</think>\nThe answer is 42.",
    "日本語のテキスト、한국어 텍스트 ①②③ ½ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def qwen():
    return qwen_tokenizer()


def test_qwen_matches_tiktoken_on_random_text(qwen):
    """Our BPE built from the ranks encodes exactly as tiktoken does with the same ranks."""
    ranks = _tiktoken_ranks(package_file("qwen_tokenizer", "resources/qwen.tiktoken"))
    reference = tiktoken.Encoding("qwen", pat_str=QWEN_SPLIT, mergeable_ranks=ranks, special_tokens={})
    rng = random.Random(0)
    alphabet = "ab 计算😀\n\t0123456789,.!<>/é한"
    texts = SAMPLES + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(500)]
    for text in texts:
        ids = qwen.encode(text, add_special_tokens=False)
        assert ids == reference.encode_ordinary(text), text
        assert qwen.decode(ids) == text


def test_qwen_specials_and_chatml(qwen):
    assert len(qwen) == 151_665
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    rendered = qwen.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are Qwen")
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_r1_vocabulary_think_and_template():
    r1 = r1_tokenizer()
    assert len(r1) == 129_280
    assert r1.encode("<think>\n", add_special_tokens=False)[0] == 128821
    assert r1.decode(r1.encode("<think>x</think>", add_special_tokens=False), skip_special_tokens=True) == "<think>x</think>"
    rendered = r1.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>\n"
    for text in SAMPLES:
        assert r1.decode(r1.encode(text, add_special_tokens=False)) == text


def test_saved_layout_reloads_identically(qwen, tmp_path):
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(save_real_tokenizer(qwen, tmp_path / "qwen"))
    assert reloaded.chat_template == qwen.chat_template
    for text in SAMPLES:
        assert reloaded.encode(text, add_special_tokens=False) == qwen.encode(text, add_special_tokens=False)
