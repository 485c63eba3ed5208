"""The run report: ``runs/<name>/summary.json``, ``report.md`` and its plots.

Pure formatting plus matplotlib; the pipeline hands in the numbers it measured.
"""

from __future__ import annotations

import io

import yaml

from cluster.storage import join, read_bytes, write_bytes, write_json

SUMMARY_KEYS = ("teacher_em", "student_em_before", "student_em_after", "passed_gate", "endpoint")


def _bar_png(title: str, labels: list[str], values: list[float], ylabel: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    bars = ax.bar(labels, [v or 0.0 for v in values], color=["#4c72b0", "#c44e52", "#55a868"][: len(labels)])
    for bar, v in zip(bars, values):
        ax.annotate("n/a" if v is None else f"{v:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def teacher_png(diagnostics: dict) -> bytes:
    """The teacher's stored top-k: histograms of per-position entropy and top-1 probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    for ax, key, width, label in ((axes[0], "entropy_hist", 0.25, "entropy (nats, top-k + rest)"),
                                  (axes[1], "top1_hist", 0.05, "top-1 probability")):
        hist = diagnostics.get(key, {})
        ax.bar([float(e) for e in hist], list(hist.values()), width=width, align="edge", color="#4c72b0")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("positions")
    fig.suptitle(f"Teacher certainty: {diagnostics.get('near_one_hot_share', 0):.1%} of positions near one-hot")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def teacher_lines(diagnostics: dict) -> list[str]:
    """The report's teacher-diagnostics table, overall and per split."""
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    rows = [("all", diagnostics), *diagnostics.get("per_split", {}).items()]
    return ["| split | positions | mean entropy | mean top-1 | near one-hot |", "|---|---:|---:|---:|---:|",
            *(f"| {name} | {d['positions']} | {fmt(d['mean_entropy'])} | {fmt(d['mean_top1'])} | "
              f"{fmt(d['near_one_hot_share'])} |" for name, d in rows)]


def summary_table(summary: dict) -> str:
    rows = [("teacher EM", summary.get("teacher_em")), ("student EM before", summary.get("student_em_before")),
            ("student EM after", summary.get("student_em_after")),
            ("teacher agreement", summary.get("teacher_agreement")),
            ("generation tokens/s", summary.get("generation_tokens_per_s")),
            ("training tokens/s", summary.get("train_tokens_per_s")),
            ("gate", "passed" if summary.get("passed_gate") else "FAILED"),
            ("endpoint", summary.get("endpoint") or "-"),
            ("query latency s", summary.get("query_latency_s"))]
    width = max(len(k) for k, _ in rows)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in rows)


def write_report(run_dir: str, summary: dict, config: dict, manifest: dict | None, curves_png: str | None) -> str:
    """Write summary.json, report.md and plots under run_dir; returns the report location."""
    write_json(join(run_dir, "summary.json"), summary)
    em_png = _bar_png("Held-out exact match", ["teacher", "student before", "student after"],
                      [summary.get("teacher_em"), summary.get("student_em_before"), summary.get("student_em_after")],
                      "EM")
    write_bytes(join(run_dir, "em.png"), em_png)
    lines = [f"# raystill run `{summary.get('run')}`", "", "## Summary", "", "```", summary_table(summary), "```", "",
             "![EM before/after](em.png)", ""]
    if curves_png:
        data = read_bytes(curves_png)
        if data:
            write_bytes(join(run_dir, "curves.png"), data)
            lines += ["## Training curves", "", "![loss and learning rate](curves.png)", ""]
    if summary.get("query_latency_s") is not None:
        write_bytes(join(run_dir, "serving.png"), _bar_png(
            "Endpoint query", ["latency s", "tokens/s / 100"],
            [summary["query_latency_s"], (summary.get("query_tokens_per_s") or 0.0) / 100], "value"))
        lines += ["## Serving", "", "![latency](serving.png)", ""]
    if manifest:
        lines += ["## Generation manifest", "", "| count | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(manifest.get("counts", {}).items())]
        lines += [f"| rows train/val | {manifest['rows']['train']}/{manifest['rows']['val']} |",
                  f"| top-k bytes/token | {manifest.get('topk_bytes_per_token')} |", ""]
    diagnostics = (manifest or {}).get("teacher_diagnostics")
    if diagnostics:
        write_bytes(join(run_dir, "teacher.png"), teacher_png(diagnostics))
        lines += ["## Teacher diagnostics (stored top-k)", "", *teacher_lines(diagnostics), "",
                  "![teacher entropy and top-1](teacher.png)", ""]
    lines += ["## Config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    location = join(run_dir, "report.md")
    write_bytes(location, "\n".join(lines).encode())
    return location
