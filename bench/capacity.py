"""Capacity model: GPU-hours and nodes for generation, distillation and serving (issue #18).

Pure arithmetic, no Ray and no GPU, so an operator can size a cluster before renting one. Public
per-GPU figures (the GPU table below, each with its source) give the engine's own speed; our
measured overheads (README "## Benchmarks", every one a CPU measurement) say what our code adds.
docs/CAPACITY.md explains each formula, its inputs and what is estimated rather than measured.

  generation    decode-bound: each decode step reads the weights (for a MoE only the experts the
                batch touches) plus every running sequence's KV cache from HBM, at a batch that
                fits in memory; prefill is compute-bound at --mfu.
  distillation  6·N_student FLOPs per trained token (forward + backward) plus the attention term,
                plus 2·N_teacher_active per token when the teacher runs online (0 for stored top-k),
                at --mfu times our Ray Train / plain-loop ratio.
  serving       the student decoding at a batch that fits, times our Serve / bare-vLLM ratio.

Prints a table and ends with one JSON line of named figures.
Usage: python bench/capacity.py [--example r1-7b|demo] [--gpu h100|h200|a100|l40s] [--help]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Gpu:
    """One GPU type's public peak figures (dense bf16, no sparsity; vendor GB = 1e9 bytes)."""

    peak_flops: float
    hbm_bytes_per_s: float
    memory_bytes: float
    source: str


GPUS = {
    # NVIDIA H100 Tensor Core GPU datasheet, SXM5: bf16 1,979 TFLOPS with sparsity = 989 dense,
    # 3.35 TB/s HBM3, 80 GB. https://www.nvidia.com/en-us/data-center/h100/
    "h100": Gpu(989e12, 3.35e12, 80e9, "NVIDIA H100 datasheet (SXM5), nvidia.com/en-us/data-center/h100"),
    # NVIDIA H200 product page / datasheet, SXM: same Hopper compute as H100 (1,979 sparse = 989
    # dense bf16), 4.8 TB/s HBM3e, 141 GB. https://www.nvidia.com/en-us/data-center/h200/
    "h200": Gpu(989e12, 4.8e12, 141e9, "NVIDIA H200 datasheet (SXM), nvidia.com/en-us/data-center/h200"),
    # NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM: bf16 312 TFLOPS dense (624 sparse),
    # 2,039 GB/s HBM2e, 80 GB. https://www.nvidia.com/en-us/data-center/a100/
    "a100": Gpu(312e12, 2.039e12, 80e9, "NVIDIA A100 datasheet (80GB SXM), nvidia.com/en-us/data-center/a100"),
    # NVIDIA L40S datasheet: bf16 362.05 TFLOPS dense (733 sparse), 864 GB/s GDDR6, 48 GB.
    # https://www.nvidia.com/en-us/data-center/l40s/
    "l40s": Gpu(362.05e12, 864e9, 48e9, "NVIDIA L40S datasheet, nvidia.com/en-us/data-center/l40s"),
}


@dataclass(frozen=True)
class Model:
    """The shape figures the model needs: weights read per step, FLOPs per token, KV per token."""

    params: float
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    kv_tensors: int = 2  # K and V; 1 for MLA, which caches one latent per layer
    weight_bytes: float = 2.0  # bf16; 1 for FP8 weights
    kv_bytes: float = 2.0  # bf16 KV cache
    active_params: float | None = None  # parameters used per token (MoE); None: all of them

    def active(self) -> float:
        return self.params if self.active_params is None else self.active_params

    def kv_bytes_per_token(self) -> float:
        return self.kv_tensors * self.layers * self.kv_heads * self.head_dim * self.kv_bytes

    def forward_flops_per_token(self, context: int) -> float:
        """Kaplan et al. 2020 (Table 1): 2N + 2·layers·context·d_attn, d_attn taken as hidden."""
        return 2 * self.active() + 2 * self.layers * context * self.hidden


@dataclass(frozen=True)
class Settings:
    """Assumed efficiencies, our measured overheads and the cluster's shape (see --help)."""

    mfu: float
    bw_efficiency: float
    decode_compute_efficiency: float
    memory_utilization: float
    max_batch: int
    min_step_ms: float
    gpus_per_node: int
    cpu_cores_per_gpu: float
    target_hours: float
    pipeline_cpu_us_per_token: float
    pipeline_vs_direct_cpu: float
    ray_train_vs_plain: float
    serve_vs_bare: float
    topk_bytes_per_token: float


