"""Item 5 of #21: feature noise and training-only dropout (pure torch, tiny models built from config)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rayjobs.distillation.regularize import add_hidden_dropout, attention_dropout_kwargs, feature_noise


def test_feature_noise_is_relative_to_each_vectors_rms():
    torch.manual_seed(0)
    small, big = torch.randn(4096, 64), 100 * torch.randn(4096, 64)
    for h in (small, big):
        noise = feature_noise(h, 0.1) - h
        ratio = noise.pow(2).mean(-1).sqrt() / h.pow(2).mean(-1).sqrt()
        assert ratio.mean().item() == pytest.approx(0.1, rel=0.05)
    assert feature_noise(small, 0.0) is small


def test_feature_noise_lets_gradients_through_to_the_student():
    h = torch.randn(3, 8, requires_grad=True)
    feature_noise(h, 0.3).sum().backward()
    assert torch.equal(h.grad, torch.ones(3, 8))  # noise is additive and carries no gradient


def test_feature_noise_sigma_ramps_in_training_and_is_off_in_validation():
    from rayjobs.distillation.batch_loss import BatchLoss
    from rayjobs.distillation.config import DistillationConfig

    cfg = DistillationConfig.model_validate({
        "student": "s", "output": "o",
        "loss": {"kind": "feature", "feature": {"noise": {"sigma": 0.4, "sigma_end": 0.0}}}})
    loss = BatchLoss(cfg, total_steps=5)
    assert [loss.noise_sigma(s) for s in range(5)] == pytest.approx([0.4, 0.3, 0.2, 0.1, 0.0])
    assert BatchLoss(DistillationConfig.model_validate({"student": "s", "output": "o"}), 5).noise_sigma(0) == 0


def _tiny(**overrides):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, **overrides)
    return LlamaForCausalLM(config).eval()


def test_feature_noise_dropout_attention_knob_found_per_architecture():
    from transformers import GPT2Config

    assert attention_dropout_kwargs(LlamaConfig(), 0.1) == {"attention_dropout": 0.1}
    assert attention_dropout_kwargs(GPT2Config(), 0.2) == {"attn_pdrop": 0.2}
    assert attention_dropout_kwargs(LlamaConfig(), 0.0) == {}

    class NoKnob:
        pass

    with pytest.raises(ValueError, match="distillation.dropout.attention"):
        attention_dropout_kwargs(NoKnob(), 0.1)


def test_feature_noise_dropout_acts_in_training_only():
    """Hidden dropout on the block outputs and attention dropout from the config: outputs vary between
    two training forwards, and are exactly the undropped model's in eval mode."""
    ids = torch.randint(0, 32, (2, 12))
    plain = _tiny()
    model = _tiny(attention_dropout=0.3)
    model.load_state_dict(plain.state_dict())
    assert add_hidden_dropout(model, 0.3) == 2
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
        model.train()
        first, second = model(ids).logits, model(ids).logits
    assert not torch.equal(first, second) and not torch.equal(first, plain(ids).logits)


def test_feature_noise_dropout_hidden_hooks_the_named_block_list():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    assert add_hidden_dropout(gpt2, 0.1) == 3
    with pytest.raises(ValueError, match="distillation.dropout.hidden: found 0 block lists"):
        add_hidden_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2)), 0.1)
