"""Teacher generation: Ray Data streams prompts through a vLLM actor pool into student preprocessing.

Supplied samples (``input.response_field``) skip the engine, or go through it once to be scored
(``score_supplied``): the preprocessing, rejects, shards and manifest are the same.

Wiring only: the row logic lives in ``stages``, the engine in ``teacher``, bookkeeping in
``assemble``, storage in ``shards``. The driver just drains the stream into shards (it never holds more
than one shard of rows), so memory stays flat as the input grows.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial

from datasets_pipeline import records as R
from datasets_pipeline.assemble import Assembler, Completed
from datasets_pipeline.config import GenerationConfig
from datasets_pipeline.engine import engine_stage_kwargs, kv_cache_size, sampling_params
from datasets_pipeline.shards import Progress, ShardStore
from datasets_pipeline.stages import SAMPLE_KEYS, InputRejects, PromptStage, StudentStage, SuppliedStage
from datasets_pipeline.diagnostics import one_hot_warning, summarize
from datasets_pipeline.stats import SPLITS, total
from datasets_pipeline.vocab_cache import tokenizer_records

PROGRESS_EVERY_S = 10.0


class ShardWriter:
    """Buffers completed prompts and commits them a shard at a time."""

    def __init__(self, store: ShardStore, progress: Progress, shard_rows: int):
        self.store = store
        self.shard = progress.next_shard
        self.totals = Counter(progress.counts)
        self.shard_rows = shard_rows
        self.buf = Completed()
        self.input_sources: list[str] = []

    def add(self, done: Completed) -> None:
        self.buf.extend(done)
        if len(self.buf.samples) + len(self.buf.rejects) >= self.shard_rows:
            self.flush()

    def add_input_reject(self, row: dict) -> None:
        self.input_sources.append(row["source"])
        self.add(Completed(rejects=[row]))

    def flush(self) -> None:
        b = self.buf
        if not (b.samples or b.rejects or b.prompt_ids):
            return
        counts = Counter({"kept": len(b.samples)})
        counts.update("input_rejected" if r["stage"] == "input" else r["reason"] for r in b.rejects)
        self.store.write_shard(self.shard, b.samples, b.rejects, b.prompt_ids + self.input_sources,
                               b.dedupe_keys, counts)
        self.totals.update(counts)
        self.shard += 1
        self.buf = Completed()
        self.input_sources = []


class BackgroundRows:
    """Iterates a dataset on a thread; the caller collects its rows from its own thread."""

    def __init__(self, dataset):
        self._rows: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, args=(dataset,), daemon=True)
        self._thread.start()

    def _drain(self, dataset) -> None:
        try:
            for row in dataset.iter_rows():
                self._rows.put(row)
        except BaseException as e:  # handed to the caller's thread in rest()
            self._error = e

    def ready(self) -> list[dict]:
        out = []
        while True:
            try:
                out.append(self._rows.get_nowait())
            except queue.Empty:
                return out

    def rest(self) -> list[dict]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.ready()


def _one_actor():
    """One actor per stage: each loads its tokenizers once. ``concurrency=1`` meant the same, but
    Ray 2.51+ logs a deprecation warning for it on every run."""
    import ray.data

    return ray.data.ActorPoolStrategy(size=1)


def _in_order(dataset):
    """Rows leave in input order, so a rerun writes the same shards in the same order. Training reads
    them in that order (then shuffles by its own seed), and on the demo the order alone moved a
    distillation's held-out EM between 0.3 and 1.0: without this a regeneration did not reproduce it."""
    dataset.context.execution_options.preserve_order = True
    return dataset


def _student_pass(cfg: GenerationConfig, teacher: str, student: str, samples) -> Iterator[dict]:
    """Supplied teacher samples through ``StudentStage``, in input order (no engine)."""
    out = samples.map(
        StudentStage,
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "teacher_path": teacher, "student_path": student},
        compute=_one_actor(),
        num_cpus=0.5,
    )
    return _in_order(out).iter_rows()


# Batches in flight per engine actor, each on its own thread of the actor: they share the engine
# (teacher.EngineLoop), so a new batch joins the running ones, and while one batch's rows are decoded
# and tokenized for the student, the engine keeps generating the others. Ray Data runs an actor's
# calls one at a time unless ``enable_true_multi_threading`` is set, which TeacherStage is safe for.
IN_FLIGHT = 4