def replica_gpus(model: Model, gpu: Gpu, s: Settings, context: int) -> int:
    """Fewest GPUs (a power of two) whose usable memory holds the weights and one full sequence."""
    need = model.params * model.weight_bytes + context * model.kv_bytes_per_token()
    g = 1
    while g * gpu.memory_bytes * s.memory_utilization < need:
        g *= 2
    return g


def decode(model: Model, gpu: Gpu, s: Settings, prompt: int, generated: int) -> dict:
    """One engine replica's decode rate: the slower of HBM traffic and compute per step.

    The batch is what the KV budget holds at the mean context (prompt + half the answer), capped
    at --max-batch (vLLM's max_num_seqs). A MoE step reads each expert at most once, so it reads
    min(all weights, active weights × batch). A step never beats --min-step-ms (the engine's own
    scheduling, sampling and launch costs), which is what bounds tiny models.
    """
    g = replica_gpus(model, gpu, s, prompt + generated)
    context = prompt + generated / 2
    kv_budget = g * gpu.memory_bytes * s.memory_utilization - model.params * model.weight_bytes
    batch = max(1, min(s.max_batch, int(kv_budget / (context * model.kv_bytes_per_token()))))
    weights = min(model.params, model.active() * batch) * model.weight_bytes
    kv = batch * context * model.kv_bytes_per_token()
    memory_s = (weights + kv) / (g * gpu.hbm_bytes_per_s * s.bw_efficiency)
    compute_s = batch * model.forward_flops_per_token(int(context)) / (
        g * gpu.peak_flops * s.decode_compute_efficiency)
    step_s = max(memory_s, compute_s, s.min_step_ms / 1e3)
    bound = "memory" if step_s == memory_s else "compute" if step_s == compute_s else "step floor"
    return {"gpus": g, "batch": batch, "step_ms": step_s * 1e3, "bound": bound,
            "tokens_per_s": batch / step_s, "tokens_per_s_per_gpu": batch / step_s / g}


def _sig(x: float) -> float:
    """Three significant figures: the inputs are not known better, and tiny examples stay non-zero."""
    return float(f"{x:.3g}")


def _nodes(gpus: int, s: Settings) -> int:
    return math.ceil(gpus / s.gpus_per_node)


def generation(teacher: Model, gpu: Gpu, s: Settings, work: dict) -> dict:
    """Teacher GPU-hours: decode at the engine's rate, prefill at --mfu, then our pipeline's cost.

    Our pipeline's overhead was measured on CPU as CPU time per generated token (README: ≈ 48 CPU-s
    more than direct vLLM for 146k tokens, ≈ 330 µs/token at k = 20). On a GPU node that work runs
    on the host's cores beside the engine, so it becomes cores per GPU; throughput drops only when
    the node has fewer spare cores (one per GPU kept for the engine's own process) than that.
    """
    eng = decode(teacher, gpu, s, work["prompt_tokens"], work["generated_tokens"])
    runs = work["prompts"] * work["oversample"]
    decode_s = runs * work["generated_tokens"] / eng["tokens_per_s"]
    prefill_flops = runs * work["prompt_tokens"] * teacher.forward_flops_per_token(work["prompt_tokens"])
    prefill_s = prefill_flops / (eng["gpus"] * gpu.peak_flops * s.mfu)
    engine_gpu_h = eng["gpus"] * (decode_s + prefill_s) / 3600
    cores = s.pipeline_cpu_us_per_token * 1e-6 * eng["tokens_per_s_per_gpu"]
    pipeline_factor = min(1.0, max(s.cpu_cores_per_gpu - 1, 0) / cores) if cores else 1.0
    gpu_h = engine_gpu_h / pipeline_factor
    replicas = max(1, math.ceil(gpu_h / s.target_hours / eng["gpus"]))
    return {"engine": eng, "engine_gpu_hours": engine_gpu_h, "gpu_hours": gpu_h,
            "gpu_hours_at_cpu_ratio": engine_gpu_h / s.pipeline_vs_direct_cpu,
            "cpu_cores_per_gpu": cores, "pipeline_factor": pipeline_factor, "replicas": replicas,
            "gpus": replicas * eng["gpus"], "nodes": _nodes(replicas * eng["gpus"], s),
            "topk_storage_gb": runs * work["generated_tokens"] * s.topk_bytes_per_token / 1e9}


