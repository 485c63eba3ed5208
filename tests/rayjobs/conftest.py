"""Tiny teacher/student pairs for the feature and cross-tokenizer tests (built in about a second).

They differ in everything the issue names: hidden size, depth, heads, vocabulary (own BPE each,
different special-token ids and pre-tokenizers) and architecture family (Qwen2 vs Llama).
"""

import random

import pytest


def _conversations(n=60, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        out.append([{"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"<think>\n{a}+{b}\n</think>\n{a + b}"}])
    return out


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """``{"teacher": dir, "student": dir, "student_same": dir}``: saved HF models with tokenizers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from rayjobs.demo.models import padded_vocab_size
    from rayjobs.demo.tokenizers import END_OF_TEXT, IM_END, IM_START, PAD, save_tokenizer, train_chat_tokenizer

    root = tmp_path_factory.mktemp("tiny-pair")
    convs = _conversations()
    teacher_tok = train_chat_tokenizer(convs, vocab_size=300, model_max_length=256)
    student_tok = train_chat_tokenizer(convs, vocab_size=280, special_tokens=(END_OF_TEXT, PAD, IM_START, IM_END),
                                       pad_token=PAD, model_max_length=128, pre_tokenizer="gpt2")

    def ids(tok):
        return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}

    torch.manual_seed(0)
    teacher = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=padded_vocab_size(teacher_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        **ids(teacher_tok)))
    paths = {"teacher": root / "teacher", "student": root / "student", "student_same": root / "student-same"}
    teacher.save_pretrained(paths["teacher"])
    save_tokenizer(teacher_tok, paths["teacher"])
    for name, tok in (("student", student_tok), ("student_same", teacher_tok)):
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=padded_vocab_size(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True,
            **ids(tok)))
        model.save_pretrained(paths[name])
        save_tokenizer(tok, paths[name])
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="session")
def tiny_rows():
    """Stored-sample rows (the columns the online teacher reads) for the tiny pair's task."""
    return [{"messages": [c[0]], "completion": c[1]["content"]} for c in _conversations(8, seed=1)]


@pytest.fixture(scope="session")
def online_batch(tiny_pair, tiny_rows):
    """``make(student) -> (student_tok, teacher_tok, columns, batch)``: ``tiny_rows`` as the generation
    stage stores them for ``tiny_pair[student]``, collated with the online teacher's tokens."""
    import json

    import numpy as np
    from transformers import AutoTokenizer

    from datasets_pipeline.targets import build_student_example
    from rayjobs.distillation.collate import CollateSettings
    from rayjobs.distillation.online_teacher import OnlineCollate, TeacherTokens

    def make(student: str):
        s_tok = AutoTokenizer.from_pretrained(tiny_pair[student])
        t_tok = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
        cols = {"input_ids": [], "prompt_len": [], "teacher_offset": [], "messages": [], "completion": []}
        for row in tiny_rows:
            ex = build_student_example(s_tok, row["messages"], row["completion"], "", [], reasoning_policy="keep",
                                       max_len=512, aligned_vocab=False)
            cols["input_ids"].append(np.asarray(ex.input_ids, np.int32))
            cols["prompt_len"].append(ex.prompt_len)
            cols["teacher_offset"].append(-1)
            cols["messages"].append(json.dumps(row["messages"]))
            cols["completion"].append(row["completion"])
        fn = OnlineCollate(CollateSettings(pad_id=s_tok.pad_token_id, max_seq_len=128, with_teacher=False),
                           TeacherTokens(s_tok, t_tok, 256), t_tok.pad_token_id)
        return s_tok, t_tok, cols, fn(cols)

    return make


def _run_cli_pipeline(cfg: dict, tmp_path, *flags: str, env: dict | None = None, timeout: int = 1500) -> str:
    """``raystill run <cfg> <flags>`` in its own process with its own local Ray, as a user runs it.

    Returns the console output; fails the test (with the output's tail) on a non-zero exit. Output
    goes to a file: an unread pipe fills up with vLLM's logs and blocks the job. The serving tests'
    settings (RAY_SERVE_*) must not leak into the job.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    path = tmp_path / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")} | {"RAY_ADDRESS": ""}
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.run([sys.executable, "-m", "rayjobs.cli", "run", str(path), *flags],
                              cwd=Path(__file__).resolve().parents[2], env=full_env | (env or {}),
                              stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return text


@pytest.fixture
def run_cli_pipeline():
    """:func:`_run_cli_pipeline`, for the tests that run the whole job as a user does."""
    return _run_cli_pipeline
