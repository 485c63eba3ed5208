"""Alignment and the vocabulary map across real BPEs: DeepSeek-R1's teacher tokenizer (129,280 ids)
and Qwen2.5's student tokenizer (151,665), on generated text with Chinese, emoji, digit runs,
whitespace runs, ``<think>`` tags and characters both split into byte pieces.

The oracle is independent of decoding: each token's bytes come from its vocabulary string (both
are byte-level BPEs: GPT-2's byte alphabet) or an added token's content, so a token's byte start is
exact. A student token must be aligned with the first teacher token starting at the same byte
exactly when that byte is a character boundary, and with nothing otherwise.
"""

import random
import unicodedata

import numpy as np
import pytest
import torch

from datasets_pipeline.alignment import NO_ALIGN, align_tokens, map_ids, tokenizer_decoder
from rayjobs.demo.real_tokenizers import _bytes_to_unicode
from rayjobs.distillation.xtok import aligned_teacher_xtok

POOLS = {
    "latin": ["the", " answer", " Let", " me", " compute", " café", " naïve", "Step", " is", " carry"],
    "chinese": ["计算", "并给出步骤", "所以", "答案是", "，", "。", "中文", "龘", "齉", "𠀀", "鬱"],
    "emoji": ["😀", "🇨🇳", "👍🏽", "👨‍👩‍👧", "🤔", "🧮", "🫠", "❤️"],
    "other": ["𝔘𝔫𝔦", "ΑΒΓ", "한국어", "日本語", "①②", "½", "∑∫", "ﬁ", "\ufffd"],
    "think": ["<think>", "</think>", "<think>\n", "\n</think>\n\n"],
    "punct": ["+", "=", "：", "（", "）", "!", "?", ".", ",", "**", "$"],
}
K = 20


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 30)):
        kind = rng.choice([*POOLS, "digits", "space"])
        if kind == "digits":
            parts.append("".join(rng.choice("0123456789") for _ in range(rng.randint(1, 12))))
        elif kind == "space":
            parts.append("".join(rng.choice("  \n\t") for _ in range(rng.randint(1, 6))))
        else:
            parts.append(rng.choice(POOLS[kind]))
    return "".join(parts)


TEXTS = [random_text(random.Random(seed)) for seed in range(300)]


def _token_bytes(tok):
    """id -> its bytes in the decoded text: special tokens none, other added tokens their content,
    BPE tokens their vocabulary string through GPT-2's byte alphabet."""
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    added = tok.added_tokens_decoder

    def of(i: int) -> bytes:
        if i in added:
            return b"" if added[i].special else added[i].content.encode()
        return bytes(inverse[c] for c in tok.convert_ids_to_tokens(i))

    return of


def oracle_alignment(text: str, s_ids, t_ids, s_bytes, t_bytes) -> list[int]:
    boundaries = {len(text[:c].encode()) for c in range(len(text) + 1)}
    t_starts = np.cumsum([0] + [len(t_bytes(i)) for i in t_ids])[:-1]
    s_starts = np.cumsum([0] + [len(s_bytes(i)) for i in s_ids])[:-1]
    first = {}
    for j, b in enumerate(t_starts):
        first.setdefault(int(b), j)
    return [first.get(int(b), NO_ALIGN) if b in boundaries else NO_ALIGN for b in s_starts]


@pytest.fixture(scope="module")
def tokenized(r1, qwen):
    out = []
    for text in TEXTS:
        t_ids = r1.encode(text, add_special_tokens=False) + [r1.eos_token_id]
        s_ids = qwen.encode(text, add_special_tokens=False) + [qwen.eos_token_id]
        out.append((text, s_ids, t_ids))
    return out


def test_generated_texts_cover_split_characters(r1, qwen, tokenized):
    """The generator reaches the hard cases: characters split into byte pieces on both sides."""
    def split_chars(tok, ids):
        return sum("\ufffd" in tok.backend_tokenizer.decode([i]) for i in ids)

    assert sum(split_chars(r1, t) for _, _, t in tokenized) > 100
    assert sum(split_chars(qwen, s) for _, s, _ in tokenized) > 50


def test_alignment_equals_the_byte_oracle(r1, qwen, tokenized):
    s_bytes, t_bytes = _token_bytes(qwen), _token_bytes(r1)
    decode_s, decode_t = tokenizer_decoder(qwen), tokenizer_decoder(r1)
    aligned = total = 0
    for text, s_ids, t_ids in tokenized:
        align = align_tokens(decode_s, s_ids, decode_t, t_ids, text)
        assert align == oracle_alignment(text, s_ids, t_ids, s_bytes, t_bytes), text
        used = [j for j in align if j >= 0]
        assert len(used) == len(set(used)), text  # no teacher row at two student positions
        assert align[-1] == len(t_ids) - 1  # the student's eos gets the teacher's eos row
        aligned, total = aligned + len(used), total + len(align)
    print(f"aligned {aligned} of {total} student tokens ({aligned / total:.1%})")
    assert aligned / total > 0.5


