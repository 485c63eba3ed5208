"""The offline demo world: a trained teacher, untrained students and the task's prompt files.

No model hub is reachable, so the demo builds its own: a Qwen2 teacher trained until it solves
the addition task, two random Llama students (one with its own tokenizer, one sharing the
teacher's) and the train/held-out prompt JSONL the generation stage reads. A build takes minutes,
so it is cached under ``<root>/demo/<recipe hash>/`` and reused by every later run; ``demo:*``
model references resolve there.

Importing this module is cheap (pydantic only): torch and transformers load only when a world
has to be built, so config code can resolve ``demo:`` references of a cached world.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.storage import cache_dir

from rayjobs.demo.task import (
    Problem,
    TaskSpec,
    assistant_content,
    draw_problems,
    prompt_messages,
    prompt_record,
    split_problems,
    training_messages,
    training_stream,
    write_prompts_jsonl,
)

# Bump when the build code changes what a recipe produces, so stale caches are not reused.
WORLD_VERSION = 1
WORLD_FILE = "world.json"
MAX_STUDENT_PARAM_RATIO = 0.25


class ModelShape(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = Field(ge=8, description="Width of the residual stream.")
    num_layers: int = Field(ge=1, description="Transformer blocks.")
    num_heads: int = Field(ge=1, description="Query heads; hidden_size must divide evenly.")
    num_kv_heads: int = Field(ge=1, description="Key/value heads (grouped-query attention when < num_heads).")
    intermediate_size: int = Field(ge=8, description="Width of the SwiGLU MLP.")
    max_position_embeddings: int = Field(ge=16, description="Context length the model is configured for.")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must divide hidden_size and num_kv_heads must divide num_heads")
        return self


class TeacherTraining(BaseModel):
    """How a world's teacher is trained and judged; shared by the toy and the r1-qwen recipes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, description="Seeds problem sampling, weight init and data order.")
    steps: int = Field(900, ge=1, description="Most teacher SFT steps.")
    batch_size: int = Field(64, ge=1, description="Sequences per teacher SFT step.")
    lr: float = Field(3e-3, gt=0.0, description="Peak learning rate (AdamW, warmup then cosine).")
    warmup_steps: int = Field(30, ge=1, description="Linear warmup steps.")
    eval_every: int = Field(50, ge=1, description="Steps between early-stopping evaluations.")
    eval_sample: int = Field(128, ge=1, description="Validation problems per early-stopping evaluation.")
    target_em: float | None = Field(0.98, gt=0.0, le=1.0, description="Stop training once validation EM reaches this.")
    min_teacher_em: float = Field(0.9, ge=0.0, le=1.0, description="Held-out EM below this fails the build.")

    def sft_settings(self):
        """The recipe's training fields as the SFT loop takes them."""
        from rayjobs.demo.train_lm import SFTSettings

        return SFTSettings(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
                           eval_every=self.eval_every, target_em=self.target_em)


