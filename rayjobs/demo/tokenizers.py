"""Tiny byte-level BPE tokenizers with a ChatML template, trained offline in well under a second.

Teacher and student get different tokenizers on purpose (different merges, vocabulary sizes and
special-token ids), as real teacher/student pairs from different families do; cross-tokenizer
distillation has to cope with that. Both split every digit into its own token: with merged digit
groups ("123" as one token) a small model would have to memorize an addition table per group
instead of learning the per-digit algorithm.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from datasets_pipeline.answers import THINK_CLOSE, THINK_OPEN

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"

# ChatML, written with only the Jinja subset that both transformers and vLLM render.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# A little prose so the BPE learns word merges beyond the handful of words the task uses; without
# it both vocabularies would be nearly the byte alphabet and differ only in special-token ids.
FILLER_TEXT = (
    "You are a helpful assistant. Think step by step before you answer the question.\n"
    "Add the numbers digit by digit, starting from the ones place, and carry the tens.\n"
    "The sum of two numbers is the total. Check the result, then write only the final answer.\n"
    "What is the answer? The answer is a number. Reasoning comes first, the result comes last.\n"
)


# Qwen2's split pattern. transformers rebuilds a Qwen2 model's tokenizer with exactly this pipeline
# whatever tokenizer.json says, so a teacher tokenizer that uses it tokenizes the same under every
# loader (transformers 4 and 5, vLLM).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = ("qwen2", "gpt2")


def _pre_tokenizer(style: str) -> pre_tokenizers.PreTokenizer:
    digits = pre_tokenizers.Digits(individual_digits=True)
    if style == "qwen2":
        return pre_tokenizers.Sequence([
            digits,
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if style == "gpt2":
        return pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    raise ValueError(f"unknown pre-tokenizer style {style!r}; known: {PRE_TOKENIZERS}")


def _byte_level_bpe(
    vocab_size: int, special_tokens: Sequence[str], texts: Iterable[str], style: str
) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _pre_tokenizer(style)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    # Not special: decoding with skip_special_tokens (vLLM's default) must keep the think tags,
    # or nobody downstream could split the reasoning from the answer.
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in (THINK_OPEN, THINK_CLOSE)])
    return tokenizer


def _chat_texts(conversations: Iterable[list[dict[str, str]]]) -> Iterator[str]:
    """Roles and contents as plain text.

    The think tags and special tokens are whole tokens already; left in the text they would spend
    merges on their pieces.
    """
    for messages in conversations:
        for message in messages:
            yield message["role"]
            yield message["content"].replace(THINK_OPEN, "").replace(THINK_CLOSE, "")


def train_chat_tokenizer(
    conversations: Iterable[list[dict[str, str]]],
    vocab_size: int,
    special_tokens: Sequence[str] = (END_OF_TEXT, IM_START, IM_END),
    pad_token: str = END_OF_TEXT,
    model_max_length: int = 512,
    pre_tokenizer: str = "qwen2",
) -> PreTrainedTokenizerFast:
    """Train a BPE on the messages of ``conversations`` (plus filler prose), wrapped for chat.

    The order and number of ``special_tokens`` fix their ids (0, 1, 2, ...) and shift every other
    id, which is how two tokenizers are made to disagree even on the digits. ``<|im_end|>`` is eos
    because generation must stop at the end of the assistant turn; ``<|endoftext|>`` is bos and,
    unless ``pad_token`` says otherwise, pad, as in Qwen2. ``pre_tokenizer`` is "qwen2" (required
    for a Qwen2 model, see ``QWEN2_SPLIT``) or "gpt2" (GPT-2's byte-level split, for other
    families); both isolate digits.
    """
    missing = {END_OF_TEXT, IM_START, IM_END, pad_token} - set(special_tokens)
    if missing:
        raise ValueError(f"special_tokens must include {sorted(missing)}")
    corpus = [*_chat_texts(conversations), FILLER_TEXT]
    backend = _byte_level_bpe(vocab_size, special_tokens, corpus, pre_tokenizer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=END_OF_TEXT,
        eos_token=IM_END,
        pad_token=pad_token,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """Save in the layout every loader understands.

    The chat template goes inside tokenizer_config.json (not only a separate .jinja file) and the
    class is the generic fast tokenizer, so older transformers releases (the CUDA vLLM images) and
    vLLM load it the same way as this one does.
    """
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
