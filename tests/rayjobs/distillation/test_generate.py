"""Greedy batched generation, the held-out eval's and the demo world's (one helper for both)."""

import torch

from rayjobs.distillation.evaluate import Generations, count_generated, generate_greedy

EOS, PAD = 2, 0


def test_count_generated_stops_at_each_rows_first_eos():
    new = torch.tensor([[5, EOS, PAD, PAD], [5, 6, 7, 8], [EOS, PAD, PAD, PAD], [5, EOS, 6, EOS]])
    assert count_generated(new, EOS) == 2 + 4 + 1 + 2


def test_tokens_per_s_is_none_without_elapsed_time():
    assert Generations(["a"], 4, 2.0).tokens_per_s == 2.0
    assert Generations(["a"], 4, 0.0).tokens_per_s is None


def test_generate_greedy_restores_the_callers_modes(tiny_pair, tiny_rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["student"])
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["student"]).train()
    tokenizer.padding_side = "right"
    conversations = [row["messages"] for row in tiny_rows[:5]]
    out = generate_greedy(model, tokenizer, conversations, max_new_tokens=4, batch_size=2)
    assert len(out.texts) == 5 and 5 <= out.tokens <= 5 * 4
    assert model.training and tokenizer.padding_side == "right"