class DemoRecipe(TeacherTraining):
    """Everything that determines the world; its hash names the cache directory."""

    min_digits: int = Field(3, ge=1, description="Fewest digits per operand.")
    max_digits: int = Field(3, ge=1, description="Most digits per operand.")
    system_prompt: str | None = Field(None, description="System message put before every prompt, if any.")
    n_train_prompts: int = Field(4000, ge=1, description="Rows of train.jsonl (the teacher generates on these).")
    n_heldout: int = Field(400, ge=1, description="Rows of heldout.jsonl; never seen in any training.")
    tokenizer_corpus: int = Field(2000, ge=1, description="Train problems the BPE tokenizers are fit on.")
    teacher_vocab_size: int = Field(
        400, ge=300, description="Teacher BPE vocabulary cap (256 bytes + merges + specials)."
    )
    student_vocab_size: int = Field(300, ge=270, description="Student BPE vocabulary cap; differs from the teacher's.")
    teacher: ModelShape = Field(
        ModelShape(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512,
                   max_position_embeddings=256),
        description="Qwen2 teacher shape.",
    )
    student: ModelShape = Field(
        ModelShape(hidden_size=96, num_layers=2, num_heads=3, num_kv_heads=3, intermediate_size=224,
                   max_position_embeddings=128),
        description="Llama student shape (both students).",
    )

    @model_validator(mode="after")
    def _students_differ(self):
        t, s = self.teacher, self.student
        if self.min_digits > self.max_digits:
            raise ValueError("min_digits must be <= max_digits")
        if s.hidden_size == t.hidden_size or s.num_layers == t.num_layers or s.num_heads == t.num_heads:
            raise ValueError("student must differ from the teacher in hidden size, depth and heads")
        if s.max_position_embeddings >= t.max_position_embeddings:
            raise ValueError("student context must be shorter than the teacher's")
        if self.student_vocab_size == self.teacher_vocab_size:
            raise ValueError("student and teacher vocabulary sizes must differ")
        return self

    @classmethod
    def tiny(cls) -> DemoRecipe:
        """Seconds to build, for tests: plumbing only, the teacher is not expected to be good.

        Head dims stay at 32: vLLM's CPU attention rejects 16 ("Unsupported CPU attention configuration").
        """
        return cls(
            n_train_prompts=64, n_heldout=32, tokenizer_corpus=200,
            teacher=ModelShape(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                               max_position_embeddings=256),
            student=ModelShape(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=64,
                               max_position_embeddings=128),
            steps=4,
            batch_size=8,
            warmup_steps=2,
            eval_every=2,
            eval_sample=8,
            target_em=None,
            min_teacher_em=0.0,
        )

    def digest(self) -> str:
        """Short sha256 of the recipe and the world format version."""
        payload = json.dumps({"world_version": WORLD_VERSION, **self.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BuiltWorld:
    """What every world has: a teacher, a student, prompt files and the build's ``world.json``."""

    root: Path
    teacher: Path
    student: Path
    train_jsonl: Path
    heldout_jsonl: Path
    teacher_em: float
    info: dict

    @classmethod
    def load(cls, root: str | os.PathLike):
        root = Path(root)
        info = json.loads((root / WORLD_FILE).read_text())
        paths = {name: root / rel for name, rel in info["paths"].items()}
        return cls(root=root, teacher_em=info["teacher_em"], info=info, **paths)


@dataclass(frozen=True)
class DemoWorld(BuiltWorld):
    student_same_tokenizer: Path


# Paths inside a world directory, relative so a cache can be moved or copied as a whole.
_LAYOUT = {
    "teacher": "teacher",
    "student": "student",
    "student_same_tokenizer": "student-same-tokenizer",
    "train_jsonl": "data/train.jsonl",
    "heldout_jsonl": "data/heldout.jsonl",
}

MODEL_REFS = {
    "demo:teacher": "teacher",
    "demo:student": "student",
    "demo:student-same-tokenizer": "student_same_tokenizer",
    "demo:train": "train_jsonl",
    "demo:heldout": "heldout_jsonl",
}


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else this node's cache (``cluster.storage.cache_dir``: the one the models are copied to)."""
    return Path(root) if root is not None else Path(cache_dir())


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One builder per recipe: a second process waits, then finds the finished world."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached(root: str | os.PathLike | None = None, recipe: DemoRecipe | None = None) -> DemoWorld | None:
    """The world for ``recipe`` if it is already built, else None (never builds)."""
    world_dir = cache_root(root) / "demo" / (recipe or DemoRecipe()).digest()
    return DemoWorld.load(world_dir) if (world_dir / WORLD_FILE).exists() else None


def build_once(base: Path, name: str, build: Callable[[Path], None], progress: Callable[[str], None]) -> Path:
    """``base/name``, built by ``build(tmp_dir)`` unless already finished (how every world is cached).

    The build runs in a temporary sibling renamed into place only after ``world.json`` is written
    (a directory with it is complete; an interrupted build is never reused), under a lock that
    makes a second process wait for the first builder instead of building twice."""
    world_dir = base / name
    if (world_dir / WORLD_FILE).exists():
        return world_dir
    with _exclusive(base / f"{name}.lock"):
        if (world_dir / WORLD_FILE).exists():
            return world_dir
        for stale in base.glob(f".{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        progress(f"building demo world {name} in {world_dir}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=base))
        try:
            build(tmp)
            if world_dir.exists():
                shutil.rmtree(world_dir)
            tmp.rename(world_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return world_dir


def prepare(
    root: str | os.PathLike | None = None,
    recipe: DemoRecipe | None = None,
    progress: Callable[[str], None] = print,
) -> DemoWorld:
    """Return the world for ``recipe`` (default: the standard demo), building it if not cached."""
    recipe = recipe or DemoRecipe()
    base = cache_root(root) / "demo"
    return DemoWorld.load(build_once(base, recipe.digest(), lambda tmp: _build(tmp, recipe, progress), progress))


def resolve_model_ref(
    ref: str, root: str | os.PathLike | None = None, recipe: DemoRecipe | None = None
) -> str:
    """Map ``demo:teacher`` and friends to local paths (building the world if needed).

    Any other string (a local directory, an ``s3://`` URI, a hub id) is returned unchanged, so
    callers can pass every model reference through this one function.
    """
    if not ref.startswith("demo:"):
        return ref
    if ref.startswith("demo:r1-"):
        from rayjobs.demo.r1_world import resolve_r1_ref

        return resolve_r1_ref(ref, root)
    try:
        field = MODEL_REFS[ref]
    except KeyError:
        raise ValueError(f"unknown demo reference {ref!r}; known: {sorted(MODEL_REFS)} and demo:r1-*") from None
    return str(getattr(prepare(root, recipe), field))


def _build(out: Path, recipe: DemoRecipe, progress: Callable[[str], None]) -> None:
    # Heavy imports only here, so resolving references of a cached world never loads torch.
    import torch
    import transformers

    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    # Per-file save/load bars would drown the progress lines this build reports itself.
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        spec = TaskSpec(recipe.min_digits, recipe.max_digits, recipe.system_prompt)
        train, heldout = split_problems(spec, recipe.seed, recipe.n_train_prompts, recipe.n_heldout)
        validation = draw_problems(spec, "validation", recipe.seed, recipe.eval_sample, exclude=heldout)
        paths = {name: out / rel for name, rel in _LAYOUT.items()}
        write_prompts_jsonl(paths["train_jsonl"], "train", train, spec)
        write_prompts_jsonl(paths["heldout_jsonl"], "heldout", heldout, spec)
        progress(f"task: {len(train)} train / {len(heldout)} held-out prompts, {spec}")

        teacher_tok, student_tok = _tokenizers(recipe, spec, train)
        progress(f"tokenizers: teacher {len(teacher_tok)} tokens, student {len(student_tok)} tokens")
        teacher_info = _train_teacher(recipe, spec, teacher_tok, heldout, validation, paths, progress)
        student_info = _make_students(recipe, teacher_tok, student_tok, teacher_info["params"], paths, progress)

        info = {
            "world_version": WORLD_VERSION,
            "hash": recipe.digest(),
            "recipe": recipe.model_dump(mode="json"),
            "paths": _LAYOUT,
            "teacher_em": teacher_info["em"],
            "heldout_n": len(heldout),
            "student_em": student_info["em"],
            "params": {"teacher": teacher_info["params"], **student_info["params"]},
            "vocab": {"teacher": len(teacher_tok), "student": len(student_tok)},
            "teacher_training": teacher_info["training"],
            "build_seconds": round(time.perf_counter() - started, 1),
            "built_with": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__},
        }
        (out / WORLD_FILE).write_text(json.dumps(info, indent=2) + "\n")
        progress(f"demo world built in {info['build_seconds']:.0f}s: teacher em {info['teacher_em']:.3f}")
    finally:
        torch.set_num_threads(threads)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _tokenizers(recipe: DemoRecipe, spec: TaskSpec, train: list[Problem]) -> tuple:
    """(teacher, student) tokenizers fit on the same text but disagreeing on merges and ids."""
    from rayjobs.demo.tokenizers import END_OF_TEXT, IM_END, IM_START, PAD, train_chat_tokenizer

    corpus = [training_messages(p, spec) for p in train[: recipe.tokenizer_corpus]]
    teacher = train_chat_tokenizer(
        corpus, recipe.teacher_vocab_size, (END_OF_TEXT, IM_START, IM_END),
        pad_token=END_OF_TEXT, model_max_length=recipe.teacher.max_position_embeddings, pre_tokenizer="qwen2",
    )
    student = train_chat_tokenizer(
        corpus, recipe.student_vocab_size, (IM_START, IM_END, END_OF_TEXT, PAD),
        pad_token=PAD, model_max_length=recipe.student.max_position_embeddings, pre_tokenizer="gpt2",
    )
    return teacher, student


def _train_teacher(recipe: DemoRecipe, spec: TaskSpec, tokenizer, heldout: list[Problem],
                   validation: list[Problem], paths: dict[str, Path], progress: Callable[[str], None]) -> dict:
    """Train, save and measure the teacher; refuses (raises) a teacher below ``min_teacher_em``."""
    from transformers import AutoTokenizer

    from rayjobs.demo.evaluate import exact_match, exact_match_records
    from rayjobs.demo.models import build_teacher, param_count, save_model
    from rayjobs.demo.tokenizers import save_tokenizer
    from rayjobs.demo.train_lm import encode_example, train_causal_lm

    teacher = build_teacher(tokenizer, recipe.teacher.model_dump(), recipe.seed)
    # Train with the tokenizer exactly as loaders will see it: AutoTokenizer picks the class from
    # the saved model config (Qwen2Tokenizer for a Qwen2 model), not from the object we built.
    teacher.config.save_pretrained(paths["teacher"])
    save_tokenizer(tokenizer, paths["teacher"])
    loaded = AutoTokenizer.from_pretrained(paths["teacher"])
    examples = (
        encode_example(loaded, prompt_messages(p, spec), assistant_content(p))
        for p in training_stream(spec, recipe.seed, exclude=[*heldout, *validation])
    )
    val_records = [prompt_record(f"val-{i}", p, spec) for i, p in enumerate(validation)]
    settings = recipe.sft_settings()
    params = param_count(teacher)
    progress(f"teacher: Qwen2 {params:,} params, training up to {recipe.steps} steps")
    training = train_causal_lm(
        teacher, loaded, examples, settings,
        evaluate=lambda: exact_match_records(teacher, loaded, val_records)["em"],
        progress=progress,
    )
    save_model(teacher, tokenizer, paths["teacher"])
    em = exact_match(paths["teacher"], paths["heldout_jsonl"])["em"]
    progress(f"teacher held-out em {em:.3f} on {len(heldout)}")
    if em < recipe.min_teacher_em:
        raise RuntimeError(f"teacher held-out em {em:.3f} < min_teacher_em {recipe.min_teacher_em}; not caching")
    return {"em": em, "params": params, "training": training}


def _make_students(recipe: DemoRecipe, teacher_tok, student_tok, teacher_params: int, paths: dict[str, Path],
                   progress: Callable[[str], None]) -> dict:
    """Random-init students, saved and measured untrained (the baseline distillation must beat)."""
    from rayjobs.demo.evaluate import exact_match
    from rayjobs.demo.models import build_student, param_count, save_model

    students = {
        "student": (build_student(student_tok, recipe.student.model_dump(), recipe.seed + 1), student_tok),
        "student_same_tokenizer": (build_student(teacher_tok, recipe.student.model_dump(), recipe.seed + 2),
                                   teacher_tok),
    }
    params = {name: param_count(model) for name, (model, _) in students.items()}
    ratio = max(params.values()) / teacher_params
    if ratio > MAX_STUDENT_PARAM_RATIO:
        raise ValueError(f"students have {ratio:.3f} of the teacher's parameters (> {MAX_STUDENT_PARAM_RATIO})")
    for name, (model, tokenizer) in students.items():
        save_model(model, tokenizer, paths[name])
    em = {name: exact_match(paths[name], paths["heldout_jsonl"])["em"] for name in students}
    progress(f"students: Llama {params['student']:,} params ({ratio:.3f} of the teacher), untrained em {em}")
    return {"em": em, "params": params}
