"""LoRA wiring: which weights train, and that the export folds everything trained into the base."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rayjobs.distillation.config import LoraConfig
from rayjobs.distillation.lora import apply_lora, build_export_model


def _tiny(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    return LlamaForCausalLM.from_pretrained(tmp_path)


def test_modules_to_save_makes_every_norm_trainable(tmp_path):
    model = apply_lora(_tiny(tmp_path), LoraConfig(enabled=True, r=4, modules_to_save=["norm"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = [n for n in trainable if "norm" in n]
    assert len(norms) == 3  # input, post-attention and final norm
    assert not any("embed_tokens" in n for n in trainable)


@pytest.mark.parametrize("saved", [["norm"], ["norm", "embed_tokens"]])
def test_export_keeps_trained_modules_and_adapters(tmp_path, saved):
    lora = LoraConfig(enabled=True, r=4, modules_to_save=saved)
    model = apply_lora(_tiny(tmp_path), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.5)
    x = torch.randint(0, 64, (1, 8))
    expected = model(x).logits
    merged = build_export_model(str(tmp_path), model.state_dict(), lora)
    assert not any("lora" in n or "modules_to_save" in n for n in merged.state_dict())
    torch.testing.assert_close(merged(x).logits, expected, rtol=1e-4, atol=1e-4)


def test_trained_embeddings_stay_tied_to_the_head(tmp_path):
    model = apply_lora(_tiny(tmp_path), LoraConfig(enabled=True, r=4, modules_to_save=["embed_tokens"]))
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    assert torch.equal(model.get_input_embeddings().weight, model.get_output_embeddings().weight)


def test_pickled_weights_are_refused(tmp_path):
    """#17 item 8: a .bin checkpoint is a pickle and runs code while it loads: only safetensors load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayjobs.distillation.lora import load_model

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    import torch

    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "st")
    cfg.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # what an old or hostile repo ships
    assert load_model(str(tmp_path / "st")).config.vocab_size == 32
    with pytest.raises(OSError):
        load_model(str(tmp_path / "bin"))
