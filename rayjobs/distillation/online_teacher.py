"""The online teacher: a frozen model run inside every training worker, batch by batch.

Why online: stored top-k carries only k logprobs per token; hidden states and attention maps
(feature distillation) and the full distribution exist only while the teacher runs. The teacher
is loaded once per worker in eval mode with ``requires_grad=False`` and runs under
``torch.no_grad``; nothing of it reaches the optimizer or the merged model.

Large teachers (``distillation.teacher``): ``shard: zero3`` wraps the teacher in a DeepSpeed
ZeRO-3 engine with no optimizer, so each of N workers holds 1/N of its weights and gathers a
layer at a time during the forward (ZeRO-Inference); ``offload: true`` keeps the partitions in CPU
memory and streams them to the GPU. ``dtype: bf16`` halves it again. On a CPU laptop ``shard:
none`` (a full copy per worker) is the right choice; the code path is the same either way.

The teacher's own tokens. The teacher reads the sample through its chat template and tokenizer,
so its sequence differs from the student's when the tokenizers or templates do. ``TeacherTokens``
builds it and the position map ``align_index[p]``: the teacher position that has consumed the
same text as student position ``p``, or ``-1``. Target tokens are aligned by character offsets
over the completion (``datasets_pipeline.alignment``); prompt tokens too when both chat templates
render the prompt to the same text (decoded with special tokens kept), otherwise only the last
prompt position (it has consumed no target text on either side). Token ``i`` aligned with token
``j`` means positions ``i - 1`` and ``j - 1`` have read the same text. Teacher sequences longer
than the teacher's context are cut there; student positions aligned past the cut get ``-1``.

Logits. With identical vocabularies the teacher's full logits are the KD target; otherwise its
top ``loss.xtok.online_topk`` ids per position are mapped onto student ids and merged
(``rayjobs.distillation.xtok.map_teacher_topk``), a ``TopKTeacher`` like stored top-k. Neither
holds the teacher's ``[tokens x V]`` logits: the teacher runs without its head, and its logits are
made from its last hidden states a chunk of positions at a time (``rayjobs.distillation.chunked_head``):
inside the student's chunked loss (``DenseTeacherHead``), or reduced to the top-k right away.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from datasets_pipeline.alignment import align_tokens, tokenizer_decoder
from datasets_pipeline.targets import render_prompt, same_vocabulary
from datasets_pipeline.vocab_cache import cached_vocab_map
from rayjobs.distillation.chunked_head import DenseTeacherHead, chunked_rows, no_logits, output_head
from rayjobs.distillation.collate import CollateSettings, collate
from rayjobs.distillation.config import TeacherConfig
from rayjobs.distillation.losses import TopKTeacher
from rayjobs.distillation.xtok import gather_positions, map_teacher_topk

ONLINE_COLUMNS = ("messages", "completion")


def position_map(token_map: Sequence[int], length: int) -> list[int]:
    """Student position ``p`` -> teacher position, from a token map (``token_map[i]``: teacher token).

    Position ``p`` has read tokens ``0..p``; it matches the teacher position before the teacher
    token aligned with student token ``p + 1``. The last position has no next token: ``-1``.
    """
    out = [-1] * length
    for p in range(min(length, len(token_map)) - 1):
        j = token_map[p + 1]
        if j >= 1:
            out[p] = j - 1
    return out


class TeacherTokens:
    """Per stored row: the teacher's token ids and the student -> teacher position map."""

    def __init__(self, student_tok, teacher_tok, teacher_max_len: int):
        self.student_tok, self.teacher_tok = student_tok, teacher_tok
        self.teacher_max_len = teacher_max_len
        self.decode_s, self.decode_t = tokenizer_decoder(student_tok), tokenizer_decoder(teacher_tok)

    def _keep_specials(self, tok) -> Callable[[Sequence[int]], str]:
        return lambda ids: tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def __call__(self, messages: list[dict], completion: str, input_ids: Sequence[int],
                 prompt_len: int) -> tuple[list[int], list[int]]:
        """``(teacher_ids, align)``: ``align`` has one entry per student token of ``input_ids``."""
        t_tok = self.teacher_tok
        t_prompt_text = render_prompt(t_tok, messages)
        t_prompt = t_tok(t_prompt_text, add_special_tokens=False)["input_ids"]
        t_target = t_tok(completion, add_special_tokens=False)["input_ids"]
        if t_tok.eos_token_id is not None:
            t_target = t_target + [t_tok.eos_token_id]
        s_prompt, s_target = list(input_ids[:prompt_len]), list(input_ids[prompt_len:])
        if render_prompt(self.student_tok, messages) == t_prompt_text:
            prompt_map = align_tokens(self._keep_specials(self.student_tok), s_prompt,
                                      self._keep_specials(t_tok), t_prompt, t_prompt_text)
        else:
            prompt_map = [-1] * len(s_prompt)
        target_map = align_tokens(self.decode_s, s_target, self.decode_t, t_target, completion)
        token_map = prompt_map + [j + len(t_prompt) if j >= 0 else -1 for j in target_map]
        teacher_ids = (t_prompt + t_target)[: self.teacher_max_len]
        align = [q if q < len(teacher_ids) else -1 for q in position_map(token_map, len(input_ids))]
        return teacher_ids, align


