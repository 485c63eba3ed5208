"""On-policy batch assembly (rayjobs/distillation/on_policy.py): pure, milliseconds, no engines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rayjobs.distillation.batch_loss import BatchLoss
from rayjobs.distillation.collate import IGNORE_INDEX, CollateSettings, collate
from rayjobs.distillation.config import DistillationConfig
from rayjobs.distillation.on_policy import (
    OnPolicyCollate,
    OnPolicyRows,
    RolloutStats,
    chosen,
    continuation_columns,
    rows_of,
    teacher_view,
    token_budgets,
)

K = 3
EOS_S, EOS_T = 0, 100


def stored_batch(n: int = 2) -> dict:
    prompts = [[5, 6, 7], [8, 9]][:n]
    return {"input_ids": [np.asarray(p + [11, 12, EOS_S]) for p in prompts],
            "prompt_len": np.asarray([len(p) for p in prompts]),
            "messages": [json.dumps([{"role": "user", "content": f"q{i}"}]) for i in range(n)]}


def with_topk(cols: dict, k: int = K) -> dict:
    """What ``ServiceTopK`` adds: per teacher token k ids (the token itself first) and log-probs."""
    n = len(cols["input_ids"])
    ids = [np.repeat(np.asarray(cols["teacher_token_ids"][r]), k) for r in range(n)]
    return {**cols, "topk_k": np.full(n, k), "topk_ids": ids,
            "topk_logprobs": [np.full(len(i), -1.0, np.float32) for i in ids], "topk_student_ids": ids}


def test_chosen_is_deterministic_and_near_the_fraction():
    keys = [[f"prompt {i}"] for i in range(4000)]
    assert not any(chosen(k, 0.0, 0) for k in keys[:50]) and all(chosen(k, 1.0, 0) for k in keys[:50])
    share = np.mean([chosen(k, 0.3, 7) for k in keys])
    assert abs(share - 0.3) < 0.03
    assert [chosen(k, 0.3, 7) for k in keys[:200]] == [chosen(k, 0.3, 7) for k in keys[:200]]
    assert [chosen(k, 0.3, 7) for k in keys[:200]] != [chosen(k, 0.3, 8) for k in keys[:200]]


def test_collate_routes_chosen_batches_unscored():
    calls = []
    off = OnPolicyCollate(lambda b: calls.append(b) or "scored", 0.0, 0)
    on = OnPolicyCollate(lambda b: calls.append(b) or "scored", 1.0, 0)
    batch = stored_batch()
    assert off(batch) == "scored" and len(calls) == 1
    rows = on(batch)
    assert isinstance(rows, OnPolicyRows) and len(calls) == 1  # no service call for an on-policy batch
    assert rows.prompts == [[5, 6, 7], [8, 9]] and rows.messages == list(batch["messages"])
    assert rows_of(batch) == rows


def test_token_budgets_stop_at_the_context():
    assert token_budgets([[1] * 10, [1] * 60, [1] * 64], 16, 64) == [16, 4, 1]


def test_same_tokenizer_columns_collate_onto_the_sampled_tokens():
    rows = rows_of(stored_batch())
    generated = [[21, 22, EOS_S], [23]]
    cols = continuation_columns(rows, generated)
    assert list(cols["teacher_offset"]) == [3, 2] and list(cols["prompt_len"]) == [3, 2]
    out = collate(with_topk(cols), CollateSettings(pad_id=0, max_seq_len=32))
    labels, mask = out["labels"], out["teacher_mask"]
    assert labels[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 21, 22, EOS_S, IGNORE_INDEX]
    assert mask[0].tolist() == [False, False, True, True, True, False]
    # The teacher's top-1 at each predicting position is the sampled token itself (see with_topk).
    assert out["teacher_ids"][0, 2:5, 0].tolist() == [21, 22, EOS_S]
    assert mask[1].tolist()[:3] == [False, True, False]


def test_columns_refuse_a_count_mismatch():
    with pytest.raises(ValueError, match="continuations"):
        continuation_columns(rows_of(stored_batch()), [[1]])


def _char_tokenizers():
    """Student: one id per character; teacher: one id per two characters (a different vocabulary)."""
    alphabet = "abcdef "
    s_decode = lambda ids: "".join(alphabet[i - 1] for i in ids if i != EOS_S)  # noqa: E731
    t_vocab = {}

    def t_encode(text):
        return [t_vocab.setdefault(text[i:i + 2], len(t_vocab) + 1) for i in range(0, len(text), 2)]

    inverse = lambda: {v: k for k, v in t_vocab.items()}  # noqa: E731
    t_decode = lambda ids: "".join(inverse()[i] for i in ids if i != EOS_T)  # noqa: E731
    return s_decode, t_encode, t_decode


def test_teacher_view_aligns_over_characters():
    s_decode, t_encode, t_decode = _char_tokenizers()
    generated = [1, 2, 3, 4, 5, EOS_S]  # "abcde" + eos
    teacher_ids, align = teacher_view(generated, EOS_S, EOS_T, s_decode, t_encode, t_decode)
    assert t_decode(teacher_ids) == "abcde" and teacher_ids[-1] == EOS_T and len(teacher_ids) == 4
    # Student chars at 0, 2, 4 start teacher tokens 0, 1, 2; the eos pair ends the text together.
    assert align == [0, -1, 1, -1, 2, 3]


def test_teacher_view_without_a_common_text_trains_nothing():
    s_decode, t_encode, _ = _char_tokenizers()
    _, align = teacher_view([1, 2], EOS_S, EOS_T, s_decode, t_encode, lambda ids: "something else")
    assert align == []


def test_cross_tokenizer_columns_carry_the_alignment():
    s_decode, t_encode, t_decode = _char_tokenizers()
    rows = rows_of(stored_batch(1))
    cols = continuation_columns(rows, [[1, 2, 3]], lambda g: teacher_view(g, EOS_S, EOS_T, s_decode, t_encode,
                                                                          t_decode))
    assert list(cols["teacher_offset"]) == [-1]
    assert cols["teacher_align"][0].tolist() == [0, -1, 1]
    assert cols["input_ids"][0].tolist() == [5, 6, 7, 1, 2, 3]


def test_rollout_stats_row():
    stats = RolloutStats()
    stats.add(100, 2.0, 80, 0.5, 1)
    stats.add(50, 1.0, 40, 0.5, 0)
    assert stats.row() == {"on_policy_batches": 2, "sampled_tokens": 150, "sampled_tokens_per_s": 50.0,
                           "scored_tokens_per_s": 120.0, "policy_lag": 1}
    assert RolloutStats().row() == {"on_policy_batches": 0}  # an off-policy step: no rate, no lag


def _config(**on_policy) -> DistillationConfig:
    return DistillationConfig(student="s", output="o", loss={"kind": "logit", "divergence": "forward_kl"},
                              teacher={"source": "service"}, on_policy=on_policy)


def test_on_policy_needs_the_teacher_service():
    with pytest.raises(ValueError, match="on_policy.fraction.*teacher.source 'service'"):
        DistillationConfig(student="s", output="o", loss={"kind": "logit"}, on_policy={"fraction": 0.5})
    assert not _config().on_policy.enabled and _config(fraction=0.5).on_policy.enabled


def test_on_policy_batches_take_their_own_divergence():
    loss = BatchLoss(_config(fraction=1.0), total_steps=10)
    off, on = loss.settings_at(0), loss.settings_at(0, on_policy=True)
    assert (off.divergence, off.alpha) == ("forward_kl", 0.5)
    assert (on.divergence, on.alpha) == ("reverse_kl", 1.0)
    assert torch.is_grad_enabled()


def test_sampler_engine_kwargs(tmp_path):
    from rayjobs.distillation.config import OnPolicyConfig
    from rayjobs.distillation.sampler import engine_kwargs

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 1,
        "num_key_value_heads": 1, "torch_dtype": "float32", "max_position_embeddings": 128}))
    student = str(tmp_path)
    cpu = engine_kwargs(OnPolicyConfig(fraction=1.0, engine_kwargs={"dtype": "float32"}), student, 128, 3)
    assert cpu["kv_cache_memory_bytes"] > 0 and cpu["max_model_len"] == 128 and cpu["seed"] == 3
    assert cpu["dtype"] == "float32" and cpu["worker_extension_cls"].endswith("sampler.WeightRefresh")
    assert "kv_cache_memory_bytes" not in engine_kwargs(OnPolicyConfig(num_gpus=1), student, 128, 0)  # vLLM's fraction
