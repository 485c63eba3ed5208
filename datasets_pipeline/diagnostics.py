"""Teacher diagnostics from the stored top-k: how sure the teacher is, per generated position.

Why: logit KD only teaches what cross-entropy does not when the teacher's distributions carry mass
beyond their top-1. Our own demo's teacher was 99.6% near one-hot (DISTILLATION.md), where logit
KD equals data distillation; these figures say so at generation time, before anyone trains.

Per position (one stored top-k row of log-probabilities, padded with -inf):

    top1        probability of the teacher's first choice, exp(logprob[0]): exact
    entropy     in nats, of the top-k probabilities plus one bin for the rest, 1 - sum(top-k):
                a lower bound of the full distribution's entropy (the rest's spread is unknown),
                exact when the rest is empty
    near one-hot  top1 >= NEAR_ONE_HOT

A shard's statistics (``stats.shard_stats``, per split) gain flat, additive keys, so the manifest
sums them like every other count (``stats.merge_stats``)::

    teacher_positions, teacher_entropy_sum, teacher_top1_sum, teacher_near_one_hot,
    teacher_entropy_hist  {"<bin's lower edge>": positions}   (ENTROPY_BIN nats wide, last bin open)
    teacher_top1_hist     {"<bin's lower edge>": positions}   (TOP1_BIN wide)

``summarize`` turns the summed statistics into the manifest's ``teacher_diagnostics``: means,
shares, the two histograms and the same per split. Pure: numpy and pyarrow, no Ray.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

NEAR_ONE_HOT = 0.99
ENTROPY_BIN = 0.25
ENTROPY_BINS = 16  # the last bin holds everything from 3.75 nats up
TOP1_BIN = 0.05
KEYS = ("teacher_positions", "teacher_entropy_sum", "teacher_top1_sum", "teacher_near_one_hot")


def position_measures(logprobs, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(entropy, top1)`` per position of a flat token-major ``[T * k]`` array of top-k log-probabilities."""
    lps = np.asarray(logprobs, np.float64).reshape(-1, k)
    p = np.exp(lps)  # -inf padding -> 0
    rest = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0).sum(axis=1)
        terms += np.where(rest > 0, -rest * np.log(rest), 0.0)
    return terms, p[:, 0]


def _histogram(values: np.ndarray, width: float, bins: int) -> dict[str, int]:
    index = np.minimum((values / width).astype(np.int64), bins - 1)
    counts = np.bincount(np.maximum(index, 0), minlength=bins)
    return {f"{i * width:.2f}": int(c) for i, c in enumerate(counts) if c}


def measures_stats(entropy: np.ndarray, top1: np.ndarray) -> dict:
    """The additive statistics of a set of positions."""
    return {
        "teacher_positions": int(entropy.size),
        "teacher_entropy_sum": float(entropy.sum()),
        "teacher_top1_sum": float(top1.sum()),
        "teacher_near_one_hot": int((top1 >= NEAR_ONE_HOT).sum()),
        "teacher_entropy_hist": _histogram(entropy, ENTROPY_BIN, ENTROPY_BINS),
        "teacher_top1_hist": _histogram(top1, TOP1_BIN, int(round(1 / TOP1_BIN))),
    }


def teacher_stats(table: pa.Table) -> dict:
    """The statistics of one split's rows (columns ``topk_k``, ``topk_logprobs``); rows without top-k add nothing."""
    parts = []
    for k in sorted(set(table["topk_k"].to_pylist()) - {0}):
        rows = table.filter(pc.equal(table["topk_k"], k))
        flat = pc.list_flatten(rows["topk_logprobs"]).to_numpy(zero_copy_only=False)
        parts.append(position_measures(flat, k))
    if not parts:
        return {}
    return measures_stats(np.concatenate([e for e, _ in parts]), np.concatenate([t for _, t in parts]))


def _means(stats: dict) -> dict:
    n = stats.get("teacher_positions", 0)
    return {"positions": n,
            "mean_entropy": stats["teacher_entropy_sum"] / n if n else None,
            "mean_top1": stats["teacher_top1_sum"] / n if n else None,
            "near_one_hot_share": stats["teacher_near_one_hot"] / n if n else None}


def _sorted_hist(hist: dict[str, int]) -> dict[str, int]:
    return dict(sorted(hist.items(), key=lambda kv: float(kv[0])))


def summarize(stats: dict[str, dict]) -> dict | None:
    """The manifest's ``teacher_diagnostics`` from the summed per-split statistics; None without top-k."""
    splits = {s: v for s, v in stats.items() if v.get("teacher_positions")}
    if not splits:
        return None
    whole = {key: sum(v.get(key, 0) for v in splits.values()) for key in KEYS}
    hists = {name.removeprefix("teacher_"): _sorted_hist(sum((Counter(v.get(name, {})) for v in splits.values()),
                                                             Counter()))
             for name in ("teacher_entropy_hist", "teacher_top1_hist")}
    return {**_means(whole), "near_one_hot_threshold": NEAR_ONE_HOT, "entropy": "nats, top-k plus a rest bin "
            "(a lower bound)", **hists, "per_split": {s: _means(v) for s, v in sorted(splits.items())}}


def one_hot_warning(diagnostics: dict | None, threshold: float = 0.99) -> str | None:
    """The warning for logit KD over a teacher whose stored top-k are nearly all one-hot (never a refusal)."""
    share = (diagnostics or {}).get("near_one_hot_share")
    if share is None or share < threshold:
        return None
    return (f"the teacher's stored top-k are near one-hot (top-1 >= {NEAR_ONE_HOT}) at {share:.1%} of positions "
            f"(mean entropy {diagnostics['mean_entropy']:.3f} nats): logit KD then teaches what cross-entropy on the "
            "teacher's text does (distillation.loss.kind 'data'); a softer teacher (temperature, sampling) or more "
            "uncertain data gives it more to add")
