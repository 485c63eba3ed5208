"""The second offline world, ``demo:r1-*``: DeepSeek-R1 -> Qwen2.5 shapes with the real tokenizers.

A user's first real run distills an R1-class teacher (DeepSeek's 129,280-id BPE, R1's chat
template with ``<think>``) into a Qwen2.5 student (151,665 ids padded to 151,936 rows, ChatML with
a default system prompt). No hub is reachable, so this world builds that pair offline: both real
tokenizers (``real_tokenizers``), a tiny-width Llama teacher (as R1-Distill-Llama) with the FULL R1
vocabulary that solves the bilingual addition task (``r1_task``), trained on the task's compact id set and then
placed at the real ids (``compact``), and a random tiny Qwen2 student with Qwen2.5's vocabulary
and tied embeddings. Cached like the toy world (``world.build_once``) under
``<root>/demo/r1-qwen-<recipe hash>/``; ``demo:r1-teacher``, ``demo:r1-student``,
``demo:r1-train`` and ``demo:r1-heldout`` resolve there.

Importing this module is cheap (pydantic only), like ``world``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import Field

from rayjobs.demo.world import WORLD_FILE, BuiltWorld, ModelShape, TeacherTraining, build_once, cache_root

# Bump when the build code changes what a recipe produces, so stale caches are not reused.
R1_WORLD_VERSION = 2
WORLD_NAME = "r1-qwen"

_LAYOUT = {"teacher": "teacher", "student": "student", "train_jsonl": "data/train.jsonl",
           "heldout_jsonl": "data/heldout.jsonl"}
R1_REFS = {"demo:r1-teacher": "teacher", "demo:r1-student": "student", "demo:r1-train": "train_jsonl",
           "demo:r1-heldout": "heldout_jsonl"}


class R1Recipe(TeacherTraining):
    """Everything that determines the r1-qwen world; its hash names the cache directory.

    Training defaults differ from the toy world's: half the batch and more steps (smaller steps
    run better on a shared 2-core machine), rarer and smaller evaluations (each one runs the full
    129,280-way head) and a lower bar, which the issue sets at 0.8.
    """

    digits: int = Field(2, ge=1, le=3, description="Digits per operand; each operand is then one DeepSeek token.")
    steps: int = Field(1200, ge=1, description="Most teacher SFT steps (compact vocabulary).")
    n_train_prompts: int = Field(1000, ge=1, description="Rows of train.jsonl (the teacher generates on these).")
    batch_size: int = Field(32, ge=1, description="Sequences per teacher SFT step.")
    n_heldout: int = Field(200, ge=1, description="Rows of heldout.jsonl; never seen in any training.")
    eval_every: int = Field(100, ge=1, description="Steps between early-stopping evaluations (full vocabulary).")
    teacher: ModelShape = Field(
        ModelShape(hidden_size=96, num_layers=3, num_heads=3, num_kv_heads=1, intermediate_size=256,
                   max_position_embeddings=256),
        description="Llama teacher shape (vocabulary: R1's 129,280).",
    )
    eval_sample: int = Field(64, ge=1, description="Validation problems per early-stopping evaluation.")
    student: ModelShape = Field(
        ModelShape(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                   max_position_embeddings=256),
        description="Qwen2 student shape (vocabulary: Qwen2.5's 151,936, tied embeddings).",
    )
    target_em: float | None = Field(0.95, gt=0.0, le=1.0, description="Stop training at this validation EM.")
    min_teacher_em: float = Field(0.8, ge=0.0, le=1.0, description="Held-out EM below this fails the build.")
    tail_scale: float = Field(
        0.1, gt=0.0, le=1.0, description="Std of the untrained vocabulary rows, relative to the trained rows'."
    )

    @classmethod
    def tiny(cls) -> R1Recipe:
        """Same real vocabularies and layout, a few training steps: for pipeline tests, not quality."""
        return cls(n_train_prompts=64, n_heldout=32, steps=4, batch_size=8, warmup_steps=2, eval_every=4,
                   eval_sample=8, target_em=None, min_teacher_em=0.0,
                   teacher=ModelShape(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                                      intermediate_size=128, max_position_embeddings=256))

    def digest(self) -> str:
        payload = json.dumps({"world": WORLD_NAME, "world_version": R1_WORLD_VERSION,
                              **self.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class R1World(BuiltWorld):
    """The r1-qwen world on disk (``world.json`` also holds the build's measurements)."""


def _world_dir(root: str | os.PathLike | None, recipe: R1Recipe) -> Path:
    return cache_root(root) / "demo" / f"{WORLD_NAME}-{recipe.digest()}"


def cached_r1(root: str | os.PathLike | None = None, recipe: R1Recipe | None = None) -> R1World | None:
    """The world for ``recipe`` if it is already built, else None (never builds)."""
    world_dir = _world_dir(root, recipe or R1Recipe())
    return R1World.load(world_dir) if (world_dir / WORLD_FILE).exists() else None


def prepare_r1(root: str | os.PathLike | None = None, recipe: R1Recipe | None = None,
               progress: Callable[[str], None] = print) -> R1World:
    """Return the r1-qwen world for ``recipe`` (default: the standard one), building it if not cached."""
    recipe = recipe or R1Recipe()
    world_dir = _world_dir(root, recipe)
    build_once(world_dir.parent, world_dir.name, lambda tmp: _build(tmp, recipe, progress), progress)
    return R1World.load(world_dir)


def _field(ref: str) -> str:
    try:
        return R1_REFS[ref]
    except KeyError:
        raise ValueError(f"unknown demo reference {ref!r}; the r1-qwen world has {sorted(R1_REFS)}") from None


def resolve_r1_ref(ref: str, root: str | os.PathLike | None = None) -> str:
    """A ``demo:r1-*`` reference as a local path, building the standard r1-qwen world if needed."""
    field = _field(ref)
    return str(getattr(prepare_r1(root), field))


def cached_r1_ref(ref: str) -> str | None:
    """Where a ``demo:r1-*`` reference is now, without building; None if the world is not built."""
    field, world = _field(ref), cached_r1()
    return str(getattr(world, field)) if world else None


def _build_threads() -> int:
    """Two threads on an idle 2-core machine; one on an oversubscribed one, where two OpenMP threads
    wait on each other (a teacher step measured 5x slower with 2 than with 1 at load 30)."""
    cpus = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] > cpus else min(2, cpus)