def _teacher_rows(rng: np.random.Generator, t_ids, vocab: int):
    """Top-K rows: the teacher's own next token first (p = 0.5), then random ids, ids > 65,535 among them."""
    ids = rng.integers(0, vocab, size=(len(t_ids), K))
    ids[:, 0] = t_ids
    probs = np.full((len(t_ids), K), 0.5 / K)
    probs[:, 0] = 0.5
    return ids.astype(np.int32), np.log(probs).astype(np.float32)


def test_every_student_position_gets_its_teacher_row_mapped(r1, qwen, tokenized, r1_qwen_map):
    """Through the collator: each aligned position holds exactly its teacher row's mass, mapped to
    student ids and merged; unaligned positions hold nothing; the teacher's mass on its own next
    token lands on the student's next token whenever the two have the same text."""
    mapping, _ = r1_qwen_map
    rng = np.random.default_rng(0)
    decode_s, decode_t = tokenizer_decoder(qwen), tokenizer_decoder(r1)
    prompt_len = 3
    for text, s_ids, t_ids in tokenized[:100]:
        align = align_tokens(decode_s, s_ids, decode_t, t_ids, text)
        ids, lps = _teacher_rows(rng, t_ids, len(r1))
        student_ids = map_ids(mapping, ids.reshape(-1))
        length = prompt_len + len(s_ids)
        got_ids, got_lps, mask = aligned_teacher_xtok(length, prompt_len, align, K, K, student_ids, lps.reshape(-1))
        for i, j in enumerate(align[:-1]):
            t = prompt_len + i - 1
            assert mask[t] == (j >= 0)
            if j < 0:
                continue
            want: dict[int, float] = {}
            for sid, lp in zip(student_ids.reshape(-1, K)[j], lps[j], strict=True):
                if sid >= 0:
                    want[int(sid)] = want.get(int(sid), 0.0) + float(np.exp(lp))
            got = {int(s): float(np.exp(lp)) for s, lp in zip(got_ids[t], got_lps[t], strict=True) if s >= 0}
            assert got.keys() == want.keys() and np.allclose([got[k] for k in want], list(want.values()), rtol=1e-5)
            same_text = decode_t([t_ids[j]])
            if same_text == decode_s([s_ids[i]]) and "\ufffd" not in same_text:
                assert mapping[t_ids[j]] == s_ids[i]


def test_vocab_map_is_exact_over_the_whole_r1_vocabulary(r1, qwen, r1_qwen_map):
    """Every teacher id: whole characters map to the student token of the same bytes or to one whose
    bytes are a prefix of them (the student's first token of its NFC text, a byte piece where Qwen
    lacks the character); a byte piece to the same piece or nowhere; eos to eos; other specials
    nowhere. 83,183 of the 129,280 ids have a student token of the same bytes; 1,866 map nowhere."""
    mapping, _ = r1_qwen_map
    assert mapping.shape == (len(r1),) and mapping.dtype == np.int32
    t_bytes, s_bytes = _token_bytes(r1), _token_bytes(qwen)
    t_texts = r1.backend_tokenizer.decode_batch([[i] for i in range(len(r1))], skip_special_tokens=False)
    special = {i for i, t in r1.added_tokens_decoder.items() if t.special}
    same = 0
    for t in range(len(r1)):
        m = int(mapping[t])
        if t == r1.eos_token_id:
            assert m == qwen.eos_token_id
        elif t in special:
            assert m == NO_ALIGN, t_texts[t]
        elif "\ufffd" in t_texts[t]:
            assert m == NO_ALIGN or s_bytes(m) == t_bytes(t), t
        else:
            # The first-token fallback tokenizes after Qwen's NFC (U+09DF becomes U+09AF U+09BC).
            nfc = unicodedata.normalize("NFC", t_texts[t]).encode()
            equal = s_bytes(m) == t_bytes(t)
            assert m >= 0 and s_bytes(m) and (equal or nfc.startswith(s_bytes(m))), (t, t_texts[t])
            same += equal
    unmapped = int((mapping < 0).sum())
    print(f"R1 -> Qwen: {same} ids with an equal-text student token, {unmapped} unmapped")
    assert same > 80_000 and unmapped < 2_000


def test_decoded_starts_on_a_real_split_emoji(r1):
    """R1 splits 😀 into two byte pieces: the second starts inside the character and is never aligned."""
    from datasets_pipeline.alignment import NO_START, decoded_starts

    ids = r1.encode("a😀b", add_special_tokens=False)
    assert [r1.backend_tokenizer.decode([i]) for i in ids] == ["a", "\ufffd", "\ufffd", "b"]
    assert decoded_starts(tokenizer_decoder(r1), ids) == ([0, 1, NO_START, 2], 3)
