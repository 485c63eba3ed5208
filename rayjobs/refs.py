"""Turn config references into something the engines can open.

``demo:*`` names an artifact of the offline demo world (built on first use);
``s3://`` models are copied to a local cache because tokenizers and vLLM load from
local directories; data locations stay as they are (Ray Data reads s3:// itself).
"""

from __future__ import annotations

from cluster.storage import localize


def resolve_data(ref: str) -> str:
    if ref.startswith("demo:"):
        from rayjobs.demo.world import resolve_model_ref

        return resolve_model_ref(ref)
    return ref


def resolve_model(ref: str) -> str:
    return localize(resolve_data(ref))


def existing_model(ref: str) -> str | None:
    """Where ``ref`` is now, without building or downloading anything; None if it is not there yet."""
    import os

    from cluster.storage import is_s3

    if ref.startswith("demo:r1-"):
        from rayjobs.demo.r1_world import cached_r1_ref

        return cached_r1_ref(ref)
    if ref.startswith("demo:"):
        from rayjobs.demo.world import MODEL_REFS, cached

        world = cached()
        return str(getattr(world, MODEL_REFS[ref])) if world and ref in MODEL_REFS else None
    return ref if is_s3(ref) or os.path.isdir(ref) else None
