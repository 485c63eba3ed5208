"""A smaller student derived from the teacher (``raystill student init``, ``distillation.student_init``).

Why: a student that starts from the teacher's own weights starts where the teacher's knowledge is,
not at random (DistilBERT kept every other layer; Minitron pruned depth and width). Same
architecture family and tokenizer as the teacher, so every loss applies and KD needs no
vocabulary map.

What is kept: the teacher's embeddings, final norm and head, and the chosen decoder blocks whole
(attention, MLP, their norms), renumbered in order. Optionally each kept block's MLP is narrowed
to the ``mlp_keep`` share of its channels, keeping the channels of largest magnitude: a channel
``j`` of a gated MLP is row ``j`` of ``gate_proj`` and ``up_proj`` and column ``j`` of ``down_proj``,
scored by the product of their L2 norms (a channel whose input or output weights are small
contributes little to any output). The result is a plain HF model directory (``config.json``,
safetensors, the teacher's tokenizer and chat template): it loads in transformers and vLLM like
any student.

Decoder-only models whose blocks sit at ``model.model.layers`` (Llama, Qwen2, Mistral, Gemma, ...)
are supported; others are refused naming the knob. Pure torch/transformers, no Ray.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cluster.errors import ConfigError


def select_layers(num_layers: int, every_nth: int | None, layers: list[int] | None) -> list[int]:
    """The teacher blocks to keep, in order: the explicit list, or blocks 0, n, 2n, ... (DistilBERT's choice)."""
    if layers:
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(f"distillation.student_init.layers {bad} are outside the teacher's {num_layers} blocks "
                              f"(0..{num_layers - 1})")
        return sorted(set(layers))
    return list(range(0, num_layers, every_nth or 2))


def mlp_channels(mlp, keep: float) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` share of a gated MLP's channels with the largest magnitude score."""
    score = mlp.down_proj.weight.norm(dim=0) * mlp.up_proj.weight.norm(dim=1)
    if hasattr(mlp, "gate_proj"):
        score = score * mlp.gate_proj.weight.norm(dim=1)
    count = max(1, round(keep * score.numel()))
    return torch.topk(score, count).indices.sort().values


def _slice_linear(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> torch.nn.Linear:
    weight = linear.weight.index_select(dim, index)
    out = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias if dim == 1 else linear.bias.index_select(0, index))
    return out


def narrow_mlp(mlp, keep: float) -> int:
    """Narrow one MLP in place to its strongest channels; returns the new width."""
    index = mlp_channels(mlp, keep)
    for name in ("gate_proj", "up_proj"):
        if hasattr(mlp, name):
            setattr(mlp, name, _slice_linear(getattr(mlp, name), index, 0))
    mlp.down_proj = _slice_linear(mlp.down_proj, index, 1)
    return int(index.numel())


def derive_student(teacher, layers: list[int], mlp_keep: float | None = None):
    """The teacher model cut down in place to ``layers`` (and narrower MLPs); returns it."""
    inner = getattr(teacher, "model", None)
    blocks = getattr(inner, "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ConfigError(f"distillation.student_init: {type(teacher).__name__} has no decoder blocks at "
                          "model.layers (supported: Llama, Qwen2, Mistral and other decoder-only families)")
    kept = torch.nn.ModuleList(blocks[i] for i in layers)
    for new_index, block in enumerate(kept):
        if hasattr(getattr(block, "self_attn", None), "layer_idx"):
            block.self_attn.layer_idx = new_index  # the KV cache is indexed by it
    inner.layers = kept
    config = teacher.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    config.num_hidden_layers = len(layers)
    if mlp_keep is not None and mlp_keep < 1.0:
        widths = {narrow_mlp(block.mlp, mlp_keep) for block in kept}
        config.intermediate_size = widths.pop()
    return teacher


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def init_student(teacher_dir: str, out_dir: str | Path, *, every_nth: int | None = None,
                 layers: list[int] | None = None, mlp_keep: float | None = None) -> dict:
    """Write the derived student to ``out_dir`` (a local directory); returns what was kept."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayjobs.distillation.lora import save_hf

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    teacher_layers, teacher_params = teacher.config.num_hidden_layers, parameter_count(teacher)
    chosen = select_layers(teacher_layers, every_nth, layers)
    student = derive_student(teacher, chosen, mlp_keep)
    save_hf(student, AutoTokenizer.from_pretrained(teacher_dir), out_dir)
    return {"teacher": teacher_dir, "output": str(out_dir), "teacher_layers": teacher_layers, "layers": chosen,
            "intermediate_size": student.config.intermediate_size, "teacher_parameters": teacher_params,
            "parameters": parameter_count(student)}
