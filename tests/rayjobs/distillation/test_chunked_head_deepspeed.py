"""The chunked head inside real DeepSpeed engines (one process, CPU): ZeRO 0-3, tied and untied
embeddings, LoRA, bf16, and a ZeRO-3-sharded online teacher.

Each case builds two engines from the same student (``worker._build_engine``, the trainer's own
code) and trains both for three optimizer steps on the same batches of stored top-k KD: one with
the unchunked head and ``distill_loss`` on full logits, one with ``batch_loss.BatchLoss`` (the
chunked head). Equal losses at every step mean the head and hidden-state gradients reached the
optimizer intact, including for a head weight that ZeRO-3 partitions between uses.
"""

from __future__ import annotations

import pytest
import torch

from cluster.ports import free_port

pytestmark = pytest.mark.slow

VOCAB, STEPS = 1000, 3


@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    """DeepSpeed initializes torch.distributed from these on first use (world of one)."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield


def _student(root, tied: bool) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=tied))
    path = root / f"student-{'tied' if tied else 'untied'}"
    model.save_pretrained(path)
    return str(path)


def _batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, 24), generator=g)
        labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
        labels[:, :5] = -100
        topk_ids = torch.randint(0, VOCAB, (2, 24, 4), generator=g)
        logprobs = torch.log_softmax(torch.randn(2, 24, 5, generator=g), -1)[..., :4].sort(-1, True).values
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                    "teacher_ids": topk_ids, "teacher_logprobs": logprobs,
                    "teacher_mask": torch.ones(2, 24, dtype=torch.bool), "num_tokens": torch.tensor(48)})
    return out


def _train(cfg, student_dir: str, chunked: bool) -> tuple[list[float], dict]:
    from rayjobs.distillation import batch_loss, worker
    from rayjobs.distillation.losses import TopKTeacher, distill_loss

    loss = batch_loss.BatchLoss(cfg, STEPS)
    parts = batch_loss.WorkerLoss(loss, None, None, None)
    engine, _ = worker._build_engine(cfg, student_dir, STEPS, 1, parts)
    losses = []
    for step, batch in enumerate(_batches(STEPS)):
        if chunked:
            out = loss(engine, batch, step)
        else:
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            teacher = TopKTeacher(batch["teacher_ids"], batch["teacher_logprobs"], batch["teacher_mask"])
            out = distill_loss(logits, batch["labels"], teacher, loss.settings_at(step))
        engine.backward(out.total)
        engine.step()
        losses.append(out.total.item())
    weights = worker._gathered_state_dict(engine, cfg.deepspeed.zero_stage, 0)
    engine.destroy()
    return losses, weights


CASES = [{"stage": s, "tied": t} for s in (0, 1, 2, 3) for t in (True, False)]
CASES += [{"stage": 2, "tied": True, "lora": True}, {"stage": 3, "tied": True, "lora": True},
          {"stage": 3, "tied": False, "lora": True}, {"stage": 3, "tied": True, "precision": "bf16"},
          {"stage": 2, "tied": False, "precision": "bf16"}]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_chunked_training_equals_unchunked(tmp_path_factory, case):
    from rayjobs.distillation.config import DistillationConfig

    root = tmp_path_factory.mktemp("students")
    student_dir = _student(root, case["tied"])
    lora = {"enabled": True, "r": 4, "modules_to_save": ["embed_tokens"] if case["tied"] else ["lm_head"]} \
        if case.get("lora") else {}
    precision = case.get("precision", "fp32")
    cfg = DistillationConfig.model_validate({
        "student": student_dir, "output": str(root / "out"),
        "loss": {"kind": "logit", "chunk_tokens": 8, "temperature": 1.5},
        "optim": {"lr": 1e-2, "micro_batch_size": 2, "warmup_ratio": 0.0, "schedule": "constant"},
        "deepspeed": {"zero_stage": case["stage"], "precision": precision}, "lora": lora,
    })
    ref_losses, ref_weights = _train(cfg, student_dir, chunked=False)
    losses, weights = _train(cfg, student_dir, chunked=True)
    tol = 1e-5 if precision == "fp32" else 2e-2
    assert losses == pytest.approx(ref_losses, rel=tol)
    trained = [k for k in weights if ("lm_head" in k or "embed_tokens" in k)
               and (not case.get("lora") or "modules_to_save" in k)]
    assert trained
    # Adam turns gradient rounding on near-zero entries into steps of up to lr (1e-2 here), in bf16
    # on a few dozen entries: compared as a whole, the head moved the same way. A missing head
    # update (3 steps of ~lr on every entry) would be a difference of the size of the weights.
    for k in trained:
        got, want = weights[k].float(), ref_weights[k].float()
        if precision == "fp32":
            torch.testing.assert_close(got, want, rtol=tol, atol=1e-4)
        else:
            assert float((got - want).norm() / want.norm()) < 0.05


def test_zero3_sharded_teacher_gives_its_logits_chunk_by_chunk(tiny_pair, online_batch):
    from rayjobs.distillation.config import TeacherConfig
    from rayjobs.distillation.online_teacher import OnlineTeacher, load_teacher
    from rayjobs.distillation.xtok import gather_positions

    s_tok, t_tok, _, batch = online_batch("student_same")
    plain = load_teacher(tiny_pair["teacher"], TeacherConfig(), eager_attention=False, device="cpu")
    full = plain(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    sharded = load_teacher(tiny_pair["teacher"], TeacherConfig(shard="zero3"), eager_attention=False, device="cpu")
    teacher = OnlineTeacher(sharded, s_tok, t_tok, online_topk=8, with_attention=False)
    out = teacher.run(batch, "cpu")
    with teacher.head() as head:
        assert head.weight.shape == (full.shape[-1], plain.config.hidden_size)  # gathered whole
        dense = teacher.logit_teacher(out, batch["align_index"], full.shape[-1], head, chunk_tokens=5)
        made = dense.chunk(0, len(batch["input_ids"])).logits
    assert head.weight.numel() == 0  # partitioned again
    torch.testing.assert_close(made, gather_positions(full, batch["align_index"]), rtol=1e-4, atol=1e-4)
