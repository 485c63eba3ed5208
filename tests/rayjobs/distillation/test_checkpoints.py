import json
from types import SimpleNamespace

import pytest

from rayjobs.distillation.checkpoints import LayoutChanged
from rayjobs.distillation.config import DistillationConfig
from rayjobs.distillation.checkpoints import (
    LAYOUT_FILE,
    STATE_FILE,
    TrainerState,
    check_layout,
    checkpoint_layout,
    layout_changes,
    read_trainer_state,
)


def _d(**over) -> DistillationConfig:
    return DistillationConfig(**{"student": "s", "output": "/tmp/out", **over})


def test_only_settings_that_shape_the_checkpoint_count():
    base = checkpoint_layout(_d())
    assert checkpoint_layout(_d(optim={"lr": 0.1, "max_steps": 9}, loss={"kind": "logit", "alpha": 0.9})) == base
    assert checkpoint_layout(_d(loss={"kind": "feature"})) != base
    assert checkpoint_layout(_d(lora={"enabled": True})) != base
    assert checkpoint_layout(_d(optim={"layerwise_lr_decay": 0.8})) != base  # other optimizer groups (#17 item 13)
    assert checkpoint_layout(_d(optim={"layerwise_lr_decay": 0.8})) == checkpoint_layout(_d(optim={"layerwise_lr_decay": 0.5}))
    assert checkpoint_layout(_d(lora={"enabled": False, "r": 4})) == base  # r means nothing without LoRA
    lora = checkpoint_layout(_d(lora={"enabled": True}))
    assert checkpoint_layout(_d(lora={"enabled": True, "alpha": 64, "dropout": 0.1})) == lora  # no new shapes
    assert checkpoint_layout(_d(lora={"enabled": True, "r": 8})) != lora
    feature = checkpoint_layout(_d(loss={"kind": "feature"}))
    assert checkpoint_layout(_d(loss={"kind": "feature", "feature": {"hidden_weight": 3.0}})) == feature
    assert checkpoint_layout(_d(loss={"kind": "feature", "feature": {"layer_map": [[1, 2]]}})) != feature
    assert layout_changes(base, checkpoint_layout(_d(scaling={"num_workers": 2}))) == ["num_workers: 1 -> 2"]


def _checkpoint(run_dir):
    (run_dir / "checkpoint_000").mkdir(parents=True)
    (run_dir / "checkpoint_000" / STATE_FILE).write_text("{}")


def test_a_changed_layout_is_refused_while_checkpoints_exist(tmp_path):
    run_dir = tmp_path / "run"
    check_layout(str(run_dir), checkpoint_layout(_d()), "run")
    assert json.loads((run_dir / LAYOUT_FILE).read_text())["lora"] is None
    _checkpoint(run_dir)
    check_layout(str(run_dir), checkpoint_layout(_d(optim={"lr": 0.5})), "run")  # same layout: resumes
    with pytest.raises(LayoutChanged, match=r"lora: None -> \{.*delete .*run to start over"):
        check_layout(str(run_dir), checkpoint_layout(_d(lora={"enabled": True})), "run")


def test_a_run_that_never_checkpointed_takes_the_new_layout(tmp_path):
    run_dir = tmp_path / "run"
    check_layout(str(run_dir), checkpoint_layout(_d()), "run")
    check_layout(str(run_dir), checkpoint_layout(_d(deepspeed={"zero_stage": 3})), "run")
    assert json.loads((run_dir / LAYOUT_FILE).read_text())["zero_stage"] == 3


def test_checkpoints_older_than_the_layout_file_get_no_layout_claimed(tmp_path):
    run_dir = tmp_path / "run"
    _checkpoint(run_dir)
    check_layout(str(run_dir), checkpoint_layout(_d(lora={"enabled": True})), "run")
    assert not (run_dir / LAYOUT_FILE).exists()


def test_trainer_state_reads_back_from_where_the_checkpoint_is_stored(tmp_path):
    from pyarrow import fs

    state = TrainerState(step=4, epoch=1, batches_in_epoch=3, tokens=99, attempt=1, restored_from=[2],
                         history=[{"step": 4, "loss": 1.5}], final={"loss": 1.5})
    state.save(str(tmp_path))
    checkpoint = SimpleNamespace(filesystem=fs.LocalFileSystem(), path=str(tmp_path))  # as ray.train.Checkpoint
    assert TrainerState(**read_trainer_state(checkpoint)) == state
