"""Config loading, overrides and error messages: pure, milliseconds."""

from pathlib import Path

import pytest
import yaml

from rayjobs.cli import main
from cluster.errors import ConfigError
from rayjobs.config import PipelineConfig, apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "configs" / "demo.yaml"


def _write(tmp_path, data) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("path", sorted((ROOT / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_validates(path):
    assert isinstance(load_config(path), PipelineConfig)


def test_cross_stage_defaults_are_filled():
    cfg = load_config(DEMO)
    assert cfg.generation.student_tokenizer == cfg.distillation.student
    assert cfg.generation.student_max_len == cfg.distillation.max_seq_len
    assert cfg.distillation.data == cfg.generation.output
    assert cfg.serving.model.endswith("merged")


def test_online_teacher_defaults_to_the_generation_teacher():
    cfg = load_config(DEMO, ["distillation.loss.kind=feature"])
    assert cfg.distillation.teacher.model == cfg.generation.teacher
    assert cfg.distillation.online_teacher
    assert not load_config(DEMO).distillation.online_teacher


def test_overrides_parse_yaml_scalars():
    cfg = load_config(DEMO, ["distillation.optim.lr=1e-4", "distillation.lora.enabled=true",
                             "distillation.lora.target_modules=[q_proj, v_proj]", "cluster.address=null"])
    assert cfg.distillation.optim.lr == pytest.approx(1e-4)
    assert cfg.distillation.lora.enabled is True
    assert cfg.distillation.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.cluster.address is None


def test_override_creates_missing_sections():
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_override_does_not_mutate_input():
    data = {"a": {"b": 1}}
    apply_overrides(data, ["a.b=2"])
    assert data == {"a": {"b": 1}}


@pytest.mark.parametrize(
    "override, needle",
    [
        (["distillation.optim.lrr=1"], "distillation.optim.lrr: unknown key"),
        (["generation.sampling.n=abc"], "generation.sampling.n: Input should be a valid integer"),
        (["generation.output=gs://bucket/x"], "generation.output: unsupported scheme 'gs://'"),
        (["distillation.deepspeed.offload_params=true", "distillation.deepspeed.zero_stage=2"],
         "offload_params requires zero_stage 3"),
        (["name=has space"], "name: String should match pattern"),
        (["name.x=1"], "'name' is a value, not a section"),
        (["nokey"], "expected PATH=VALUE"),
        (["distillation.loss.schedule.stage1_steps=5"], "distillation.loss: schedule.stage1_steps needs kind 'feature'"),
        (["distillation.loss.schedule.temperature_start=2"],
         "distillation.loss.schedule: temperature_start and temperature_end go together"),
        (["distillation.loss.kind=feature", "distillation.optim.packing=true"],
         "distillation: optim.packing is not supported with an online teacher"),
        (["distillation.teacher.offload=true"], "distillation.teacher: offload requires shard 'zero3'"),
        (["distillation.loss.xtok.method=sorted"], "distillation.loss.xtok.method: Input should be 'vocab_map' or 'uld'"),
        (["distillation.context_policy=cut"], "distillation.context_policy: Input should be 'truncate' or 'drop'"),
        (["generation.preprocess.checker=numerc"],
         "generation.preprocess.checker: unknown checker 'numerc'; known: exact, numeric"),
        (["distillation.loss.feature.layer_map=[[1, 2, 3]]"], "distillation.loss.feature.layer_map.0"),
    ],
)
def test_bad_values_name_file_and_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, override)
    assert needle in str(e.value)


def test_missing_required_field(tmp_path):
    data = yaml.safe_load(DEMO.read_text())
    del data["distillation"]["student"]
    with pytest.raises(ConfigError, match=r"cfg.yaml: distillation.student: required field is missing"):
        load_config(_write(tmp_path, data))


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ngeneration: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML at line \d+"):
        load_config(p)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/raystill.yaml")


def test_s3_locations_accepted():
    cfg = load_config(DEMO, ["generation.output=s3://bucket/gen", "runs_root=s3://bucket/runs"])
    assert cfg.run_dir == "s3://bucket/runs/demo"


def test_digest_changes_with_config():
    assert load_config(DEMO).digest() != load_config(DEMO, ["distillation.seed=1"]).digest()


def test_distillation_digest_ignores_serving():
    from rayjobs.config import DISTILL_DIGEST_EXCLUDE

    base, served = load_config(DEMO), load_config(DEMO, ["serving.port=9000"])
    assert base.digest() != served.digest()
    assert base.digest(exclude=DISTILL_DIGEST_EXCLUDE) == served.digest(exclude=DISTILL_DIGEST_EXCLUDE)


def test_cli_validate_ok_and_broken(tmp_path, capsys):
    assert main(["config", "validate", str(DEMO)]) == 0
    assert "OK" in capsys.readouterr().out
    data = yaml.safe_load(DEMO.read_text())
    data["generation"]["sampling"]["temperature"] = "hot"
    broken = _write(tmp_path, data)
    assert main(["config", "validate", str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "generation.sampling.temperature" in err[0] and "Traceback" not in err[0]


def test_cli_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", str(DEMO), "--set", "serving.port=9000"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["serving"]["port"] == 9000
    assert shown["distillation"]["data"] == shown["generation"]["output"]


def test_config_from_environment(monkeypatch):
    monkeypatch.setenv("RAYSTILL_CONFIG_YAML", DEMO.read_text())
    assert load_config("env:RAYSTILL_CONFIG_YAML").name == "demo"
    with pytest.raises(ConfigError, match="environment variable not set"):
        load_config("env:RAYSTILL_NO_SUCH_VAR")


def test_every_config_field_is_described():
    from rayjobs.config import leaf_fields

    fields = leaf_fields()
    assert len(fields) > 100
    assert [path for path, description in fields if not description] == []


def test_config_show_explain_prints_each_field_with_its_value(capsys):
    from rayjobs.cli import main

    assert main(["config", "show", str(ROOT / "examples" / "configs" / "demo.yaml"), "--explain",
                 "--set", "generation.sampling.max_new_tokens=77"]) == 0
    out = capsys.readouterr().out
    assert "generation.sampling.max_new_tokens: 77\n    Teacher tokens per sample" in out
    assert "serving.kv_cache_gib: null" in out


def test_eval_checker_is_checked_at_load():
    from rayjobs.distillation.config import EvalConfig

    assert EvalConfig(checker="numeric").checker == "numeric"
    with pytest.raises(ValueError, match=r"unknown checker 'numerc'; known: \['exact', 'numeric'"):
        EvalConfig(checker="numerc")


def test_trust_remote_code_is_one_top_level_switch():
    base = {"name": "t", "generation": {"teacher": "t", "input": {"path": "in.jsonl"}, "output": "o"},
            "distillation": {"student": "s", "output": "d"}}
    assert PipelineConfig.model_validate({**base, "trust_remote_code": True}).serving.trust_remote_code
    with pytest.raises(ValueError, match="trust_remote_code: true at the top"):
        PipelineConfig.model_validate({**base, "serving": {"trust_remote_code": True}})


def test_config_show_says_no_generation_kv_cache_when_samples_are_supplied(capsys):
    from rayjobs.cli import main

    assert main(["config", "show", str(ROOT / "examples" / "configs" / "demo.yaml"),
                 "--set", "generation.input.response_field=answer", "--set", "generation.sampling.logprobs_topk=0",
                 "--set", "distillation.loss.kind=data"]) == 0
    out = capsys.readouterr().out
    assert "# generation.engine.kv_cache_gib: unused, the samples are supplied (answer)" in out
