"""Compact storage of the teacher's top-k logprobs.

vLLM returns, per generated token, a dict ``{token_id: {logprob, rank, ...}}``
that may hold k or k+1 entries (the sampled token is added when it is not in
the top-k). We keep exactly k entries per position, ordered by logprob, padded
with id -1 / logprob -inf when fewer exist, flattened token-major.
"""

from __future__ import annotations

import math

import numpy as np

PAD_ID = -1


def compact_topk(per_token: list[dict] | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int32 [T*k], logprobs float16 [T*k])."""
    if not per_token or k == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.float16)
    ids = np.full((len(per_token), k), PAD_ID, np.int32)
    lps = np.full((len(per_token), k), -np.inf, np.float32)
    for t, entries in enumerate(per_token):
        items = []
        for tok, info in (entries or {}).items():
            if info is None:
                continue
            lp = info["logprob"] if isinstance(info, dict) else getattr(info, "logprob", info)  # vLLM's Logprob
            if lp is not None and not math.isnan(lp):
                items.append((float(lp), int(tok)))
        items.sort(reverse=True)
        for j, (lp, tok) in enumerate(items[:k]):
            ids[t, j] = tok
            lps[t, j] = lp
    return ids.reshape(-1), lps.astype(np.float16).reshape(-1)


def topk_from_flat(flat, k: int) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's ``FlatLogprobs`` (``SamplingParams(flat_logprobs=True)``) -> compact_topk's form.

    Per position vLLM stores the sampled (or, for prompt logprobs, the given) token first, then the
    top k by rank, already sorted: the top k are columns 1..k of a ``[T, k+1]`` reshape, with no
    Python object per entry. NaN logprobs become padding, as in compact_topk. The list of
    per-position dicts (a vLLM without the flat form), or a container whose positions do not all
    hold k+1 entries (the prompt's first position holds none), goes through compact_topk.
    """
    if flat is None or k == 0 or not len(flat):
        return np.zeros(0, np.int32), np.zeros(0, np.float16)
    if not hasattr(flat, "start_indices") or len(flat.token_ids) != len(flat) * (k + 1):
        return compact_topk(list(flat), k)
    ids = np.asarray(flat.token_ids, np.int32).reshape(-1, k + 1)[:, 1:]
    lps = np.asarray(flat.logprobs, np.float32).reshape(-1, k + 1)[:, 1:]
    bad = np.isnan(lps)
    if bad.any():
        ids, lps = np.where(bad, PAD_ID, ids), np.where(bad, -np.inf, lps)
    return np.ascontiguousarray(ids).reshape(-1), lps.astype(np.float16).reshape(-1)


def expand_topk(ids, logprobs, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of compact_topk: -> ([T, k] int64 ids, [T, k] float32 logprobs)."""
    ids = np.asarray(ids, np.int64).reshape(-1, k) if k else np.zeros((0, 0), np.int64)
    lps = np.asarray(logprobs, np.float32).reshape(-1, k) if k else np.zeros((0, 0), np.float32)
    return ids, lps
