"""Artifact locations: a local path or an ``s3://bucket/key`` URI, everywhere.

Every stage reads and writes through pyarrow's filesystem layer so the same code
serves a laptop directory and an S3 bucket (or an S3-protocol server such as
MinIO or moto, chosen with ``AWS_ENDPOINT_URL``). Nothing here imports Ray.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from typing import Annotated
from urllib.parse import urlparse

from pydantic import AfterValidator

_SCHEMES = ("", "file", "s3")


def check_location(value: str) -> str:
    """Reject locations no stage can use before any work starts."""
    if not value or not value.strip():
        raise ValueError("must be a non-empty local path or s3:// URI")
    scheme = urlparse(value).scheme
    # Windows drive letters ("C:\\...") parse as a one-letter scheme; a 'name:ref' without '//' is a
    # named reference that the job's resolver turns into a path before any stage reads it.
    if len(scheme) > 1 and scheme not in _SCHEMES and "://" in value:
        raise ValueError(f"unsupported scheme '{scheme}://' (use a local path or s3://bucket/prefix)")
    if scheme == "s3" and not urlparse(value).netloc:
        raise ValueError("s3:// URI needs a bucket, e.g. s3://my-bucket/raystill")
    return value


Location = Annotated[str, AfterValidator(check_location)]


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path segments with '/' for URIs and os.sep semantics for local paths."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(base, *parts)


def filesystem(location: str):
    """Return ``(pyarrow_filesystem, path_within_it)`` for a location.

    S3 endpoint, region and credentials come from the standard AWS environment
    variables (``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ...), never from YAML,
    so secrets stay out of configs and Kubernetes can inject them from Secrets.
    """
    from pyarrow import fs

    if is_s3(location):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc or endpoint
            kwargs["scheme"] = parsed.scheme or "https"
        return fs.S3FileSystem(**kwargs), location[len("s3://"):]
    return fs.LocalFileSystem(), os.path.abspath(location)


def cache_dir() -> str:
    """This node's cache root: ``$RAYSTILL_CACHE``, else ``~/.cache/raystill`` (models, maps, worlds)."""
    return os.environ.get("RAYSTILL_CACHE") or os.path.expanduser("~/.cache/raystill")


# What a model directory holds besides its tokenizer and config: never needed to read a tokenizer.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def localize(location: str, cache_root: str | None = None, tokenizer_only: bool = False) -> str:
    """A local directory holding ``location``'s files, downloading s3:// once into a cache.

    Tokenizers and transformers load from local paths only; every actor on a node reuses one
    copy. The cache key is the URI plus the listing (names, sizes, modification times): objects
    replaced at the same URI are fetched again instead of being served stale from the cache.
    ``tokenizer_only`` leaves the weights out: a process that only tokenizes (the generation driver
    hashing tokenizers, a stage actor) must not copy a teacher's hundreds of GB to its node.
    """
    if not is_s3(location):
        return location
    import hashlib

    from pyarrow import fs as pafs

    src_fs, src = filesystem(location)
    listing = sorted((i.path, i.size, i.mtime_ns) for i in src_fs.get_file_info(pafs.FileSelector(src, recursive=True))
                     if i.type == pafs.FileType.File and not (tokenizer_only and i.path.endswith(WEIGHT_SUFFIXES)))
    root = cache_root or os.path.join(cache_dir(), "s3")
    dest = os.path.join(root, hashlib.sha256(repr((location, listing)).encode()).hexdigest()[:16])
    marker = os.path.join(dest, ".complete")
    if not os.path.exists(marker):
        tmp = f"{dest}.tmp{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)  # pyarrow does not create it for a folder without subfolders
        local = pafs.LocalFileSystem()
        if tokenizer_only:  # file by file: only the listed (non-weight) files
            for path, _, _ in listing:
                target = os.path.join(tmp, os.path.relpath(path, src))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                pafs.copy_files(path, target, source_filesystem=src_fs, destination_filesystem=local)
        else:  # one call: pyarrow copies the files in parallel
            pafs.copy_files(src, tmp, source_filesystem=src_fs, destination_filesystem=local)
        open(os.path.join(tmp, ".complete"), "w").close()
        os.makedirs(root, exist_ok=True)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def write_bytes(location: str, data: bytes, atomic: bool = False) -> None:
    """Write one object/file at a local path or s3:// URI, creating parent directories.

    ``atomic``: readers see the old content or the new, never a part. Commit markers need it: a
    process killed mid-write left a torn local file that the next run failed to parse. Locally the
    data goes to a temporary file beside the target, then ``os.replace``; an S3 PUT is already
    all-or-nothing.
    """
    fs, path = filesystem(location)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    if atomic and not is_s3(location):
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_bytes(location: str) -> bytes | None:
    """The content at ``location``, or None when it does not exist."""
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None


def write_json(location: str, data, atomic: bool = False) -> None:
    """``data`` as indented, key-sorted JSON at a local path or s3:// URI (non-JSON values as str)."""
    write_bytes(location, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode(), atomic)


def to_jsonl(rows: Iterable[dict]) -> bytes:
    """One JSON object per line, keys sorted and non-ASCII text kept as is: every JSONL the stages write."""
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode()


def write_jsonl(location: str, rows: Iterable[dict]) -> None:
    """``rows`` as JSONL (``to_jsonl``) at a local path or s3:// URI."""
    write_bytes(location, to_jsonl(rows))


# A served location holds only this pointer to the model version it serves (#17: the gate protects
# what is served). It is replaced in one step: one PUT on S3, a rename on a local disk.
RELEASE_FILE = "RELEASE.json"


def release(served: str, version: str, info: dict) -> None:
    """Point ``served`` at ``version`` (a complete model directory), atomically."""
    write_json(join(served, RELEASE_FILE), {"version": version, **info}, atomic=True)


def follow_release(location: str) -> str:
    """The model directory ``location`` serves: its release's version, or ``location`` itself."""
    raw = read_bytes(join(location, RELEASE_FILE))
    return json.loads(raw)["version"] if raw else location
