"""Vocabulary-scale loss memory: the unchunked head + loss vs the chunked head (rayjobs/distillation/chunked_head.py).

At Qwen2.5-0.5B's head (V = 151,936, H = 896, bf16 weights and hidden states), for cross-entropy,
stored top-k logit KD (k = 20, bucket tail, forward KL) and dense online-teacher KD (the teacher's
logits made from its own hidden states and head), at N tokens per micro-batch: the loss path's
peak memory over forward + backward (the growth of the process's peak RSS from the moment the
inputs exist; the kernel's high-water mark, reset through /proc/self/clear_refs) and its step
time (the fastest of --repeats steps, after the measured first one). Every point runs in a fresh
process: the unchunked path computes ``hidden @ W.T`` and today's ``distill_loss`` on the whole
batch; the chunked path is ``chunked_head.head_loss``. Both produce the hidden-state and head
weight gradients. Points alternate unchunked / chunked so load drifts hit both alike.

The unchunked point at 8,192 tokens is skipped (it needs ~22 GB, this machine has 24 GB shared
with other work); its line gives the linear extrapolation from 2,048 tokens instead, and the
chunked 8,192-token point is measured for memory (and its one step's time) only.

Prints a table and ends with one JSON line:
  chunked_peak_mib_8192                 top-k KD, chunked, 8,192 tokens (goal <= 1024)
  chunked_peak_growth_8192_over_512     top-k KD, chunked peak at 8,192 / at 512 tokens (goal <= 1.5)
  unchunked_over_chunked_peak_2048      top-k KD, peak unchunked / chunked at 2,048 tokens
  chunked_over_unchunked_step_time_2048 top-k KD, step time chunked / unchunked at 2,048 (goal <= 1.15)
and the same per loss as <loss>_<figure> (loss in ce, topk, dense).

Usage: python bench/vocab_memory.py [--tokens 512 2048 8192] [--repeats 2] [--chunk-tokens N]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB, HIDDEN, TOPK = 151_936, 896, 20
LOSSES = ("ce", "topk", "dense")
SKIP_UNCHUNKED_ABOVE = 4096
MIB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _inputs(loss: str, n: int):
    """Hidden states and head (trainable), labels and the teacher, as a bf16 training step has them."""
    import torch

    from rayjobs.distillation.chunked_head import DenseTeacherHead
    from rayjobs.distillation.losses import LossSettings, TopKTeacher

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, n, HIDDEN, generator=g, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.bfloat16) * 0.02).requires_grad_()
    labels = torch.randint(0, VOCAB, (1, n), generator=g)
    settings = LossSettings(kind="data" if loss == "ce" else "logit")
    if loss == "topk":
        ids = torch.randint(0, VOCAB, (1, n, TOPK), generator=g)
        logprobs = torch.log_softmax(torch.randn(1, n, TOPK + 1, generator=g), -1)[..., :TOPK].sort(-1, True).values
        return hidden, weight, labels, settings, TopKTeacher(ids, logprobs, None)
    if loss == "dense":
        t_hidden = torch.randn(1, n, HIDDEN, generator=g, dtype=torch.bfloat16)
        t_weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.bfloat16) * 0.02
        return hidden, weight, labels, settings, DenseTeacherHead(t_hidden, t_weight, None, None, VOCAB)
    return hidden, weight, labels, settings, None


def _step(path: str, chunk_tokens: int | None, hidden, weight, labels, settings, teacher) -> None:
    """One forward + backward of the loss path; leaves the gradients in ``hidden`` and ``weight``."""
    import torch

    from rayjobs.distillation.chunked_head import DenseTeacherHead, head_loss
    from rayjobs.distillation.losses import DenseTeacher, distill_loss

    hidden.grad = weight.grad = None
    if path == "chunked":
        total = head_loss(hidden, labels, weight, None, teacher, settings, chunk_tokens)[0]
    else:
        if isinstance(teacher, DenseTeacherHead):
            with torch.no_grad():
                teacher = DenseTeacher(teacher.hidden @ teacher.weight.T)
        total = distill_loss(hidden @ weight.T, labels, teacher, settings).total
    total.backward()


def point(loss: str, n: int, path: str, chunk_tokens: int | None, repeats: int) -> dict:
    """Child process: peak memory of the first step, then the fastest of ``repeats`` more."""
    import torch

    args = _inputs(loss, n)
    gc.collect()
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    start = time.perf_counter()
    _step(path, chunk_tokens, *args)
    first = time.perf_counter() - start
    peak = _status_kib("VmHWM") - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _step(path, chunk_tokens, *args)
        times.append(time.perf_counter() - start)
    return {"loss": loss, "tokens": n, "path": path, "peak_mib": peak / 1024, "first_step_s": first,
            "step_s": min(times or [first]), "threads": torch.get_num_threads()}


def run_point(loss: str, n: int, path: str, args, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--point", loss, str(n), path, "--repeats", str(repeats)]
    if args.chunk_tokens:
        cmd += ["--chunk-tokens", str(args.chunk_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"point {loss} {n} {path} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def figures(results: dict, tokens: list[int]) -> dict:
    """The JSON line: per loss, and the issue's four (top-k KD) without a prefix."""
    small, mid, large = tokens[0], 2048, tokens[-1]
    out = {}
    for loss in LOSSES:
        c, u = results[loss]["chunked"], results[loss]["unchunked"]
        out[f"{loss}_chunked_peak_mib_{large}"] = round(c[large]["peak_mib"], 1)
        out[f"{loss}_chunked_peak_growth_{large}_over_{small}"] = round(c[large]["peak_mib"] / c[small]["peak_mib"], 3)
        out[f"{loss}_unchunked_over_chunked_peak_{mid}"] = round(u[mid]["peak_mib"] / c[mid]["peak_mib"], 2)
        out[f"{loss}_chunked_over_unchunked_step_time_{mid}"] = round(c[mid]["step_s"] / u[mid]["step_s"], 3)
    for key in list(out):
        if key.startswith("topk_"):
            out[key[len("topk_"):]] = out[key]
    return out