def distillation(student: Model, teacher: Model, gpu: Gpu, s: Settings, work: dict, online: bool) -> dict:
    """Student training GPU-hours: 3 × forward FLOPs per token (fwd + bwd), plus the teacher's
    forward when it runs online, at --mfu × our Ray Train + DeepSpeed / plain-loop ratio.

    The fewest GPUs is what ZeRO-3 needs for mixed-precision Adam: 16 bytes per parameter (bf16
    weights and grads, fp32 master, m and v; Rajbhandari et al. 2020, §3) in half of each GPU's
    memory, the other half left for activations; an online teacher adds its own replica.
    """
    ctx = work["tokens_per_sample"]
    tokens = work["prompts"] * ctx * work["epochs"]
    student_flops = 3 * student.forward_flops_per_token(ctx) * tokens
    teacher_flops = teacher.forward_flops_per_token(ctx) * tokens if online else 0.0
    rate = gpu.peak_flops * s.mfu * s.ray_train_vs_plain
    gpu_h = (student_flops + teacher_flops) / rate / 3600
    min_gpus = math.ceil(16 * student.params / (0.5 * gpu.memory_bytes))
    if online:
        min_gpus += replica_gpus(teacher, gpu, s, ctx)
    gpus = max(min_gpus, math.ceil(gpu_h / s.target_hours))
    return {"tokens": tokens, "student_flops": student_flops, "teacher_flops": teacher_flops,
            "gpu_hours": gpu_h, "min_gpus": min_gpus, "gpus": gpus, "nodes": _nodes(gpus, s)}


def serving(student: Model, gpu: Gpu, s: Settings, work: dict) -> dict:
    """The distilled student behind our Serve app: bare decode rate × our Serve / bare-vLLM ratio."""
    eng = decode(student, gpu, s, work["prompt_tokens"], work["generated_tokens"])
    return {"engine": eng, "tokens_per_s_per_replica": eng["tokens_per_s"] * s.serve_vs_bare}


# Each example is a full set of inputs; every flag overrides one of them.
R1_7B = {
    # DeepSeek-V3/R1 (DeepSeek-V3 technical report, arXiv 2412.19437; config.json on the Hub): 671B
    # total, 37B active per token, 61 layers, hidden 7168, MLA caching one 512 + 64 = 576-wide latent
    # per layer (kv_tensors 1, kv_heads 1), FP8 weights as released, bf16 KV cache.
    "teacher_params": 671e9, "teacher_active_params": 37e9, "teacher_layers": 61, "teacher_hidden": 7168,
    "teacher_kv_heads": 1, "teacher_head_dim": 576, "teacher_kv_tensors": 1, "teacher_weight_bytes": 1,
    # Qwen2.5-7B (base of DeepSeek-R1-Distill-Qwen-7B; its config.json): 7.62B, 28 layers, hidden
    # 3584, 4 KV heads of 128, bf16.
    "student_params": 7.62e9, "student_layers": 28, "student_hidden": 3584,
    "student_kv_heads": 4, "student_head_dim": 128,
    # DeepSeek-R1 paper (arXiv 2501.12948, §2.3.3 and §2.4): ~800k curated samples, two epochs for the
    # SFT on them; 4k tokens per sample is issue #18's size, 512 of them prompt (our assumption).
    "prompts": 800_000, "tokens_per_sample": 4096, "prompt_tokens": 512, "epochs": 2, "oversample": 1.0,
    "target_hours": 24.0,
    # vLLM blog, "vLLM Large Scale Serving: DeepSeek @ 2.2k tok/s/H200 with Wide-EP" (Dec 2025):
    # sustained decode throughput per H200 in multi-node wide-EP deployments.
    "reference_tokens_per_s_per_gpu": 2200.0, "reference_gpu": "h200",
}
DEMO = {
    # rayjobs/demo/world.py's default recipe, parameters counted from its shapes (tied embeddings,
    # vocabulary padding ignored): Qwen2 teacher 128 wide × 4 layers (≈ 1.04M), Llama student
    # 96 wide × 2 layers (≈ 0.23M); 4,000 train prompts, ≤ 96 new tokens, 16 epochs (demo.yaml).
    "teacher_params": 1.04e6, "teacher_layers": 4, "teacher_hidden": 128,
    "teacher_kv_heads": 2, "teacher_head_dim": 32, "teacher_kv_tensors": 2, "teacher_weight_bytes": 2,
    "student_params": 0.23e6, "student_layers": 2, "student_hidden": 96,
    "student_kv_heads": 3, "student_head_dim": 32,
    "prompts": 4000, "tokens_per_sample": 128, "prompt_tokens": 32, "epochs": 16, "oversample": 1.0,
    "target_hours": 1.0, "reference_tokens_per_s_per_gpu": None, "reference_gpu": None,
}
EXAMPLES = {"r1-7b": R1_7B, "demo": DEMO}
MODEL_FIELDS = [f.name for f in fields(Model)]

