"""The heavy half of the r1-qwen world build (torch, transformers): task files, teacher, student.

Split from ``r1_world`` so that resolving ``demo:r1-*`` references stays import-cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rayjobs.demo import r1_task
from rayjobs.demo.compact import CompactIds, compact_ids, expand, tail_mass
from rayjobs.demo.evaluate import exact_match, exact_match_records
from rayjobs.demo.models import config_kwargs, param_count, save_model, special_ids
from rayjobs.demo.real_tokenizers import (
    QWEN_VOCAB_SIZE,
    R1_VOCAB_SIZE,
    qwen_tokenizer,
    r1_tokenizer,
    save_real_tokenizer,
)
from rayjobs.demo.task import TaskSpec, draw_problems, split_problems, training_stream
from rayjobs.demo.train_lm import collate, encode_example, train_causal_lm



def max_new_tokens(digits: int) -> int:
    """Greedy budget for the teacher's reply: intro ~8 R1 tokens, 9 per digit, ~6 to close and answer."""
    return 16 + 12 * digits


def write_task(recipe, paths: dict[str, Path], progress: Callable[[str], None]) -> dict:
    """Problems for every split, the two prompt files written; returns the splits."""
    spec = TaskSpec(recipe.digits, recipe.digits)
    train, heldout = split_problems(spec, recipe.seed, recipe.n_train_prompts, recipe.n_heldout)
    validation = draw_problems(spec, "validation", recipe.seed, recipe.eval_sample, exclude=heldout)
    r1_task.write_prompts_jsonl(paths["train_jsonl"], "train", train)
    r1_task.write_prompts_jsonl(paths["heldout_jsonl"], "heldout", heldout)
    progress(f"task: {len(train)} train / {len(heldout)} held-out prompts in English and Chinese, "
             f"{recipe.digits}-digit operands")
    return {"spec": spec, "train": train, "heldout": heldout, "validation": validation}


def _task_vocabulary(tokenizer, recipe, problems) -> CompactIds:
    """Every id the task can produce: the template, both languages' words and every number token."""
    top = 2 * 10**recipe.digits
    rendered = [
        tokenizer.apply_chat_template(r1_task.prompt_messages(p), add_generation_prompt=True, tokenize=False)
        + r1_task.completion(p) + tokenizer.eos_token
        for p in problems
    ]
    numbers = [str(n) for n in range(top)] + [f"{n:02d}" for n in range(20)]
    return CompactIds(compact_ids(tokenizer, rendered + numbers))


def _teacher_config(recipe, vocab_size: int, ids: dict) -> LlamaConfig:
    """Llama, as DeepSeek-R1-Distill-Llama: for a ``qwen2`` config transformers (and so vLLM) would
    load the tokenizer as Qwen2Tokenizer, which splits digits singly where DeepSeek's keeps 3."""
    return LlamaConfig(**config_kwargs(recipe.teacher.model_dump(), vocab_size, ids))


def _check_loaded_tokenizer(tok, model_dir: Path, problem) -> None:
    """Refuse a model directory whose tokenizer, as loaders load it (the class follows the model
    type), tokenizes the task unlike ``tok``: the model would be trained on ids no loader produces."""
    text = tok.apply_chat_template(r1_task.prompt_messages(problem), add_generation_prompt=True, tokenize=False)
    text += r1_task.completion(problem)
    loaded = AutoTokenizer.from_pretrained(model_dir)
    if loaded.encode(text, add_special_tokens=False) != tok.encode(text, add_special_tokens=False):
        raise RuntimeError(f"{type(loaded).__name__} loaded from {model_dir} tokenizes the task unlike the "
                           f"{len(tok):,}-id tokenizer it was saved from")


def train_teacher(recipe, task: dict, paths: dict[str, Path], progress: Callable[[str], None]) -> dict:
    """Train on the compact vocabulary, expand to R1's 129,280 ids, save, and measure held-out EM.

    Raises when the held-out EM is below ``min_teacher_em``, so a bad teacher is never cached.
    """
    tok = r1_tokenizer()
    spec, heldout, validation = task["spec"], task["heldout"], task["validation"]
    ids = _task_vocabulary(tok, recipe, task["train"][:200] + validation)
    full_config = _teacher_config(recipe, R1_VOCAB_SIZE, special_ids(tok))
    torch.manual_seed(recipe.seed)
    full_config.save_pretrained(paths["teacher"])
    save_real_tokenizer(tok, paths["teacher"])
    _check_loaded_tokenizer(tok, paths["teacher"], validation[0])
    compact = LlamaForCausalLM(_teacher_config(recipe, -(-len(ids) // 64) * 64, ids.special_ids(special_ids(tok))))

    def full() -> LlamaForCausalLM:
        return expand(compact, full_config, ids, recipe.tail_scale, recipe.seed + 100)

    def examples():
        for p in training_stream(spec, recipe.seed, exclude=[*heldout, *validation]):
            yield encode_example(tok, r1_task.prompt_messages(p), r1_task.completion(p))

    val = [{"messages": r1_task.prompt_messages(p), "answer": p.answer} for p in validation]
    settings = recipe.sft_settings()
    progress(f"teacher: Llama trained on {len(ids)} of R1's {R1_VOCAB_SIZE:,} ids, up to {recipe.steps} steps")
    # The collate pads with the real tokenizer's pad id (1, compact id 1 too); padded positions are
    # masked out of attention and loss, so any in-range id would do.
    training = train_causal_lm(
        compact, tok, ids.examples(examples()), settings,
        evaluate=lambda: exact_match_records(full(), tok, val, max_new_tokens=max_new_tokens(recipe.digits))["em"],
        progress=progress,
    )
    teacher = full()
    probe = collate([encode_example(tok, r1_task.prompt_messages(p), r1_task.completion(p)) for p in validation[:32]],
                    tok.pad_token_id)
    tail = tail_mass(teacher, probe, ids)
    save_model(teacher, tok, paths["teacher"], save_tok=save_real_tokenizer)
    em = exact_match(paths["teacher"], paths["heldout_jsonl"], max_new_tokens=max_new_tokens(recipe.digits))["em"]
    progress(f"teacher held-out em {em:.3f} on {len(heldout)}; {tail:.4f} of its probability mass off the task's ids")
    if em < recipe.min_teacher_em:
        raise RuntimeError(f"r1 teacher held-out em {em:.3f} < min_teacher_em {recipe.min_teacher_em}; not caching")
    info = {"params": param_count(teacher), "vocab_size": R1_VOCAB_SIZE, "tokenizer_ids": len(tok),
            "compact_vocab": len(ids), "tail_mass": round(tail, 5), "training": training}
    return {"em": em, "info": info}


def make_student(recipe, problem, paths: dict[str, Path], progress: Callable[[str], None]) -> dict:
    """A random Qwen2 student with Qwen2.5's vocabulary (151,936 rows, tied) and its ChatML tokenizer."""
    tok = qwen_tokenizer()
    config = Qwen2Config(**config_kwargs(recipe.student.model_dump(), QWEN_VOCAB_SIZE, special_ids(tok)))
    torch.manual_seed(recipe.seed + 1)
    student = Qwen2ForCausalLM(config)
    save_model(student, tok, paths["student"], save_tok=save_real_tokenizer)
    _check_loaded_tokenizer(tok, paths["student"], problem)
    params = param_count(student)
    progress(f"student: Qwen2 {params:,} params, vocabulary {QWEN_VOCAB_SIZE:,} ({len(tok):,} tokenizer ids)")
    return {"params": params, "vocab_size": QWEN_VOCAB_SIZE, "tokenizer_ids": len(tok)}
