"""Training-only regularizers: Gaussian noise on the student's features, model dropout.

Pure torch (no engine import). Both act only while the module trains: the noise is added where
the batch loss says it trains (``BatchLoss`` passes ``sigma = 0`` in validation), the dropout is
``nn.functional.dropout(training=module.training)``, off under ``engine.eval()``. Neither reaches
the merged model: the export reloads the student's own config (``lora.export_student``) and
hooks are not weights.
"""

from __future__ import annotations

import torch
from torch import nn

# HF config names of the attention-probability dropout, by architecture family.
ATTENTION_DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")
# Attribute names of the transformer-block list (Llama/Qwen2 ``model.layers``, GPT-2 ``transformer.h``).
BLOCK_LIST_NAMES = ("layers", "h", "blocks", "block")


def feature_noise(hidden: torch.Tensor, sigma: float) -> torch.Tensor:
    """``hidden`` plus ``N(0, (sigma * rms)^2)`` per element, rms of each hidden vector (detached).

    Relative noise: a layer whose states are 100x larger gets 100x the noise, so one sigma means
    the same perturbation for every layer pair and width. ``sigma = 0`` returns ``hidden`` itself.
    """
    if sigma == 0:
        return hidden
    rms = hidden.detach().pow(2).mean(-1, keepdim=True).sqrt()
    return hidden + torch.randn_like(hidden) * rms * sigma


def attention_dropout_kwargs(config, p: float) -> dict[str, float]:
    """``from_pretrained`` config overrides that set the attention dropout to ``p`` (none for 0).

    Attention modules copy the rate at construction, so it is set on the config the model is built
    from. Raises naming ``distillation.dropout.attention`` when the architecture has no such knob.
    """
    if p == 0:
        return {}
    for key in ATTENTION_DROPOUT_KEYS:
        if hasattr(config, key):
            return {key: p}
    raise ValueError(f"distillation.dropout.attention: {type(config).__name__} has none of "
                     f"{list(ATTENTION_DROPOUT_KEYS)}; set it to 0")


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the ``ModuleList`` named like HF decoders name them (``model.layers``,
    ``transformer.h``, ``blocks``), the same names ``schedule.layer_id`` reads block indices from."""
    lists = [m for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES]
    if len(lists) != 1:
        raise ValueError(f"distillation.dropout.hidden: found {len(lists)} block lists named one of "
                         f"{list(BLOCK_LIST_NAMES)} in the student, need exactly one")
    return lists[0]


def add_hidden_dropout(model: nn.Module, p: float) -> int:
    """Dropout on each block's output hidden states while training; returns the blocks hooked."""
    def hook(module, _inputs, output):
        if isinstance(output, tuple):
            return (nn.functional.dropout(output[0], p, module.training), *output[1:])
        return nn.functional.dropout(output, p, module.training)

    blocks = _blocks(model)
    for block in blocks:
        block.register_forward_hook(hook)
    return len(blocks)
