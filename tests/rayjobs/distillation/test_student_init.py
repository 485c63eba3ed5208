"""A student derived from the teacher (issue #21 item 1): which blocks and channels are kept, that it
is a plain HF model, the CLI and config, and that it starts below a random student's held-out loss."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from cluster.errors import ConfigError
from rayjobs.distillation.student_init import init_student, mlp_channels, select_layers


def test_student_init_layer_selection():
    assert select_layers(4, None, None) == [0, 2]
    assert select_layers(6, 3, None) == [0, 3]
    assert select_layers(4, None, [3, 0, 3]) == [0, 3]
    with pytest.raises(ConfigError, match="student_init.layers"):
        select_layers(4, None, [4])


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_student_init_keeps_the_chosen_blocks_embeddings_norm_and_head(tiny_pair, tmp_path):
    from transformers import AutoTokenizer

    report = init_student(tiny_pair["teacher"], tmp_path / "s", every_nth=2)
    teacher, student = _load(tiny_pair["teacher"]), _load(tmp_path / "s")
    assert report["layers"] == [0, 2] and student.config.num_hidden_layers == 2 == len(student.model.layers)
    assert report["parameters"] < report["teacher_parameters"]
    t, s = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 2]):
        for key in [k for k in s if k.startswith(f"model.layers.{new}.")]:
            assert torch.equal(s[key], t[key.replace(f"layers.{new}.", f"layers.{old}.")]), key
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s[key], t[key])
    tok = AutoTokenizer.from_pretrained(tmp_path / "s")
    assert tok.chat_template and tok.get_vocab() == AutoTokenizer.from_pretrained(tiny_pair["teacher"]).get_vocab()
    ids = tok("What is 12 + 30?", return_tensors="pt")["input_ids"]
    out = student.generate(ids, max_new_tokens=4, do_sample=False)  # the KV cache is indexed by the new block numbers
    assert out.shape[1] == ids.shape[1] + 4


def test_student_init_narrows_the_mlp_to_its_strongest_channels(tiny_pair, tmp_path):
    teacher = _load(tiny_pair["teacher"])
    expected = mlp_channels(teacher.model.layers[3].mlp, 0.25)
    init_student(tiny_pair["teacher"], tmp_path / "s", layers=[1, 3], mlp_keep=0.25)
    student = _load(tmp_path / "s")
    assert student.config.intermediate_size == 32 == expected.numel()
    mlp, ref = student.model.layers[1].mlp, teacher.model.layers[3].mlp
    assert torch.equal(mlp.up_proj.weight, ref.up_proj.weight[expected])
    assert torch.equal(mlp.gate_proj.weight, ref.gate_proj.weight[expected])
    assert torch.equal(mlp.down_proj.weight, ref.down_proj.weight[:, expected])
    score = ref.down_proj.weight.norm(dim=0) * ref.up_proj.weight.norm(dim=1) * ref.gate_proj.weight.norm(dim=1)
    dropped = torch.ones(score.numel(), dtype=torch.bool)
    dropped[expected] = False
    assert score[expected].min() >= score[dropped].max()


def _config(tmp_path, teacher: str, student_init: dict, student: str | None = None):
    output = str(tmp_path / "derived")
    cfg = {"name": "init", "generation": {"teacher": teacher, "input": {"path": str(tmp_path / "in.jsonl")},
                                          "output": str(tmp_path / "gen")},
           "distillation": {"student": student or output, "output": str(tmp_path / "out"),
                            "student_init": {"output": output, **student_init}}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_student_init_cli_builds_it_from_the_config(tiny_pair, tmp_path, capsys):
    from rayjobs.cli import main

    path = _config(tmp_path, tiny_pair["teacher"], {"layers": [3], "mlp_keep": 0.5})
    assert main(["student", "init", str(path)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["layers"] == [3] and report["intermediate_size"] == 64
    assert _load(tmp_path / "derived").config.num_hidden_layers == 1


def test_student_init_config_names_the_student_it_builds(tiny_pair, tmp_path, capsys):
    from rayjobs.cli import main

    path = _config(tmp_path, tiny_pair["teacher"], {"every_nth": 2}, student=tiny_pair["student"])
    assert main(["config", "validate", str(path)]) == 2
    assert "must name distillation.student_init.output" in capsys.readouterr().err
    path = _config(tmp_path, tiny_pair["teacher"], {"every_nth": 2, "layers": [0]})
    assert main(["config", "validate", str(path)]) == 2


@pytest.mark.slow  # builds the tiny demo world (about a minute)
def test_student_init_starts_below_a_random_student_on_the_demo_teacher(tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayjobs.demo.evaluate import heldout_ce
    from rayjobs.demo.task import read_prompts_jsonl

    init_student(str(tiny_world.teacher), tmp_path / "derived", every_nth=2)
    derived = _load(tmp_path / "derived")
    torch.manual_seed(0)
    random = AutoModelForCausalLM.from_config(derived.config).eval()  # same shape, fresh weights
    tok = AutoTokenizer.from_pretrained(tiny_world.teacher)
    records = read_prompts_jsonl(tiny_world.heldout_jsonl)
    losses = {name: heldout_ce(model, tok, records)
              for name, model in (("teacher", _load(tiny_world.teacher)), ("derived", derived), ("random", random))}
    print(f"held-out CE on {len(records)} prompts: {losses}")
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["derived"] < losses["random"]
