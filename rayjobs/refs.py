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