def _build(out: Path, recipe: R1Recipe, progress: Callable[[str], None]) -> None:
    # Heavy imports only here, so resolving references of a cached world never loads torch.
    import torch
    import transformers

    from rayjobs.demo.r1_build import make_student, train_teacher, write_task

    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(_build_threads())
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        paths = {name: out / rel for name, rel in _LAYOUT.items()}
        task = write_task(recipe, paths, progress)
        teacher = train_teacher(recipe, task, paths, progress)
        student = make_student(recipe, task["heldout"][0], paths, progress)
        info = {
            "world": WORLD_NAME, "world_version": R1_WORLD_VERSION, "hash": recipe.digest(),
            "recipe": recipe.model_dump(mode="json"), "paths": _LAYOUT,
            "teacher_em": teacher["em"], "heldout_n": len(task["heldout"]), "teacher": teacher["info"],
            "student": student,
            "build_seconds": round(time.perf_counter() - started, 1),
            "built_with": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "cpus": os.cpu_count(),
                           "load_average": [round(x, 2) for x in os.getloadavg()]},
        }
        (out / WORLD_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        progress(f"r1-qwen world built in {info['build_seconds']:.0f}s: teacher em {info['teacher_em']:.3f}")
    finally:
        torch.set_num_threads(threads)
        if bars:
            transformers.utils.logging.enable_progress_bar()
