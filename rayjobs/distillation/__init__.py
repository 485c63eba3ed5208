"""The distillation stage: teacher outputs in, a merged student out.

Pure cores (no Ray, DeepSpeed or vLLM import; unit-tested in milliseconds): ``config`` (the
stage's pydantic model), ``losses``, ``xtok`` (cross-tokenizer), ``feature_losses``,
``collate``, ``schedule``, ``deepspeed_config``, ``plan`` (steps, context, what is supported).
Engines, thin: ``engine`` (the driver's Ray Train wiring: datasets, TorchTrainer, remote
evaluation) and ``worker`` (each Train worker's DeepSpeed loop), with ``checkpoints``, ``lora``,
``online_teacher``, ``batch_loss``, ``evaluate`` and ``curves`` beside them.
"""
