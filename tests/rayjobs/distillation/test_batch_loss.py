"""rayjobs.distillation.batch_loss wired for a worker without Ray: schedules, stored vs online teacher, features."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rayjobs.distillation import batch_loss
from rayjobs.distillation.config import DistillationConfig
from rayjobs.distillation.feature_losses import DistillModule, FeatureLossOutput


class Engine(torch.nn.Module):
    """What the loss needs of a DeepSpeed engine: ``device``, ``module`` and a forward."""

    device = torch.device("cpu")

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


def _cfg(**kw) -> DistillationConfig:
    return DistillationConfig.model_validate({"student": "s", "output": "o", **kw})


def test_temperature_ramp_and_stages_show_in_the_curve_columns():
    loss = batch_loss.BatchLoss(_cfg(loss={"kind": "logit", "schedule": {"temperature_start": 3.0,
                                                                         "temperature_end": 1.0}}), total_steps=5)
    assert [loss.settings_at(s).temperature for s in range(5)] == pytest.approx([3.0, 2.5, 2.0, 1.5, 1.0])
    assert loss.schedule_row(0) == {"temperature": 3.0}
    assert loss.terms == ("loss", "ce", "kd")
    assert batch_loss.BatchLoss(_cfg(), 5).schedule_row(0) == {}


def test_layer_map_errors_name_the_field():
    with pytest.raises(ValueError, match="distillation.loss.feature.layer_map: .*outside"):
        batch_loss.feature_settings(_cfg(loss={"kind": "feature", "feature": {"layer_map": [[5, 1]]}}), 2, 4)


def _columns(tok, rows, with_topk=False):
    """Stored rows for a same-tokenizer teacher: verbatim tokens, top-1 = the token itself."""
    from datasets_pipeline.targets import build_student_example

    cols = {k: [] for k in ("input_ids", "prompt_len", "teacher_offset", "messages", "completion", "topk_k",
                            "topk_ids", "topk_logprobs")}
    for row in rows:
        target = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ex = build_student_example(tok, row["messages"], row["completion"], "", target, reasoning_policy="keep",
                                   max_len=512, aligned_vocab=True)
        cols["input_ids"].append(np.asarray(ex.input_ids, np.int32))
        cols["prompt_len"].append(ex.prompt_len)
        cols["teacher_offset"].append(ex.teacher_offset)
        cols["messages"].append(json.dumps(row["messages"]))
        cols["completion"].append(row["completion"])
        cols["topk_k"].append(2)
        cols["topk_ids"].append(np.asarray([[t, (t + 1) % len(tok)] for t in target], np.int32).reshape(-1))
        cols["topk_logprobs"].append(np.log(np.tile([0.9, 0.05], len(target))).astype(np.float16))
    return cols


@pytest.mark.parametrize("method", ["vocab_map", "uld"])
def test_stored_topk_loss(tiny_pair, tiny_rows, method):
    tok = AutoTokenizer.from_pretrained(tiny_pair["student_same"])
    cfg = _cfg(loss={"kind": "logit", "xtok": {"method": method}})
    parts = batch_loss.build(cfg, 4, tok, AutoConfig.from_pretrained(tiny_pair["student_same"]), 128, None)
    assert parts.projector is None
    batch = parts.collate(_columns(tok, tiny_rows))
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["student_same"])
    out = parts.loss(Engine(model), batch, 0)
    out.total.backward()
    assert out.kd > 0 and out.num_kd_tokens > 0 and torch.isfinite(out.total)


@pytest.mark.parametrize("attention", [0.0, 0.5])
def test_online_feature_loss_through_build(tiny_pair, tiny_rows, attention):
    s_dir, t_dir = tiny_pair["student"], tiny_pair["teacher"]
    s_tok, t_tok = AutoTokenizer.from_pretrained(s_dir), AutoTokenizer.from_pretrained(t_dir)
    cfg = _cfg(loss={"kind": "feature", "feature": {"attention_weight": attention},
                     "schedule": {"stage1_steps": 1}}, teacher={"model": t_dir})
    s_config = AutoConfig.from_pretrained(s_dir)
    parts = batch_loss.build(cfg, 4, s_tok, s_config, 128, t_dir, t_tok)
    assert parts.eager_attention == (attention > 0) and parts.loss.feature.pairs == ((1, 2), (2, 4))
    parts.attach_teacher(s_tok, t_tok, "cpu")
    model = AutoModelForCausalLM.from_pretrained(s_dir, attn_implementation="eager" if attention else None)
    engine = Engine(DistillModule(model, parts.projector))
    cols = _columns(s_tok, tiny_rows)
    batch = parts.collate({k: cols[k] for k in ("input_ids", "prompt_len", "teacher_offset", "messages",
                                                "completion")})
    stage1, stage2 = parts.loss(engine, batch, 0), parts.loss(engine, batch, 1)
    assert isinstance(stage2, FeatureLossOutput) and stage1.kd == 0 and stage2.kd > 0
    assert (stage2.attention > 0) == (attention > 0)
    stage2.total.backward()
    assert all(p.grad is not None for p in parts.projector.parameters())
    assert parts.loss.schedule_row(0) == {"stage": 1} and parts.loss.terms[-2:] == ("hidden", "attention")


def test_progressive_layer_schedule_from_config_shows_in_the_curve_columns():
    every = _cfg(loss={"kind": "feature", "feature": {"progressive": {"every": 3}}})
    settings = batch_loss.feature_settings(every, 2, 4)
    assert settings.pairs == ((1, 2), (2, 4)) and settings.start_steps == (0, 3)
    loss = batch_loss.BatchLoss(every, 10, feature=settings)
    assert [loss.schedule_row(s)["layer_pairs"] for s in (0, 2, 3, 9)] == [1, 1, 2, 2]
    explicit = _cfg(loss={"kind": "feature", "feature": {"layer_map": [[0, 0], [1, 2], [2, 4]],
                                                         "progressive": {"start_steps": [0, 0, 5]}}})
    assert batch_loss.feature_settings(explicit, 2, 4).start_steps == (0, 0, 5)
    with pytest.raises(ValueError, match="progressive.start_steps: 3 entries for 2 layer pairs"):
        batch_loss.feature_settings(_cfg(loss={"kind": "feature", "feature": {"progressive": {
            "start_steps": [0, 1, 2]}}}), 2, 4)
    with pytest.raises(ValueError, match="one pair starts at step 0"):
        _cfg(loss={"kind": "feature", "feature": {"progressive": {"start_steps": [1, 2]}}})


def test_temperature_phases_show_in_the_curve_columns():
    cfg = _cfg(loss={"kind": "logit", "schedule": {"temperatures": [{"until_epoch": 1, "temperature": 2.0},
                                                                    {"temperature": 1.0}]}})
    loss = batch_loss.BatchLoss(cfg, total_steps=6, steps_per_epoch=3)
    assert [loss.schedule_row(s)["temperature"] for s in range(6)] == [2.0, 2.0, 2.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="replaces temperature_start"):
        _cfg(loss={"schedule": {"temperature_start": 2.0, "temperature_end": 1.0,
                                "temperatures": [{"temperature": 1.0}]}})


def _online_parts(tiny_pair, tiny_rows, loss: dict, **kw):
    s_dir, t_dir = tiny_pair["student"], tiny_pair["teacher"]
    s_tok, t_tok = AutoTokenizer.from_pretrained(s_dir), AutoTokenizer.from_pretrained(t_dir)
    cfg = _cfg(loss=loss, teacher={"model": t_dir, "source": "online"}, **kw)
    parts = batch_loss.build(cfg, 4, s_tok, AutoConfig.from_pretrained(s_dir), 128, t_dir, t_tok)
    parts.attach_teacher(s_tok, t_tok, "cpu")
    torch.manual_seed(0)
    engine = Engine(DistillModule(AutoModelForCausalLM.from_pretrained(s_dir), parts.projector, parts.contrastive))
    cols = _columns(s_tok, tiny_rows)
    batch = parts.collate({k: cols[k] for k in ("input_ids", "prompt_len", "teacher_offset", "messages",
                                                "completion")})
    return parts, engine, batch


def test_contrastive_term_through_build_trains_the_projection(tiny_pair, tiny_rows):
    parts, engine, batch = _online_parts(tiny_pair, tiny_rows, {"kind": "logit", "contrastive": {"weight": 0.5}})
    assert parts.trained_heads and parts.projector is None and parts.loss.terms[-1] == "contrastive"
    out = parts.loss(engine, batch, 0)
    assert out.contrastive > 0 and out.total.item() == pytest.approx((out.base.total + 0.5 * out.contrastive).item())
    out.total.backward()
    assert parts.contrastive.proj.weight.grad.abs().sum() > 0  # student width 32 -> teacher width 64


def test_feature_noise_in_training_only_through_build(tiny_pair, tiny_rows):
    parts, engine, batch = _online_parts(tiny_pair, tiny_rows, {"kind": "feature", "feature": {
        "hidden_loss": "mse", "noise": {"sigma": 1.0}}})
    engine.eval()
    with torch.no_grad():
        clean = [parts.loss(engine, batch, 0).hidden.item() for _ in range(2)]
        engine.train()
        noisy = [parts.loss(engine, batch, 0).hidden.item() for _ in range(2)]
    assert clean[0] == clean[1] and noisy[0] != noisy[1] and min(noisy) > clean[0]
    assert parts.loss.schedule_row(0) == {"feature_sigma": 1.0}
