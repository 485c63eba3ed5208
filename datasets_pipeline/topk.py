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
            lp = info["logprob"] if isinstance(info, dict) else float(info)
            if lp is not None and not math.isnan(lp):
                items.append((float(lp), int(tok)))
        items.sort(reverse=True)
        for j, (lp, tok) in enumerate(items[:k]):
            ids[t, j] = tok
            lps[t, j] = lp
    return ids.reshape(-1), lps.astype(np.float16).reshape(-1)


def expand_topk(ids, logprobs, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of compact_topk: -> ([T, k] int64 ids, [T, k] float32 logprobs)."""
    ids = np.asarray(ids, np.int64).reshape(-1, k) if k else np.zeros((0, 0), np.int64)
    lps = np.asarray(logprobs, np.float32).reshape(-1, k) if k else np.zeros((0, 0), np.float32)
    return ids, lps
