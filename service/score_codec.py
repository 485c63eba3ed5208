"""The teacher scoring service's wire format: token ids in (JSON), per-token teacher scores out (binary).

Why binary: a scored token carries its own log-prob plus k (id, log-prob) pairs; as JSON floats
that is ~25 bytes per number, here 2 (float16) or 4 (float32) bytes per log-prob and 4 per id,
so a k = 20 response is ``2 + 20 x 6 = 122`` bytes per token (float16) against ~600 as JSON.

Response body, little-endian throughout::

    magic   4 bytes  b"RSTS"
    version u8       1
    dtype   u8       0 = float16 log-probs, 1 = float32
    k       u16      top-k width
    n_seq   u32      sequences
    n_tok   u32[n_seq]            scored (continuation) tokens per sequence
    token_logprob  dtype[T]       T = sum(n_tok): log-prob of the given token, in request order
    topk_ids       int32[T, k]    the teacher's k most likely ids at that position, best first
    topk_logprobs  dtype[T, k]

Position ``i`` of a sequence's continuation is the teacher's distribution over token
``prompt_len + i`` given the ids before it (vLLM's prompt log-probs). Pure: numpy only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"RSTS"
VERSION = 1
MEDIA_TYPE = "application/x-raystill-scores"
SCORE_PATH = "/v1/token_scores"
_HEADER = struct.Struct("<4sBBHI")
DTYPES = {"float16": (0, np.dtype("<f2")), "float32": (1, np.dtype("<f4"))}
_BY_CODE = {code: dt for code, dt in DTYPES.values()}
_IDS = np.dtype("<i4")


class CodecError(ValueError):
    """A body that is not a well-formed scores body of this version."""


@dataclass(frozen=True)
class SequenceScores:
    """One sequence's continuation: ``token_logprob [n]``, ``topk_ids [n, k]``, ``topk_logprobs [n, k]``."""

    token_logprob: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray

    def __len__(self) -> int:
        return len(self.token_logprob)


def bytes_per_token(k: int, dtype: str = "float16") -> int:
    """Body bytes per scored token (the header adds 12 + 4 per sequence)."""
    size = DTYPES[dtype][1].itemsize
    return size + k * (_IDS.itemsize + size)


def encode_scores(seqs: list[SequenceScores], k: int, dtype: str = "float16") -> bytes:
    code, dt = DTYPES[dtype]
    counts = np.array([len(s) for s in seqs], dtype="<u4")
    parts = [_HEADER.pack(MAGIC, VERSION, code, k, len(seqs)), counts.tobytes()]
    if len(seqs):
        parts.append(np.concatenate([s.token_logprob for s in seqs]).astype(dt).tobytes())
        parts.append(np.concatenate([s.topk_ids.reshape(-1, k) for s in seqs]).astype(_IDS).tobytes())
        parts.append(np.concatenate([s.topk_logprobs.reshape(-1, k) for s in seqs]).astype(dt).tobytes())
    return b"".join(parts)


def decode_scores(body: bytes) -> list[SequenceScores]:
    """The sequences of a scores body, as float32 / int64 arrays (views are copied out)."""
    if len(body) < _HEADER.size:
        raise CodecError(f"scores body is {len(body)} bytes, shorter than its {_HEADER.size}-byte header")
    magic, version, code, k, n_seq = _HEADER.unpack_from(body)
    if magic != MAGIC or version != VERSION or code not in _BY_CODE:
        raise CodecError(f"not a version-{VERSION} scores body (magic {magic!r}, version {version}, dtype {code})")
    dt = _BY_CODE[code]
    offset = _HEADER.size
    counts = np.frombuffer(body, "<u4", n_seq, offset).astype(np.int64)
    offset += 4 * n_seq
    total = int(counts.sum())
    expected = offset + total * (dt.itemsize + k * (_IDS.itemsize + dt.itemsize))
    if len(body) != expected:
        raise CodecError(f"scores body is {len(body)} bytes; its header says {expected}")
    token_lp = np.frombuffer(body, dt, total, offset).astype(np.float32)
    offset += total * dt.itemsize
    ids = np.frombuffer(body, _IDS, total * k, offset).astype(np.int64).reshape(total, k)
    offset += total * k * _IDS.itemsize
    lps = np.frombuffer(body, dt, total * k, offset).astype(np.float32).reshape(total, k)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [SequenceScores(token_lp[a:b], ids[a:b], lps[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def from_flat_prompt_logprobs(starts, ends, token_ids, logprobs, prompt_len: int, k: int) -> SequenceScores:
    """vLLM's flat prompt log-probs (``SamplingParams(flat_logprobs=True)``) -> one ``SequenceScores``.

    vLLM stores position ``p`` (p >= 1; position 0 has none) as the given token first, then the
    top ``k`` in rank order (``vllm.logprobs.append_logprobs_for_next_position``), so each of our
    positions is a fixed-stride slice; no per-token Python objects are built.
    """
    starts = np.asarray(starts[prompt_len:], np.int64)
    n = len(starts)
    if n and not np.all(np.asarray(ends[prompt_len:], np.int64) - starts == k + 1):
        raise CodecError(f"vLLM returned other than 1 + {k} prompt log-probs per position")
    flat_ids = np.asarray(token_ids, np.int64)
    flat_lps = np.asarray(logprobs, np.float32)
    rows = starts[:, None] + np.arange(k + 1)[None, :]
    return SequenceScores(flat_lps[rows[:, 0]], flat_ids[rows[:, 1:]].reshape(n, k),
                          flat_lps[rows[:, 1:]].reshape(n, k))
