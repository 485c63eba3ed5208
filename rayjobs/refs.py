"""Turn config references into something every node can open.

``demo:*`` names an artifact of the offline demo world (built on first use, a local path);
everything else stays as it is. An ``s3://`` model is *not* copied here: the driver's disk is
not the engines' disk on a multi-node cluster, so each process that loads a model localizes it
on its own node (``cluster.storage.localize`` at actor start; ray.data.llm and ray.serve.llm
download an s3:// model on each engine's node themselves).
"""

from __future__ import annotations


def resolve_ref(ref: str) -> str:
    if ref.startswith("demo:"):
        from rayjobs.demo.world import resolve_model_ref

        return resolve_model_ref(ref)
    return ref


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
