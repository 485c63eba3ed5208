"""The offline demo world: a synthetic addition task, a trained tiny teacher, untrained students.

Kept import-free: ``rayjobs.demo.world`` is the entry point (``prepare``, ``resolve_model_ref``)
and loads torch only when a world must be built.
"""
