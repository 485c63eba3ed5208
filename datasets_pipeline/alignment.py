"""Token alignment across two tokenizers over the same text, and a teacher -> student id map.

Pure: the cores take ``decode`` callables, so tests use tiny fakes; two thin adapters wrap HF
tokenizers. The generation stage stores the alignment (``records.SAMPLE_SCHEMA``
``teacher_align``), so the training stage never re-tokenizes for stored top-k; it maps the stored
teacher ids to student ids through ``vocab_map`` (cached per tokenizer pair, loaded once per
worker), which costs no bytes per token. The online teacher computes both in the worker.

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
sequence costs O(n * window).

Characters split across ids. Byte-level BPEs (DeepSeek-R1's, Qwen's) and byte-fallback
sentencepieces split a character the vocabulary lacks into byte tokens ("😀" is R1's ``ðŁĺ`` +
``Ģ``), and a lone piece of a character decodes to U+FFFD. The text before a token that starts
*inside* a character is no character prefix, so no position of the other model sees the same
context: such a token gets no start (``NO_START``) and is aligned with nothing on either side (the
student position predicting it trains on cross-entropy alone, and that teacher row is unused). The
token that opened the character carries its width, so every later start is exact. (Aligning by
bytes would also pair two models that split a character at the same byte; on R1 -> Qwen such
positions are rare, and a byte offset needs each tokenizer's byte alphabet, which ``decode`` hides.)

Vocabulary map. ``vocab_map`` sends every teacher id to a student id: the student token with the
same decoded text, else the student's *first* token of that text (the teacher's mass on "numbers"
lands on the student's "num": the student's next token after the shared prefix, which is what
the student position predicts). An id whose text is not whole characters (a byte-level BPE's lone
byte) maps to the student id with the same vocabulary string, if any. Special tokens are control
symbols, not text: they map only to a student special token of the same content, and the teacher's
eos to the student's eos. Ids that map nowhere put their mass in the rest bin (R1 -> Qwen: 1,866 of
129,280, the 1,229 unused specials and placeholders and 637 byte pieces Qwen lacks). Several teacher
ids may land on one student id; ``rayjobs.distillation.xtok.merge_topk`` sums their probabilities.
The map is built once per tokenizer pair and cached (``datasets_pipeline.vocab_cache``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

DECODE_WINDOW = 8
# Tokens a partial character can span: a UTF-8 character has at most 4 bytes, a token at least 1.
CHAR_LOOKAHEAD = 4
NO_ALIGN = -1
NO_START = -1
_REPLACEMENT = "\ufffd"


def decoded_starts(decode: Callable[[Sequence[int]], str], ids: Sequence[int],
                   window: int = DECODE_WINDOW) -> tuple[list[int], int]:
    """``(starts, length)``: each token's start in ``decode(ids)`` characters, and the text length.

    ``decode`` maps a list of Python ints to text (special tokens skipped). Each token's length is
    the growth of the decoded text of the ``window`` tokens before it when it is appended; the growth
    may be negative (a decoder that renders each byte of a pending character as one U+FFFD), so the
    sum stays exact. A token that starts inside a character gets ``NO_START``: the text before it
    ends with a pending partial character (decoded as U+FFFD) that a later token rewrites.
    """
    starts, length = [], 0
    ids = [int(i) for i in ids]  # once here, not in each of the 2-3 decodes per token
    for j in range(len(ids)):
        lo = max(0, j - window)
        before = decode(ids[lo:j]) if j > lo else ""
        mid_char = before.endswith(_REPLACEMENT) and not decode(ids[lo:j + CHAR_LOOKAHEAD]).startswith(before)
        starts.append(NO_START if mid_char else length)
        length += len(decode(ids[lo:j + 1])) - len(before)
    return starts, length


def align_by_start(student_starts: Sequence[int], teacher_starts: Sequence[int]) -> list[int]:
    """For each student token, the first teacher token with the same start, else ``-1``.

    Tokens that start inside a character (``NO_START``) are aligned with nothing on either side.
    """
    first: dict[int, int] = {}
    for j, s in enumerate(teacher_starts):
        if s != NO_START:
            first.setdefault(s, j)
    return [NO_ALIGN if s == NO_START else first.get(s, NO_ALIGN) for s in student_starts]


def align_tokens(decode_student, student_ids: Sequence[int], decode_teacher, teacher_ids: Sequence[int],
                 text: str | None = None) -> list[int]:
    """``align_by_start`` of two tokenizations of one text; all ``-1`` when they decode differently.

    ``text``, when given, must be what both decode to (the completion the student was built from);
    a mismatch (a detokenizer that changed whitespace, a normalizer such as NFC that rewrote a
    character) means character offsets are not comparable. The texts themselves are compared, not
    just their lengths: a same-length rewrite would otherwise shift no offset yet pair unlike text.
    """
    decoded = decode_student([int(i) for i in student_ids])
    if decoded != decode_teacher([int(i) for i in teacher_ids]) or (text is not None and text != decoded):
        return [NO_ALIGN] * len(student_ids)
    s_starts, _ = decoded_starts(decode_student, student_ids)
    t_starts, _ = decoded_starts(decode_teacher, teacher_ids)
    return align_by_start(s_starts, t_starts)


def token_keys(texts: Sequence[str], pieces: Sequence[str | None], special: Sequence[bool]) -> list[object]:
    """What identifies each id across vocabularies: its decoded text when that is whole characters;
    ``("special", text)`` for a special token (a control symbol, never text: it matches only a special
    token of the same content); else ``("raw", piece)``, its vocabulary string (a byte-level BPE's
    lone bytes match only the same bytes of another byte-level BPE); else None."""
    out: list[object] = []
    for text, piece, is_special in zip(texts, pieces, special, strict=True):
        if is_special:
            out.append(("special", text) if text else None)
        elif text and _REPLACEMENT not in text:
            out.append(text)
        else:
            out.append(("raw", piece) if piece else None)
    return out


def vocab_map(teacher_keys: Sequence[object], student_keys: Sequence[object],
              student_first: Callable[[list[str]], list[int | None]]) -> list[int]:
    """Teacher id -> student id (see the module docstring); ``-1`` where the id maps nowhere.

    Keys come from ``token_keys``. ``student_first(texts)`` is, per text, the student's first token
    id when it tokenizes that text (None if none), asked once for all texts without an equal key
    (one batched call: ~40k texts for R1 -> Qwen). Among student ids with the same key the lowest wins.
    """
    index: dict[object, int] = {}
    for i, key in enumerate(student_keys):
        if key is not None:
            index.setdefault(key, i)
    out = [index.get(key, NO_ALIGN) for key in teacher_keys]
    misses = [t for t, key in enumerate(teacher_keys) if key not in index and isinstance(key, str)]
    for t, first in zip(misses, student_first([teacher_keys[t] for t in misses]), strict=True):
        out[t] = NO_ALIGN if first is None else int(first)
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


def _texts_of_ids(tok) -> list[str]:
    """Every id's text with special tokens kept, in one batched call to a fast tokenizer's backend."""
    ids = [[i] for i in range(len(tok))]
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode_batch(ids, skip_special_tokens=False)
    return [tok.decode(i, skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


def tokenizer_keys(tok) -> list[object]:
    """``token_keys`` of every id of an HF tokenizer; added tokens flagged special are special."""
    special = {i for i, added in tok.added_tokens_decoder.items() if added.special}
    n = len(tok)
    return token_keys(_texts_of_ids(tok), tok.convert_ids_to_tokens(list(range(n))), [i in special for i in range(n)])


def first_tokens(tok) -> Callable[[list[str]], list[int | None]]:
    """``vocab_map``'s ``student_first`` for an HF tokenizer (batched through a fast backend)."""
    backend = getattr(tok, "backend_tokenizer", None)

    def first(texts: list[str]) -> list[int | None]:
        if backend is not None:
            return [e.ids[0] if e.ids else None for e in backend.encode_batch(texts, add_special_tokens=False)]
        return [(tok(t, add_special_tokens=False)["input_ids"] or [None])[0] for t in texts]

    return first


def tokenizer_vocab_map(teacher_tok, student_tok) -> list[int]:
    """``vocab_map`` of two HF tokenizers, over every teacher id (``len(teacher_tok)``).

    The teacher's eos maps to the student's eos whatever their texts (R1's ``<｜end▁of▁sentence｜>``
    -> Qwen's ``<|im_end|>``): both end the completion, and the student's appended eos is aligned
    with the teacher's (both start where the text ends). Build it through ``vocab_cache`` to pay the
    ~4 s of a real pair once per tokenizer pair rather than once per actor.
    """
    out = vocab_map(tokenizer_keys(teacher_tok), tokenizer_keys(student_tok), first_tokens(student_tok))
    if teacher_tok.eos_token_id is not None and student_tok.eos_token_id is not None:
        out[teacher_tok.eos_token_id] = student_tok.eos_token_id
    return out


def map_ids(mapping: np.ndarray, ids) -> np.ndarray:
    """Teacher ids -> student ids through ``mapping``; ``-1`` (padding) and unknown ids stay ``-1``."""
    ids = np.asarray(ids, np.int64)
    known = (ids >= 0) & (ids < len(mapping))
    return np.where(known, mapping[np.where(known, ids, 0)], -1).astype(np.int32)
