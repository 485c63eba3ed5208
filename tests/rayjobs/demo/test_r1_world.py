"""The r1-qwen world's pure parts: recipe hash, references, bilingual task text, compact -> full expansion."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rayjobs.demo import r1_task
from rayjobs.demo.compact import CompactIds, expand
from rayjobs.demo.r1_world import R1_REFS, R1Recipe, cached_r1, resolve_r1_ref
from rayjobs.demo.task import Problem
from rayjobs.demo.world import DemoRecipe, resolve_model_ref

SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1,
         "num_key_value_heads": 1, "max_position_embeddings": 64, "tie_word_embeddings": True}


def test_recipe_hash_is_stable_and_differs_from_the_toy_world():
    assert R1Recipe().digest() == R1Recipe().digest()
    assert R1Recipe().digest() != R1Recipe.tiny().digest() != DemoRecipe().digest()
    assert R1Recipe().digest() != R1Recipe(tail_scale=0.2).digest()


def test_references_resolve_only_in_the_r1_world(tmp_path):
    assert set(R1_REFS) == {"demo:r1-teacher", "demo:r1-student", "demo:r1-train", "demo:r1-heldout"}
    assert cached_r1(tmp_path) is None
    with pytest.raises(ValueError, match="demo:r1-teacher"):
        resolve_r1_ref("demo:r1-nope", tmp_path)
    with pytest.raises(ValueError, match="demo:r1-"):
        resolve_model_ref("demo:r1-nope", root=tmp_path)
    assert not any(tmp_path.iterdir())


def test_resolving_r1_refs_needs_no_torch():
    code = "import sys, rayjobs.demo.r1_world; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_task_text_is_bilingual_with_r1_reasoning():
    problems = [Problem(a, b) for a in range(10, 30) for b in (11, 12)]
    languages = {r1_task.language(p) for p in problems}
    assert languages == {"en", "zh"}
    zh = next(p for p in problems if r1_task.language(p) == "zh")
    assert r1_task.user_content(zh) == f"计算 {zh.a} + {zh.b}，并给出步骤。"
    reply = r1_task.completion(Problem(48, 97))
    assert reply.endswith("\n</think>\n\n145") and "8+7+0=15\n4+9+1=14" in reply


def test_compact_ids_refuse_an_unknown_id_and_keep_the_label_mask():
    ids = CompactIds([0, 1, 500, 70_000])
    assert ids.encode([500, -100, 70_000]) == [2, -100, 3]
    with pytest.raises(ValueError, match="compact vocabulary"):
        ids.encode([2])


def test_expanded_model_scores_the_task_ids_exactly_as_the_compact_one():
    """Same body, trained rows at their real ids: logits over those ids are unchanged."""
    torch.manual_seed(0)
    ids = CompactIds([0, 1, 7, 300, 999])
    compact = Qwen2ForCausalLM(Qwen2Config(vocab_size=8, **SHAPE)).eval()
    full = expand(compact, Qwen2Config(vocab_size=1024, **SHAPE), ids, tail_scale=0.1, seed=1)
    real = torch.tensor([[0, 7, 300, 999, 1]])
    with torch.no_grad():
        small = compact(input_ids=torch.tensor([ids.encode(real[0].tolist())])).logits[..., : len(ids)]
        big = full(input_ids=real).logits
    torch.testing.assert_close(big[..., ids.real_ids], small, rtol=1e-4, atol=1e-5)
    tail = big[..., [i for i in range(1024) if i not in ids.real_ids]]
    assert tail.abs().max() < small.abs().max()
    assert full.get_output_embeddings().weight.data_ptr() == full.get_input_embeddings().weight.data_ptr()


@pytest.mark.slow
def test_tiny_world_has_the_real_vocabularies_and_templates(r1_tiny_world):
    from transformers import AutoConfig, AutoTokenizer

    from rayjobs.demo.real_tokenizers import QWEN_DEFAULT_SYSTEM
    from rayjobs.demo.task import read_prompts_jsonl

    teacher, student = AutoConfig.from_pretrained(r1_tiny_world.teacher), AutoConfig.from_pretrained(r1_tiny_world.student)
    assert (teacher.architectures, teacher.vocab_size) == (["LlamaForCausalLM"], 129_280)
    assert (student.architectures, student.vocab_size, student.tie_word_embeddings) == (["Qwen2ForCausalLM"], 151_936, True)
    t_tok, s_tok = AutoTokenizer.from_pretrained(r1_tiny_world.teacher), AutoTokenizer.from_pretrained(r1_tiny_world.student)
    assert (len(t_tok), len(s_tok)) == (129_280, 151_665)
    rows = read_prompts_jsonl(r1_tiny_world.heldout_jsonl)
    assert {r["language"] for r in rows} == {"en", "zh"}
    assert t_tok.apply_chat_template(rows[0]["messages"], add_generation_prompt=True, tokenize=False).endswith(
        "<｜Assistant｜><think>\n")
    assert QWEN_DEFAULT_SYSTEM in s_tok.apply_chat_template(rows[0]["messages"], tokenize=False)
    # DeepSeek keeps a 2-digit operand in one token; Qwen splits every digit.
    assert len(t_tok.encode("97", add_special_tokens=False)) == 1 and len(s_tok.encode("97")) == 2
    assert r1_tiny_world.info["teacher"]["compact_vocab"] < 1000
