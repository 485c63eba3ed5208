"""Tokenizer identity (a content hash) and the teacher -> student vocabulary map, cached per pair.

Why a cache: the map of a real pair (DeepSeek-R1's 129,280 ids -> Qwen2.5's 151,665) takes ~4 s
and +87 MiB of peak RSS to build (every id of both vocabularies decoded, ~40k teacher texts
tokenized by the student), and every generation actor and every online-teacher worker needs it. It
is one int32 per teacher id (517 KB for R1), never a dense ``V_t x V_s`` matrix, so it is stored as
a ``.npy`` under ``<cache dir>/vocab_map/`` (``$RAYSTILL_CACHE``, see ``cluster.storage.cache_dir``)
and written atomically, so concurrent builders never see a torn file.

Why content hashes, not paths: the key must change when either tokenizer's ids change, and must not
when the same tokenizer is saved elsewhere or reloaded. ``tokenizer_hash`` is the sha256 of what
decides ids and texts: the fast tokenizer's model (vocabulary, merges), normalizer, pre-tokenizer,
decoder and added tokens (as the tokenizers library serializes each), plus the
special-token map (the eos rule reads it). Left out on purpose: truncation and padding (call-time
state a tokenizer call may leave set), the post-processor (bos/eos insertion that transformers
rewrites on load; every stage tokenizes with ``add_special_tokens=False``) and the chat template
(it changes prompts, not how a text becomes ids). The same hash goes into the generation manifest
so training can refuse a student tokenizer other than the one the shards were made for.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np

from cluster.storage import cache_dir, localize, write_bytes
from datasets_pipeline.alignment import tokenizer_vocab_map

# Bump when alignment.tokenizer_vocab_map's rule changes, so maps cached under the old rule are rebuilt.
MAP_RULE = 2


def tokenizer_hash(tok) -> str:
    """sha256 (hex) of an HF tokenizer's content (module docstring); equal for a saved-and-reloaded copy.

    Hashes each component's own serialization (the model's is ~5 MB for R1, ~0.4 s) rather than
    parsing and re-sorting the whole tokenizer JSON, which took ~3.5 s per real tokenizer.
    """
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        for part in (backend.model, backend.normalizer, backend.pre_tokenizer, backend.decoder):
            h.update(b"null" if part is None else part.__getstate__())
            h.update(b"\0")
        added = sorted((i, repr(t)) for i, t in backend.get_added_tokens_decoder().items())
    else:  # a slow tokenizer: its class and full vocabulary (added tokens included)
        added = [type(tok).__name__, *sorted(tok.get_vocab().items())]
    special = {name: str(value) for name, value in tok.special_tokens_map.items()}
    h.update(json.dumps([added, special], sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def vocab_map_path(teacher_hash: str, student_hash: str, root: str | None = None) -> str:
    return os.path.join(root or cache_dir(), "vocab_map", f"t{teacher_hash}-s{student_hash}-r{MAP_RULE}.npy")


def cached_vocab_map(teacher_tok, student_tok, root: str | None = None) -> np.ndarray:
    """``alignment.tokenizer_vocab_map`` as int32 ``[len(teacher_tok)]``, from the cache when built before.

    ``root``: the cache root (default ``cluster.storage.cache_dir()``). A cached file that does not
    load (another version's format) is rebuilt and replaced.
    """
    path = vocab_map_path(tokenizer_hash(teacher_tok), tokenizer_hash(student_tok), root)
    try:
        mapping = np.load(path)
        if mapping.shape == (len(teacher_tok),):
            return mapping
    except (OSError, ValueError):
        pass
    mapping = np.asarray(tokenizer_vocab_map(teacher_tok, student_tok), np.int32)
    buf = io.BytesIO()
    np.save(buf, mapping)
    write_bytes(path, buf.getvalue(), atomic=True)
    return mapping


def tokenizer_records(teacher: str, student: str) -> dict[str, dict]:
    """The manifest's ``tokenizers``: per role, the tokenizer's location and content hash.

    Training compares the student's with its own (``rayjobs.distillation.plan.check_student_tokenizer``):
    the shards' ``input_ids`` and ``teacher_align`` hold that tokenizer's ids and positions.
    Loaded as every stage loads them (``AutoTokenizer``, local directory or hub id).
    """
    from transformers import AutoTokenizer

    hashes = {path: tokenizer_hash(AutoTokenizer.from_pretrained(localize(path, tokenizer_only=True)))
              for path in {teacher, student}}
    return {role: {"path": path, "sha256": hashes[path]} for role, path in (("teacher", teacher), ("student", student))}