def _placement_group_strategy(config: dict) -> dict:
    """Actor options: a fresh placement group of the engine's bundles for each engine actor."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = ray.util.placement_group(**config)
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)}


def _engine_pass(cfg: GenerationConfig, teacher: str, student: str, requests,
                 kv_cache_bytes: int | None) -> Iterator[dict]:
    """Requests -> student rows, in input order, through the engine actor pool (``teacher.TeacherStage``)."""
    import ray.data

    from datasets_pipeline.teacher import TeacherStage

    pool = engine_stage_kwargs(cfg, teacher, kv_cache_bytes)
    # An input file is read as one block, and one block is one task: blocks of batch_size rows let
    # IN_FLIGHT batches overlap in the engine and each batch's rows reach the driver (progress,
    # shard commits) as soon as it is done, not when the whole file is.
    requests = requests.repartition(target_num_rows_per_block=cfg.engine.batch_size)
    low, high = pool["replicas"]
    remote = dict(pool["actor"])
    if pool["placement_group"]:
        remote["ray_remote_args_fn"] = partial(_placement_group_strategy, pool["placement_group"])
    out = requests.map_batches(
        TeacherStage,
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "teacher_path": teacher, "student_path": student,
                               "engine_kwargs": pool["engine_kwargs"]},
        batch_size=cfg.engine.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high, max_tasks_in_flight_per_actor=IN_FLIGHT,
                                           max_concurrent_calls_per_actor=IN_FLIGHT, enable_true_multi_threading=True),
        **remote,
    )
    # A block at a time as Arrow: the per-token columns reach the driver as NumPy views, no Python
    # int or float per token (``records.table_rows``).
    for table in _in_order(out).iter_batches(batch_format="pyarrow", batch_size=None):
        yield from R.table_rows(table)


def _passes(cfg: GenerationConfig, teacher: str, student: str, requests, kv_cache_bytes: int | None):
    """The stream of student rows, and how to retry its engine errors once (None: they are set aside).

    Supplied samples need no engine. A scoring request is not retried: it fails for what it is
    (mostly prompt + response longer than engine.max_model_len), which a retry does not change.
    """
    if not cfg.runs_engine:
        return _student_pass(cfg, teacher, student, requests), None
    if cfg.score_supplied:
        return _engine_pass(cfg, teacher, student, requests, kv_cache_bytes), None
    return (_engine_pass(cfg, teacher, student, requests, kv_cache_bytes),
            lambda rows: _engine_pass(cfg, teacher, student, _retry_requests(rows, cfg), kv_cache_bytes))


def _retry_requests(rows: list[dict], cfg: GenerationConfig):
    """Engine-error rows as engine requests again, with the prompt StudentStage put in them."""
    import ray.data

    keys = (*SAMPLE_KEYS, "prompt")
    return ray.data.from_items([{**{k: r[k] for k in keys}, "sampling_params": sampling_params(cfg)} for r in rows])


def run_generation(cfg: GenerationConfig, *, teacher: str, student: str, input_path: str,
                   config_digest: str, log=print) -> dict:
    """Generate, preprocess and write shards; resume from committed shards. Returns the manifest."""
    store = ShardStore(cfg.output, config_digest)
    manifest = store.read_manifest()
    if manifest and manifest.get("complete") and manifest.get("config_digest") == config_digest:
        log(f"generation: {cfg.output} is complete for this config; skipping")
        return manifest
    prog = store.load_progress()
    if prog.done:
        log(f"generation: resuming, {len(prog.done)} prompts/rows already committed in {prog.next_shard} shards")
    from datasets_pipeline.sources import read_source

    tokenizers = tokenizer_records(teacher, student)
    cfg_json = cfg.model_dump(mode="json")
    writer = ShardWriter(store, prog, cfg.shard_rows)
    source = read_source(cfg.input, input_path)
    # The reject pass runs beside the engine pass: run one after the other, its actor start-up and
    # full read of the input came before the engine even started loading (~10 s per run here).
    input_rejects = BackgroundRows(source.flat_map(
        InputRejects, fn_constructor_kwargs={"cfg": cfg_json, "teacher_path": teacher, "done": prog.done},
        compute=_one_actor()))

    assembler = Assembler(cfg.sampling.n, cfg.preprocess.keep, cfg.preprocess.dedupe, prog.done, prog.dedupe_keys)
    requests = source.flat_map(
        SuppliedStage if cfg.samples_source == "supplied" else PromptStage,
        fn_constructor_kwargs={"cfg": cfg_json, "teacher_path": teacher, "done": prog.done},
        compute=_one_actor(),
    )
    kv = kv_cache_size(cfg, teacher) if cfg.runs_engine else None
    if kv:
        log(f"generation: KV cache {kv.gib:.3f} GiB per engine ({kv.how})")
    if not cfg.runs_engine:
        log(f"generation: samples supplied by {cfg.input.path} ({cfg.input.response_field}); no engine runs")
    start = time.perf_counter()
    stream, rerun = _passes(cfg, teacher, student, requests, kv.bytes if kv else None)
    tokens = _drain(stream, rerun, writer, assembler, input_rejects, log)
    for bad in input_rejects.rest():
        writer.add_input_reject(bad)
    incomplete = assembler.close()
    if incomplete.prompt_ids:
        log(f"generation: {len(incomplete.prompt_ids)} prompts did not get all {cfg.sampling.n} samples; "
            "set aside as incomplete_samples")
    writer.add(incomplete)
    writer.flush()
    wall = time.perf_counter() - start
    return _finish_manifest(store, cfg, writer.totals, config_digest, wall, tokens, log, tokenizers)


def _drain(stream, rerun, writer: ShardWriter, assembler: Assembler, input_rejects: BackgroundRows, log) -> int:
    """Stream student rows into shards, engine errors through ``rerun`` once when it is given;
    returns the teacher tokens."""
    start = time.perf_counter()
    tokens = samples = 0
    last_log = start
    retry: list[dict] = []
    for attempt in (1, 2):
        for row in stream:
            if row["status"] == R.ENGINE_ERROR and rerun is not None and attempt == 1:
                retry.append(row)
                continue
            samples += 1
            tokens += len(row["teacher_token_ids"])
            writer.add(assembler.add(row))
            for bad in input_rejects.ready():
                writer.add_input_reject(bad)
            if time.perf_counter() - last_log > PROGRESS_EVERY_S:
                last_log = time.perf_counter()
                rate = tokens / (last_log - start)
                log(f"generation: {samples} samples, {tokens} tokens ({rate:.0f} tokens/s), "
                    f"{writer.totals['kept'] + len(writer.buf.samples)} kept")
        if not retry or attempt == 2:
            break
        log(f"generation: retrying {len(retry)} samples that failed in the engine")
        stream = rerun(retry)
    return tokens


def _finish_manifest(store: ShardStore, cfg: GenerationConfig, totals: Counter, digest: str,
                     wall: float, tokens_this_run: int, log, tokenizers: dict) -> dict:
    """Write and return the manifest, totalled from the progress files' statistics (not the shards).

    ``topk_bytes_per_token`` is ``stats.topk_bytes`` (6 bytes per top-k entry plus 8 bytes of
    offsets per row: the Arrow ``nbytes`` of the two columns as written) over the generated tokens.
    It used to be their ``nbytes`` as read back from Parquet, where the reader adds a validity bitmap
    to the list values (1 bit per entry, k/4 bytes per token for the two columns): the figure is that
    much lower now for the same data. ``tokenizers`` (``vocab_cache.tokenizer_records``) names the
    teacher's and student's tokenizers by content hash, so training can refuse another student's.
    """
    stats = store.committed_stats()
    gen_tokens = total(stats, "generated_tokens")
    manifest = {
        "complete": True,
        "config_digest": digest,
        "samples_source": cfg.samples_source,
        "output": cfg.output,
        "counts": dict(totals),
        "rows": {split: total(stats, "rows", [split]) for split in SPLITS},
        "generated_tokens": gen_tokens,
        "topk_k": cfg.sampling.logprobs_topk,
        "topk_bytes_per_token": round(total(stats, "topk_bytes") / gen_tokens, 3) if gen_tokens else 0.0,
        "tokenizers": tokenizers,
        "stats": stats,
        "teacher_diagnostics": summarize(stats),
        "throughput": {
            "wall_s": round(wall, 2),
            "tokens_this_run": tokens_this_run,
            "tokens_per_s": round(tokens_this_run / wall, 1) if wall > 0 else 0.0,
        },
    }
    store.write_manifest(manifest)
    warning = one_hot_warning(manifest["teacher_diagnostics"])
    if warning:
        log(f"generation: note: {warning}")
    log(f"generation: done: {manifest['rows']} rows kept, counts {manifest['counts']}, "
        f"{manifest['throughput']['tokens_per_s']} tokens/s, top-k {manifest['topk_bytes_per_token']} B/token")
    return manifest
