"""Optimizer benchmark: AdamW vs Adafactor vs LAMB (``optim.optimizer``) on the demo student's shape.

Same model init, same batches, the train loop's own param groups and optimizer factory
(``rayjobs.distillation.schedule.param_groups``, ``optimizers.make_optimizer``), constant LR after
a short warm-up. The task is synthetic and learnable (copy: the second half of each sequence
repeats the first), the loss the LM cross-entropy on the second half. Measured side by side:

* optimizer state bytes after the first step (what ZeRO would otherwise have to shard), per
  optimizer and as a ratio to AdamW's;
* mean training loss over the last 10 steps.

Prints the table and ends with one JSON line:
  adafactor_state_vs_adamw, lamb_state_vs_adamw   optimizer state bytes / AdamW's
  adamw_loss, adafactor_loss, lamb_loss            mean loss over the last 10 steps

Usage: python bench/optimizers.py [--steps 150] [--hidden 96] [--layers 2] [--vocab 256]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayjobs.distillation.optimizers import make_optimizer  # noqa: E402
from rayjobs.distillation.schedule import make_lr_lambda, param_groups  # noqa: E402

# Each optimizer at the best of a 3-point LR sweep on the default shape (adafactor 1e-2..1, lamb 3e-3..1e-1).
LRS = {"adamw": 3e-3, "adafactor": 3e-2, "lamb": 3e-2}


def build_model(hidden: int, layers: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(1, hidden // 32)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2 + 32,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=heads, max_position_embeddings=64))


def copy_batches(steps: int, batch: int, half: int, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        first = torch.randint(3, vocab, (batch, half), generator=gen)
        ids = torch.cat([first, first], 1)
        labels = ids.clone()
        labels[:, :half] = -100
        out.append((ids, labels))
    return out


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def run(name: str, args, batches) -> dict:
    model = build_model(args.hidden, args.layers, args.vocab)
    lr = LRS[name]
    opt = make_optimizer(param_groups(model.named_parameters(), lr, 0.0, args.layers), name, lr, 0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda("constant", args.steps, 0.0, warmup=10))
    losses, state = [], 0
    for ids, labels in batches:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        state = state or state_bytes(opt)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"state_bytes": state, "param_bytes": params, "loss": sum(losses[-10:]) / 10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = copy_batches(args.steps, 16, 12, args.vocab)
    results = {name: run(name, args, batches) for name in LRS}
    adamw = results["adamw"]["state_bytes"]
    print(f"model: hidden {args.hidden}, {args.layers} blocks, vocab {args.vocab}, "
          f"{results['adamw']['param_bytes'] / 2**20:.2f} MiB of fp32 parameters; {args.steps} steps")
    print(f"{'optimizer':<10} {'lr':>7} {'state MiB':>10} {'x AdamW':>8} {'loss (last 10)':>15}")
    for name, r in results.items():
        print(f"{name:<10} {LRS[name]:>7.0e} {r['state_bytes'] / 2**20:>10.3f} {r['state_bytes'] / adamw:>8.3f} "
              f"{r['loss']:>15.3f}")
    print(json.dumps({"adafactor_state_vs_adamw": round(results["adafactor"]["state_bytes"] / adamw, 4),
                      "lamb_state_vs_adamw": round(results["lamb"]["state_bytes"] / adamw, 4),
                      **{f"{n}_loss": round(r["loss"], 4) for n, r in results.items()}}))


if __name__ == "__main__":
    main()
