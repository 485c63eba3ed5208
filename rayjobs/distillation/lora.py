"""LoRA adapters (peft) and the export of a trained student as a plain HF model directory.

The export is the same for LoRA and full fine-tuning: a fresh copy of the base model is built,
the trained weights (a full, gathered state dict) are loaded into it, LoRA adapters are merged
into the base weights, and the result is saved as safetensors + config + generation config +
tokenizer with its chat template: the layout transformers and vLLM load without peft.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cluster.storage import write_json
from rayjobs.distillation.config import LoraConfig


def apply_lora(model: PreTrainedModel, cfg: LoraConfig):
    """Wrap ``model`` in a peft LoRA model; only adapter weights stay trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    target = cfg.target_modules if cfg.target_modules == "all-linear" else list(cfg.target_modules)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target,
        modules_to_save=list(cfg.modules_to_save) or None,
        # A trained copy of tied input embeddings must stay tied to the output head.
        ensure_weight_tying=any("embed" in m or "lm_head" in m for m in cfg.modules_to_save),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def load_model(model_dir: str, **kwargs) -> PreTrainedModel:
    """Every model raystill loads with transformers: weights from safetensors only, since a pickled
    ``.bin`` (or a checkpoint's pickle) runs code while it loads."""
    return AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, **kwargs)


def load_student(model_dir: str, dtype: torch.dtype | str = torch.float32,
                 attn_implementation: str | None = None, **config_overrides) -> PreTrainedModel:
    """``attn_implementation``: None for transformers' default, ``"eager"`` to get attention probabilities.
    ``config_overrides``: model config fields for this load only (training dropout)."""
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return load_model(model_dir, dtype=dtype, **kwargs, **config_overrides)


def build_export_model(
    base_dir: str, state_dict: Mapping[str, torch.Tensor], lora: LoraConfig | None
) -> PreTrainedModel:
    """The base model with the trained weights loaded and, for LoRA, the adapters merged in.

    ``state_dict`` uses the training module's names (``base_model.model...`` under peft). Loading
    is strict: a missing or unexpected key means the export would silently drop training.
    """
    model = load_model(base_dir, dtype="auto")
    if lora is not None and lora.enabled:
        model = apply_lora(model, lora)
        model.load_state_dict(dict(state_dict), strict=True)
        model = model.merge_and_unload()
    else:
        model.load_state_dict(dict(state_dict), strict=True)
    return model


def save_hf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """Save model + tokenizer; replaces ``out_dir`` atomically (written beside it, then renamed).

    The chat template is written inside ``tokenizer_config.json`` as well as the default
    ``chat_template.jinja``, so older transformers releases and vLLM builds find it.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if tokenizer.chat_template:
        config_path = tmp / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = tokenizer.chat_template
        write_json(str(config_path), config)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def export_student(
    base_dir: str, state_dict: Mapping[str, torch.Tensor], lora: LoraConfig | None, out_dir: str | Path
) -> Path:
    """Merge and save in one call; returns the directory written."""
    model = build_export_model(base_dir, state_dict, lora)
    save_hf(model, AutoTokenizer.from_pretrained(base_dir), out_dir)
    return Path(out_dir)