# (flag, default, help): the assumed and measured inputs, each with where it comes from.
SETTINGS = [
    ("mfu", 0.35, "training and prefill model-FLOPs utilization; Llama 3 (arXiv 2407.21783, Table 4) "
     "reports 38-43%% bf16 on H100 at 405B scale, a 7B ZeRO-3 fine-tune usually lands below that"),
    ("bw_efficiency", 0.75, "share of peak HBM bandwidth a decode step achieves (vLLM at batch 1 on "
     "A100 measured ~77%% of the bandwidth roofline, johnmusgrave.com vLLM sweep)"),
    ("decode_compute_efficiency", 0.5, "share of peak FLOPs in a decode step when compute-bound (assumed)"),
    ("memory_utilization", 0.9, "GPU memory share the engine may use (vLLM's and our default)"),
    ("max_batch", 256, "most sequences decoding at once per replica (vLLM max_num_seqs)"),
    ("min_step_ms", 5.0, "shortest decode step: the engine's scheduling/sampling/launch cost (assumed)"),
    ("gpus_per_node", 8, "GPUs per node (HGX/DGX boards)"),
    ("cpu_cores_per_gpu", 14.0, "host cores per GPU: DGX H100 has 2 x 56-core Xeon 8480C for 8 GPUs"),
    ("pipeline_cpu_us_per_token", 330.0, "our generation pipeline's CPU time per generated token beyond "
     "direct vLLM, k = 20 (README Benchmarks: ~48 CPU-s more for 146k tokens; CPU measurement)"),
    ("pipeline_vs_direct_cpu", 0.48, "bench/generation.py pipeline_vs_direct_tokens_per_s on 2 CPU "
     "cores (README); applied only to the pessimistic generation figure"),
    ("ray_train_vs_plain", 0.85, "bench/train.py ray_deepspeed_vs_plain_tokens_per_s (README: "
     "0.80-0.89 in later runs, 0.91-0.95 first; CPU measurement)"),
    ("serve_vs_bare", 0.85, "bench/serve.py throughput_ratio (README: 0.85 under load; CPU measurement)"),
    ("topk_bytes_per_token", 122.7, "stored top-k bytes per generated token at k = 20 "
     "(bench/generation.py topk_bytes_per_token, README)"),
]
WORK_FIELDS = (("prompts", int), ("tokens_per_sample", int), ("prompt_tokens", int), ("epochs", float),
               ("oversample", float), ("target_hours", float), ("reference_tokens_per_s_per_gpu", float),
               ("reference_gpu", str))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every input is a flag; --example supplies the defaults of the model and workload flags."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--example", choices=sorted(EXAMPLES), default="r1-7b")
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    ap.add_argument("--online-teacher", action="store_true",
                    help="teacher runs in the training loop (teacher.source: online) instead of stored top-k")
    for who in ("teacher", "student"):
        for f in fields(Model):
            note = f" (MoE only: give it again whenever --{who}-params changes)" * (f.name == "active_params")
            ap.add_argument(f"--{who}-{f.name.replace('_', '-')}", type=float, help=f"{who} {f.name}{note}")
    for name, kind in WORK_FIELDS:
        ap.add_argument(f"--{name.replace('_', '-')}", type=kind)
    for name, default, text in SETTINGS:
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default, help=text)
    example = ap.parse_known_args(argv)[0].example
    ap.set_defaults(**EXAMPLES[example])
    return ap.parse_args(argv)


def model_from(args: argparse.Namespace, who: str) -> Model:
    """A Model from the --teacher-* / --student-* flags; fields no flag or example set keep Model's."""
    given = {f.name: getattr(args, f"{who}_{f.name}") for f in fields(Model)}
    kinds = {f.name: f.type for f in fields(Model)}
    return Model(**{k: int(v) if kinds[k] == "int" else v for k, v in given.items() if v is not None})


