"""Collect per-sample results into complete prompts, then apply the keep policy.

Samples of one prompt arrive out of order from the engine pool. A prompt is
*complete* once all its ``n`` samples have arrived (kept or filtered); only then
is rejection sampling applied (to ``train`` prompts only) and the prompt written,
so an interrupted run never leaves a half-written prompt behind and a resumed run
regenerates whole prompts. A prompt whose samples never all arrive is set aside whole when the
stream ends (``close``), so the end of generation accounts for every prompt.
Pure bookkeeping: no Ray, no I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from datasets_pipeline import records as R


@dataclass
class Completed:
    prompt_ids: list[str] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    dedupe_keys: list[str] = field(default_factory=list)

    def extend(self, other: "Completed") -> None:
        self.prompt_ids += other.prompt_ids
        self.samples += other.samples
        self.rejects += other.rejects
        self.dedupe_keys += other.dedupe_keys


def dedupe_key(messages_json: str, completion: str) -> str:
    return hashlib.sha256(f"{messages_json}\x00{completion}".encode()).hexdigest()[:16]


def reject(source: str, stage: str, reason: str, detail: str | None = None) -> dict:
    return {"source": source, "stage": stage, "reason": reason, "detail": detail}


class Assembler:
    """Feed it rows with ``status`` ('ok' or a filter reason); it returns completed prompts."""

    def __init__(self, n: int, keep: str, dedupe: bool, done: set[str] = frozenset(), seen_keys: set[str] = frozenset()):
        self.n = n
        self.keep = keep
        self.dedupe = dedupe
        self.done = set(done)
        self.seen = set(seen_keys)
        self.pending: dict[str, list[dict]] = {}

    def add(self, row: dict) -> Completed:
        pid = row["prompt_id"]
        out = Completed()
        if pid in self.done:
            out.rejects.append(reject(row["sample_id"], "filter", R.DUPLICATE, "prompt id seen before"))
            return out
        group = self.pending.setdefault(pid, [])
        group.append(row)
        if len(group) == self.n:
            del self.pending[pid]
            self.done.add(pid)
            out.extend(self._finish(pid, group))
        return out

    def close(self) -> Completed:
        """The prompts still waiting for samples when the stream ended, rejected whole.

        Without this they stayed pending, were written nowhere and the manifest still said complete.
        Each of the ``n`` sample ids (arrived or not) becomes one ``incomplete_samples`` reject, so
        kept + set aside still adds up to ``n`` per prompt; the prompt is committed as done.
        """
        out = Completed()
        for pid, group in self.pending.items():
            arrived = sorted(r["sample_index"] for r in group)
            detail = f"{len(arrived)} of {self.n} samples arrived (indices {arrived})"
            out.prompt_ids.append(pid)
            out.rejects += [reject(f"{pid}/{i}", "assemble", R.INCOMPLETE_SAMPLES, detail) for i in range(self.n)]
            self.done.add(pid)
        self.pending = {}
        return out

    def _finish(self, pid: str, group: list[dict]) -> Completed:
        out = Completed(prompt_ids=[pid])
        ok = []
        for row in sorted(group, key=lambda r: r["sample_index"]):
            if row["status"] != "ok":
                out.rejects.append(reject(row["sample_id"], row.get("stage", "filter"), row["status"], row.get("detail")))
            else:
                ok.append(row)
        # Rejection sampling picks training targets; the val split is what the student is scored on,
        # so it keeps the teacher's samples right or wrong: held-out EM then covers every val prompt
        # (not only those the teacher solved) and teacher agreement sees the teacher's real answers.
        if not ok or ok[0]["split"] != "val":
            for row, reason in self._apply_keep(ok):
                out.rejects.append(reject(row["sample_id"], "filter", reason))
        for row in ok:
            if row.get("_dropped"):
                continue
            key = dedupe_key(row["messages"], row["completion"])
            if self.dedupe and key in self.seen:
                out.rejects.append(reject(row["sample_id"], "filter", R.DUPLICATE, "same prompt and completion"))
                continue
            self.seen.add(key)
            out.dedupe_keys.append(key)
            out.samples.append({k: row[k] for k in R.SAMPLE_COLUMNS})
        return out

    def _apply_keep(self, ok: list[dict]):
        """Mark dropped samples in place; yield (row, reason) for each one dropped."""
        if self.keep == "all":
            return
        if self.keep == "verified":
            for row in ok:
                if row["verified"] is False:
                    row["_dropped"] = True
                    yield row, R.UNVERIFIED
            return
        # best_of_n: one sample per prompt: verified before unverified, then the shortest.
        def rank(r):
            return (r["verified"] is False, r["verified"] is None, len(r["teacher_token_ids"]), r["sample_index"])

        if not ok:
            return
        best = min(ok, key=rank)
        if best["verified"] is False:
            best["_dropped"] = True
            yield best, R.UNVERIFIED
        for row in ok:
            if row is not best:
                row["_dropped"] = True
                yield row, R.NOT_BEST