def _line(loss: str, n: int, u: dict | None, c: dict, u_2048: dict) -> str:
    if u is None:
        est = u_2048["peak_mib"] * n / 2048 / 1024
        return (f"{loss:6} {n:>6} {'skipped':>14} {c['peak_mib']:>12.0f} {'':>6} {'':>12} {c['step_s']:>10.2f}"
                f"   (unchunked: ~{est:.1f} GiB, its 2048-token peak x {n / 2048:g}; first step only)")
    return (f"{loss:6} {n:>6} {u['peak_mib']:>14.0f} {c['peak_mib']:>12.0f} {u['peak_mib'] / c['peak_mib']:>6.1f} "
            f"{u['step_s']:>12.2f} {c['step_s']:>10.2f} {c['step_s'] / u['step_s']:>10.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--repeats", type=int, default=2, help="timed steps after the first (memory) step")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="distillation.loss.chunk_tokens (default: sized from the vocabulary, as in training)")
    p.add_argument("--point", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.point:
        loss, n, path = args.point
        print(json.dumps(point(loss, int(n), path, args.chunk_tokens, args.repeats)))
        return 0
    if 2048 not in args.tokens:
        p.error("--tokens must include 2048 (the step-time and savings figures are taken there)")
    from rayjobs.distillation.chunked_head import chunk_size

    tokens = sorted(args.tokens)
    results = {loss: {"chunked": {}, "unchunked": {}} for loss in LOSSES}
    chunks = f"{chunk_size(args.chunk_tokens, VOCAB)} (ce, topk: {chunk_size(args.chunk_tokens, VOCAB, compact=True)})"
    print(f"V={VOCAB} H={HIDDEN} bf16, k={TOPK}, chunk_tokens={chunks}; "
          "peak = RSS growth over forward + backward (MiB); step = fastest of the timed steps (s)")
    print(f"{'loss':6} {'tokens':>6} {'unchunked MiB':>14} {'chunked MiB':>12} {'ratio':>6} "
          f"{'unchunked s':>12} {'chunked s':>10} {'time ratio':>10}")
    for loss in LOSSES:
        row = results[loss]
        for n in tokens:
            both = n <= SKIP_UNCHUNKED_ABOVE
            if both:
                row["unchunked"][n] = run_point(loss, n, "unchunked", args, args.repeats)
            row["chunked"][n] = run_point(loss, n, "chunked", args, args.repeats if both else 0)
            print(_line(loss, n, row["unchunked"].get(n), row["chunked"][n], row["unchunked"].get(2048)), flush=True)
    print(json.dumps(figures(results, tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