def estimate(args: argparse.Namespace) -> dict:
    """All three stages for one input set: the details for the table and the named figures."""
    gpu, teacher, student = GPUS[args.gpu], model_from(args, "teacher"), model_from(args, "student")
    s = Settings(**{name: getattr(args, name) for name, _, _ in SETTINGS}, target_hours=args.target_hours)
    work = {name: getattr(args, name) for name, _ in WORK_FIELDS}
    work["generated_tokens"] = work["tokens_per_sample"] - work["prompt_tokens"]
    gen = generation(teacher, gpu, s, work)
    dist = distillation(student, teacher, gpu, s, work, args.online_teacher)
    srv = serving(student, gpu, s, work)
    ref = work["reference_tokens_per_s_per_gpu"] if work["reference_gpu"] == args.gpu else None
    per_gpu = gen["engine"]["tokens_per_s_per_gpu"]
    figures = {
        "example": args.example, "gpu": args.gpu, "online_teacher": args.online_teacher,
        "generation_gpu_hours": _sig(gen["gpu_hours"]),
        "generation_gpu_hours_at_cpu_ratio": _sig(gen["gpu_hours_at_cpu_ratio"]),
        "generation_tokens_per_s_per_gpu": _sig(per_gpu),
        "generation_replica_gpus": gen["engine"]["gpus"], "generation_nodes": gen["nodes"],
        "reference_tokens_per_s_per_gpu": ref,
        "estimate_over_reference": round(per_gpu / ref, 2) if ref else None,
        "cpu_cores_per_gpu_for_pipeline": round(gen["cpu_cores_per_gpu"], 2),
        "topk_storage_gb": _sig(gen["topk_storage_gb"]),
        "distillation_gpu_hours": _sig(dist["gpu_hours"]), "distillation_gpus": dist["gpus"],
        "distillation_nodes": dist["nodes"],
        "serving_tokens_per_s_per_replica": _sig(srv["tokens_per_s_per_replica"]),
        "serving_replica_gpus": srv["engine"]["gpus"],
        "nodes": max(gen["nodes"], dist["nodes"]),
    }
    return {"gen": gen, "dist": dist, "srv": srv, "work": work, "gpu": gpu, "figures": figures}


def report(r: dict) -> list[str]:
    """The human-readable table: every figure with the inputs it came from."""
    f, gen, dist, srv, w = r["figures"], r["gen"], r["dist"], r["srv"], r["work"]
    e, se = gen["engine"], srv["engine"]
    rows = [
        ("GPU", f"{f['gpu']}: {r['gpu'].source}"),
        ("workload", f"{w['prompts']:,} samples x {w['tokens_per_sample']:,} tokens ({w['prompt_tokens']} prompt), "
                     f"{w['epochs']:g} epochs, oversample {w['oversample']:g}, {w['target_hours']:g} h per stage"),
        ("generation engine", f"{e['gpus']} GPU/replica, batch {e['batch']}, {e['step_ms']:.2f} ms/step "
                              f"({e['bound']}-bound), {e['tokens_per_s_per_gpu']:,.0f} tok/s/GPU"),
        ("  public reference", f"{f['reference_tokens_per_s_per_gpu'] or '-'} tok/s/GPU on {w['reference_gpu'] or '-'} "
                               f"(estimate / reference = {f['estimate_over_reference'] or '-'})"),
        ("  pipeline CPU", f"{gen['cpu_cores_per_gpu']:.2f} cores/GPU for our pipeline "
                           f"(throughput factor {gen['pipeline_factor']:.2f})"),
        ("generation", f"{f['generation_gpu_hours']:,} GPU-h ({f['generation_gpu_hours_at_cpu_ratio']:,} if the CPU ratio "
                       f"carried over), {gen['replicas']} replicas = {gen['gpus']} GPUs = {gen['nodes']} nodes"),
        ("  top-k storage", f"{f['topk_storage_gb']:,} GB"),
        ("distillation", f"{dist['tokens']:.3g} tokens, {dist['student_flops']:.3g} student + "
                         f"{dist['teacher_flops']:.3g} teacher FLOPs = {f['distillation_gpu_hours']:,} GPU-h, "
                         f"{dist['gpus']} GPUs (min {dist['min_gpus']}) = {dist['nodes']} nodes"),
        ("serving (student)", f"{se['gpus']} GPU/replica, batch {se['batch']}, {se['bound']}-bound, "
                              f"{srv['tokens_per_s_per_replica']:,.0f} tok/s/replica through our Serve app"),
        ("nodes", f"{f['nodes']} (stages run one after the other on one cluster)"),
    ]
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {v}" for k, v in rows]


def main(argv: list[str] | None = None) -> None:
    result = estimate(parse_args(argv))
    print("\n".join(report(result)))
    print(json.dumps(result["figures"]))


if __name__ == "__main__":
    main()
