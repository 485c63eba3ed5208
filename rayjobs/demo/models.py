"""Tiny model configs for the demo: a Qwen2 teacher and Llama students, random-initialized.

Two architecture families on purpose: the distillation stage must not assume the student is the
teacher's shape (hidden size, depth, heads, context length and vocabulary all differ).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rayjobs.demo.tokenizers import save_tokenizer

# Embedding rows are padded to a multiple of this, as real checkpoints do (Qwen2: 151,936 rows for
# 151,665 tokens); consumers must index logits by tokenizer ids, not assume the two sizes match.
VOCAB_MULTIPLE = 64


def padded_vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    return -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def config_kwargs(shape: Mapping[str, int], vocab_size: int, ids: Mapping[str, int | None]) -> dict:
    """Config kwargs shared by both families and both worlds.

    Embeddings are tied: at this size a separate output matrix would be a large share of the
    parameters for no gain (Qwen2.5-0.5B ties them for the same reason).
    """
    return {
        "vocab_size": vocab_size,
        "hidden_size": shape["hidden_size"],
        "intermediate_size": shape["intermediate_size"],
        "num_hidden_layers": shape["num_layers"],
        "num_attention_heads": shape["num_heads"],
        "num_key_value_heads": shape["num_kv_heads"],
        "max_position_embeddings": shape["max_position_embeddings"],
        "tie_word_embeddings": True,
        **ids,
    }


def _shape_kwargs(tokenizer: PreTrainedTokenizerBase, shape: Mapping[str, int]) -> dict:
    return config_kwargs(shape, padded_vocab_size(tokenizer), special_ids(tokenizer))


def teacher_config(tokenizer: PreTrainedTokenizerBase, shape: Mapping[str, int]) -> Qwen2Config:
    """Qwen2 config from a plain shape mapping.

    ``shape`` holds hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size and
    max_position_embeddings (a recipe's shape dumped to a dict), so this module needs no recipe type.
    """
    return Qwen2Config(**_shape_kwargs(tokenizer, shape))


def student_config(tokenizer: PreTrainedTokenizerBase, shape: Mapping[str, int]) -> LlamaConfig:
    """Same ``shape`` keys as :func:`teacher_config`."""
    return LlamaConfig(**_shape_kwargs(tokenizer, shape))


def build_teacher(tokenizer: PreTrainedTokenizerBase, shape: Mapping[str, int], seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(teacher_config(tokenizer, shape))


def build_student(tokenizer: PreTrainedTokenizerBase, shape: Mapping[str, int], seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(student_config(tokenizer, shape))


def param_count(model: torch.nn.Module) -> int:
    """Tied input/output embeddings count once (``parameters()`` yields a shared tensor once)."""
    return sum(p.numel() for p in model.parameters())


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: str | Path,
               save_tok: Callable[[PreTrainedTokenizerFast, str | Path], object] = save_tokenizer) -> None:
    """HF layout in one directory: safetensors, config, generation config and the tokenizer.

    ``generation_config.json`` names ``<|im_end|>`` as eos; without it HF generate and vLLM would
    both run past the answer to ``max_tokens``. ``save_tok`` writes the tokenizer (the r1 world
    passes ``real_tokenizers.save_real_tokenizer``, which keeps the tokenizer's own chat template).
    """
    model.generation_config = GenerationConfig(do_sample=False, **special_ids(tokenizer))
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tok(tokenizer, out_dir)
