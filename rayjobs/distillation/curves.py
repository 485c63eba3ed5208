"""Per-step training curves: one JSONL row per optimizer step, drawn to a PNG.

Rows are plain dicts written by the train loop's rank 0: ``step`` (1-based optimizer step),
``loss``, ``ce``, ``kd`` (token means over the step's micro-batches), ``lr`` (the LR of the
base group for that update), ``tokens``, ``tokens_per_s``, ``peak_mem_mib`` (rank 0's peak memory
so far: GPU allocations, or peak RSS on CPU), ``epoch`` and ``attempt`` (0 for the
first start, +1 for each restart from a checkpoint). Rows of the steps a periodic evaluation ran at
(``distillation.eval_every``) also hold ``val_loss``, ``val_ce``, ``val_kd``, ``val_perplexity``
and, with ``eval_em_samples``, ``val_em`` and ``val_teacher_agreement``. Writing goes through
``cluster.storage``, so the output may be local or s3://.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from cluster.storage import write_bytes, write_jsonl


def render_png(rows: Sequence[dict], title: str = "") -> bytes:
    """Loss terms (top) and LR (bottom) against the step; restarts marked by vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for key in ("loss", "ce", "kd"):
        values = [r.get(key) for r in rows]
        if any(v for v in values):
            ax_loss.plot(steps, values, label=key, linewidth=1.2)
    _plot_validation(ax_loss, rows)
    ax_loss.set_ylabel("loss (token mean)")
    ax_loss.legend(loc="upper right")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r.get("lr") for r in rows], color="tab:purple", linewidth=1.2)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    for prev, row in zip(rows, rows[1:], strict=False):
        if row.get("attempt", 0) != prev.get("attempt", 0):
            for ax in (ax_loss, ax_lr):
                ax.axvline(row["step"] - 0.5, color="grey", linestyle="--", linewidth=0.8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _plot_validation(ax, rows: Sequence[dict]) -> None:
    """The periodic evaluations as markers: validation loss on the loss axis, EM on its own right axis."""
    evals = [r for r in rows if r.get("val_loss") is not None]
    if not evals:
        return
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="black", markersize=3,
            linewidth=0.8, label="val_loss")
    em = [r for r in evals if r.get("val_em") is not None]
    if em:
        ax_em = ax.twinx()
        ax_em.plot([r["step"] for r in em], [r["val_em"] for r in em], "s--", color="tab:green", markersize=3,
                   linewidth=0.8, label="val_em")
        ax_em.set_ylabel("val exact match")
        ax_em.set_ylim(0, 1.05)
        ax_em.legend(loc="center right")


def write_curves(rows: Sequence[dict], jsonl_location: str, png_location: str, title: str = "") -> None:
    write_jsonl(jsonl_location, rows)
    if rows:
        write_bytes(png_location, render_png(rows, title))


def steady_tokens_per_s(rows: Sequence[dict], skip: int = 2) -> float | None:
    """Training tokens/s over step times, leaving out the first ``skip`` steps of each attempt.

    Step times exclude checkpoint saves and start-up (engine build, JIT, restore), so this is the
    steady-state rate; None when too few steps remain.
    """
    kept, seen = [], {}
    for row in rows:
        attempt = row.get("attempt", 0)
        seen[attempt] = seen.get(attempt, 0) + 1
        if seen[attempt] > skip:
            kept.append(row)
    seconds = sum(r["step_time_s"] for r in kept)
    return sum(r["tokens"] for r in kept) / seconds if kept and seconds > 0 else None