class OnlineCollate:
    """The student's collate plus the teacher's padded sequences and ``align_index`` ``[B, T_s]``."""

    def __init__(self, settings: CollateSettings, tokens: TeacherTokens, teacher_pad_id: int):
        self.settings, self.tokens, self.teacher_pad_id = settings, tokens, teacher_pad_id

    def __call__(self, batch: Mapping[str, Sequence]) -> dict[str, torch.Tensor]:
        out = collate(batch, self.settings)
        seq = out["input_ids"].shape[1]
        rows = [self.tokens(json.loads(batch["messages"][r]), batch["completion"][r], batch["input_ids"][r],
                            int(batch["prompt_len"][r])) for r in range(len(batch["input_ids"]))]
        width = max(len(ids) for ids, _ in rows)
        teacher_ids = np.full((len(rows), width), self.teacher_pad_id, np.int64)
        teacher_mask = np.zeros((len(rows), width), np.int64)
        align = np.full((len(rows), seq), -1, np.int64)
        for r, (ids, row_align) in enumerate(rows):
            teacher_ids[r, :len(ids)] = ids
            teacher_mask[r, :len(ids)] = 1
            n = min(seq, len(row_align))
            align[r, :n] = row_align[:n]
        out.update(teacher_input_ids=torch.from_numpy(teacher_ids),
                   teacher_attention_mask=torch.from_numpy(teacher_mask), align_index=torch.from_numpy(align))
        return out


def load_teacher(model_dir: str, cfg: TeacherConfig, eager_attention: bool, device) -> torch.nn.Module:
    """The frozen teacher: eval mode, no parameter requires grad, sharded as configured."""
    from rayjobs.distillation.lora import load_model

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
    kwargs = {"attn_implementation": "eager"} if eager_attention else {}
    model = load_model(model_dir, dtype=dtype, **kwargs)
    model.config.use_cache = False
    model.eval().requires_grad_(False)
    if cfg.shard == "none":
        return model.to(device)
    import deepspeed

    zero = {"stage": 3}
    if cfg.offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
                 "bf16": {"enabled": cfg.dtype == "bf16"}, "fp16": {"enabled": cfg.dtype == "fp16"}}
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
    engine.module.eval()
    return engine


class OnlineTeacher:
    """Runs the frozen teacher on a collated batch and puts its distributions on the student's grid."""

    def __init__(self, model: torch.nn.Module, student_tok, teacher_tok, online_topk: int, with_attention: bool):
        self.model = model
        self.with_attention = with_attention
        self.online_topk = online_topk
        self.same_vocab = same_vocabulary(teacher_tok, student_tok)
        self.vocab_map = None if self.same_vocab else torch.from_numpy(cached_vocab_map(teacher_tok, student_tok)).long()

    @torch.no_grad()
    def run(self, batch: dict, device):
        """The teacher's outputs: every hidden state (the last one feeds its chunked head), no logits."""
        return self.model(input_ids=batch["teacher_input_ids"].to(device),
                          attention_mask=batch["teacher_attention_mask"].to(device),
                          output_hidden_states=True, output_attentions=self.with_attention, use_cache=False,
                          logits_to_keep=no_logits(device))

    @contextmanager
    def head(self) -> Iterator[torch.nn.Linear]:
        """The teacher's output layer, whole while the context lasts (gathered when ZeRO-3 shards it)."""
        head = output_head(getattr(self.model, "module", self.model))
        params = [p for p in (head.weight, head.bias) if p is not None]
        if not any(hasattr(p, "ds_id") for p in params):
            yield head
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            yield head

    @torch.no_grad()
    def logit_teacher(self, outputs, align_index: torch.Tensor, student_vocab: int, head: torch.nn.Linear,
                      chunk_tokens: int, raw: bool = False) -> TopKTeacher | DenseTeacherHead:
        """The teacher's next-token distributions at the student's positions, in student ids.

        ``head``: from ``self.head()``, alive while the result is used. ``raw``: its own top
        ``online_topk`` in teacher ids, sorted, for ULD (which ignores ids).
        """
        mask = align_index >= 0
        hidden = gather_positions(outputs.hidden_states[-1], align_index)
        if self.same_vocab and not raw:
            return DenseTeacherHead(hidden, head.weight, head.bias, mask, student_vocab)
        if raw:
            reduce = functools.partial(_own_topk, k=self.online_topk)
        else:
            vocab_map = self.vocab_map.to(hidden.device)
            reduce = functools.partial(map_teacher_topk, vocab_map=vocab_map, k=self.online_topk)
        ids, logprobs = chunked_rows(hidden, head.weight, head.bias, chunk_tokens, reduce)
        return TopKTeacher(ids, logprobs, mask)


def _own_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, logprobs)`` of the k most likely ids, sorted: what ULD needs of the teacher."""
    logprobs, ids = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return ids, logprobs
