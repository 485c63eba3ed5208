"""Does a model reference point at a model? Checked before any engine or Ray process starts.

A reference is a local directory, an ``s3://`` prefix or a hub id (``org/name``). Each must hold a
``config.json`` and a tokenizer (``tokenizer.json``, or the files a slow tokenizer needs). The
check reads only those small files, with the credentials the job will use (``AWS_*`` for S3,
``HF_TOKEN`` for the hub, which is never printed), and returns the facts that decide a path
later (vocabulary size, context length, chat template) for the run's preflight summary.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from cluster.storage import is_s3, join, read_bytes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "qwen.tiktoken")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelFacts:
    """What a preflight learns about a model: problems (one line each) and a few facts."""

    problems: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)


def is_hub_id(ref: str) -> bool:
    return not is_s3(ref) and not os.path.exists(ref) and bool(HUB_ID.match(ref))


def read_model_file(ref: str, name: str) -> bytes | None:
    """One small file of a model (local dir, s3:// or hub id: the hub cache, or a download with
    ``HF_TOKEN`` unless ``HF_HUB_OFFLINE``); None when it is not there."""
    if not is_hub_id(ref):
        return read_bytes(join(ref, name))
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(ref, name, token=os.environ.get("HF_TOKEN") or None)
    except Exception:  # not in the cache offline, not on the hub, no access: all "not there" here
        return None
    return _read_path(path)


def _facts(config: dict, tokenizer_config: dict | None) -> dict:
    text = {**config, **config.get("text_config", {})}
    return {
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "vocab_size": text.get("vocab_size"),
        "context": text.get("max_position_embeddings"),
        "chat_template": bool(tokenizer_config and tokenizer_config.get("chat_template")),
    }


def _from_files(read, where: str, has) -> ModelFacts:
    out = ModelFacts()
    raw = read("config.json")
    if raw is None:
        out.problems.append(f"no config.json in {where} (is it a Hugging Face model directory?)")
        return out
    try:
        config = json.loads(raw)
    except ValueError as e:
        out.problems.append(f"config.json in {where} is not JSON ({e})")
        return out
    if not any(has(name) for name in TOKENIZER_FILES):
        out.problems.append(f"no tokenizer in {where} (looked for {', '.join(TOKENIZER_FILES)})")
    tok_raw = read("tokenizer_config.json")
    out.facts = _facts(config, json.loads(tok_raw) if tok_raw else None)
    if not out.facts["chat_template"] and read("chat_template.jinja") is not None:
        out.facts["chat_template"] = True
    return out


def check_local_or_s3(location: str) -> ModelFacts:
    if not is_s3(location) and not os.path.isdir(location):
        return ModelFacts([f"not found: {location} is not a directory"])
    try:
        return _from_files(lambda name: read_bytes(join(location, name)), location,
                           lambda name: read_bytes(join(location, name)) is not None)
    except OSError as e:  # S3: credentials, bucket, endpoint
        return ModelFacts([f"cannot read {location} ({str(e).splitlines()[0]})"])


def check_hub(repo_id: str) -> ModelFacts:
    """In the local hub cache when offline (``HF_HUB_OFFLINE=1``); otherwise asked of the hub."""
    from huggingface_hub import constants, try_to_load_from_cache

    def cached(name: str) -> str | None:
        path = try_to_load_from_cache(repo_id, name)
        return path if isinstance(path, str) else None

    if constants.HF_HUB_OFFLINE:
        if cached("config.json") is None:
            return ModelFacts([f"hub id {repo_id} is not in the local hub cache ({constants.HF_HUB_CACHE}) and "
                               "HF_HUB_OFFLINE=1 forbids downloading it"])
        return _from_files(lambda n: _read_path(cached(n)), f"the hub cache of {repo_id}",
                           lambda n: cached(n) is not None)
    return _check_hub_online(repo_id)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connect, not the hub client's minute of retries, decides whether to ask the hub."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
        return True
    except OSError:
        return False


def _check_hub_online(repo_id: str) -> ModelFacts:
    from huggingface_hub import HfApi

    token = os.environ.get("HF_TOKEN") or None
    if not _hub_reachable():
        return ModelFacts([f"hub id {repo_id}: the hub is not reachable; set HF_HUB_OFFLINE=1 with the model in "
                           "the hub cache, or use a local directory or s3://"])
    api = HfApi()
    try:
        found = {name for name in ("config.json", *TOKENIZER_FILES) if api.file_exists(repo_id, name, token=token)}
    except Exception as e:  # the hub client raises several HTTP error types; any of them is this one line
        hint = "" if token else "; private or gated? set HF_TOKEN"
        return ModelFacts([f"hub id {repo_id} not accessible ({type(e).__name__}{hint})"])
    missing = [] if "config.json" in found else ["config.json"]
    if not found & set(TOKENIZER_FILES):
        missing.append("a tokenizer")
    return ModelFacts([f"hub id {repo_id} has no {' and no '.join(missing)}"] if missing else [])


def _read_path(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def check_model(ref: str) -> ModelFacts:
    """``ref`` already resolved (no ``demo:``): a local dir, s3:// or a hub id."""
    return check_hub(ref) if is_hub_id(ref) else check_local_or_s3(ref)
