"""The on-policy sampler's weight refresh (rayjobs/distillation/sampler.py) on a real vLLM engine.

After a refresh the sampler must sample from the new weights, all of them: the tiny student ties
its LM head to the embeddings, which vLLM's in-place reload alone leaves on the old tensor (greedy
samples then differed from transformers on the same weights). Greedy decoding of the refreshed
engine is compared with transformers' on the same weights, and a refresh back to the first
weights gives the first samples again.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def _greedy_hf(model_dir, prompt: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_refreshed_sampler_samples_the_new_weights(tiny_world, ray_local, tmp_path):
    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayjobs.distillation.config import OnPolicyConfig
    from rayjobs.distillation.lora import export_student
    from rayjobs.distillation.sampler import start

    base = str(tiny_world.student_same_tokenizer)
    torch.manual_seed(0)
    state = {k: v + 0.5 * torch.randn_like(v) for k, v in AutoModelForCausalLM.from_pretrained(base).state_dict().items()}
    changed = export_student(base, state, None, tmp_path / "changed")
    prompt = AutoTokenizer.from_pretrained(base)("12 + 34 = ", add_special_tokens=False)["input_ids"]
    op = OnPolicyConfig(fraction=1.0, engine_kwargs={"dtype": "float32"})
    sampler = start(op, base, "refresh-test", 128, 0)
    try:
        def greedy() -> list[int]:
            return ray.get(sampler.generate.remote([prompt], [12], 0.0))[0][0]

        first = greedy()
        assert first == _greedy_hf(base, prompt, 12)
        assert ray.get(sampler.reload.remote(str(changed), 5)) > 0
        refreshed, step = ray.get(sampler.generate.remote([prompt], [12], 0.0))
        assert step == 5 and refreshed[0] == _greedy_hf(changed, prompt, 12) != first
        ray.get(sampler.reload.remote(base, 6))
        assert greedy() == first
    finally:
        ray.kill(sampler)
