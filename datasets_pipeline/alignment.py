"""Token alignment across two tokenizers over the same text, and a teacher -> student id map.

Pure: the cores take ``decode`` callables, so tests use tiny fakes; two thin adapters wrap HF
tokenizers. The generation stage stores the alignment (``records.SAMPLE_SCHEMA``
``teacher_align`` and ``topk_student_ids``) so the training stage never needs the teacher's
tokenizer for stored top-k; the online teacher computes the same alignment in the worker.

Alignment by character offsets. Both models see the same target text (the teacher's completion).
A token's *start* is the number of characters of the decoded text before it. The teacher's
distribution stored for its token ``j`` is "what comes after the first ``start_j`` characters",
and the student position that predicts its token ``i`` asks the same question for ``start_i``
characters. So student token ``i`` is aligned with the first teacher token ``j`` whose start equals
``start_i`` (``-1`` when no teacher token starts there: the student's token boundary falls inside
a teacher token). With equal tokenizations every token aligns; where the two split a word
differently only the shared boundaries do. Zero-length tokens (eos, decoded with special tokens
skipped) start where the text ends, so the student's appended eos aligns with the teacher's.

Starts come from decoding, never from ``offset_mapping``: offsets differ between tokenizer
families (whitespace trimming, byte-level vs sentencepiece), while ``decode`` is what both models'
text means. Decoding is incremental over a small window (vLLM's detokenizer does the same), so a
sequence costs O(n * window), and a token that completes a multi-byte character gets the length
of the character it completes.

Vocabulary map. ``vocab_map`` sends every teacher id to a student id: the student token with the
same decoded text, else the student's *first* token of that text (the teacher's mass on "numbers"
lands on the student's "num": the student's next token after the shared prefix, which is what
the student position predicts). An id whose text is not whole characters (a byte-level BPE's lone
byte) maps to the student id with the same vocabulary string, if any; ids that map nowhere put
their mass in the rest bin. Several teacher
ids may land on one student id; ``rayjobs.distillation.xtok.merge_topk`` sums their probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

DECODE_WINDOW = 8
NO_ALIGN = -1
_REPLACEMENT = "\ufffd"


def decoded_starts(decode: Callable[[Sequence[int]], str], ids: Sequence[int],
                   window: int = DECODE_WINDOW) -> tuple[list[int], int]:
    """``(starts, length)``: each token's start in ``decode(ids)`` characters, and the text length.

    ``decode`` maps a list of Python ints to text (special tokens skipped). Each token's length is
    the growth of the decoded text of the ``window`` tokens before it when it is appended.
    """
    starts, length = [], 0
    ids = [int(i) for i in ids]  # once here, not in each of the ~2 decodes per token
    for j in range(len(ids)):
        lo = max(0, j - window)
        before = len(decode(ids[lo:j])) if j > lo else 0
        starts.append(length)
        length += max(len(decode(ids[lo:j + 1])) - before, 0)
    return starts, length


def align_by_start(student_starts: Sequence[int], teacher_starts: Sequence[int]) -> list[int]:
    """For each student token, the first teacher token with the same start, else ``-1``."""
    first: dict[int, int] = {}
    for j, s in enumerate(teacher_starts):
        first.setdefault(s, j)
    return [first.get(s, NO_ALIGN) for s in student_starts]


def align_tokens(decode_student, student_ids: Sequence[int], decode_teacher, teacher_ids: Sequence[int],
                 text: str | None = None) -> list[int]:
    """``align_by_start`` of two tokenizations of one text; all ``-1`` when they decode differently.

    ``text``, when given, must be what both decode to (the completion the student was built from);
    a mismatch (a detokenizer that changed whitespace, say) means offsets are not comparable.
    """
    s_starts, s_len = decoded_starts(decode_student, student_ids)
    t_starts, t_len = decoded_starts(decode_teacher, teacher_ids)
    if s_len != t_len or (text is not None and len(text) != s_len):
        return [NO_ALIGN] * len(student_ids)
    return align_by_start(s_starts, t_starts)


def token_keys(decode: Callable[[Sequence[int]], str], pieces: Sequence[str | None]) -> list[object]:
    """What identifies each id across vocabularies: its decoded text when that is whole characters,
    else ``("raw", piece)``, its vocabulary string (a byte-level BPE's lone bytes match only the
    same byte of another byte-level BPE), else None."""
    out: list[object] = []
    for i, piece in enumerate(pieces):
        text = decode([i])
        if text and _REPLACEMENT not in text:
            out.append(text)
        else:
            out.append(("raw", piece) if piece else None)
    return out


def vocab_map(teacher_keys: Sequence[object], student_keys: Sequence[object],
              student_first: Callable[[str], int | None]) -> list[int]:
    """Teacher id -> student id (see the module docstring); ``-1`` where the id maps nowhere.

    Keys come from ``token_keys``. ``student_first(text)`` is the student's first token id when it
    tokenizes ``text`` (None if none); only texts fall back to it. Among student ids with the same
    key the lowest wins.
    """
    index: dict[object, int] = {}
    for i, key in enumerate(student_keys):
        if key is not None:
            index.setdefault(key, i)
    out = []
    for key in teacher_keys:
        if key in index:
            out.append(index[key])
        elif isinstance(key, str):
            first = student_first(key)
            out.append(NO_ALIGN if first is None else int(first))
        else:
            out.append(NO_ALIGN)
    return out


def tokenizer_decoder(tokenizer) -> Callable[[Sequence[int]], str]:
    """An HF tokenizer's ``decode`` as ``alignment`` uses it: special tokens skipped, no cleanup.

    A fast tokenizer's Rust backend is called directly: ``decoded_starts`` decodes ~4 windows per
    token, and the Python wrapper's argument conversion was 3/4 of the cost (1.7 ms per sample).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda ids: backend.decode(list(ids), skip_special_tokens=True)
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def tokenizer_vocab_map(teacher_tok, student_tok) -> list[int]:
    """``vocab_map`` of two HF tokenizers, over every teacher id (``len(teacher_tok)``).

    Texts are decoded with special tokens *kept*, so ``<|im_end|>`` maps to the student's.
    """
    def plain(tok):
        return lambda ids: tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def first(text: str) -> int | None:
        ids = student_tok(text, add_special_tokens=False)["input_ids"]
        return ids[0] if ids else None

    def keys(tok):
        return token_keys(plain(tok), tok.convert_ids_to_tokens(list(range(len(tok)))))

    return vocab_map(keys(teacher_tok), keys(student_tok), first)


def map_ids(mapping: np.ndarray, ids) -> np.ndarray:
    """Teacher ids -> student ids through ``mapping``; ``-1`` (padding) and unknown ids stay ``-1``."""
    ids = np.asarray(ids, np.int64)
    known = (ids >= 0) & (ids < len(mapping))
    return np.where(known, mapping[np.where(known, ids, 0)], -1).astype(np.int32)
