"""Train a full-vocabulary teacher cheaply: learn on the task's few ids, then place them at their real ids.

A 129,280-way softmax costs ~100x a 1k-way one per token, and the addition task only ever shows
the tokenizer about a thousand distinct ids (DeepSeek's 3-digit number tokens, the template's
markers, a few English and Chinese words). So the teacher is trained as a small model whose
vocabulary is exactly that id set, and its embedding rows are then copied to their real ids in a
full-vocabulary model of the same shape. The untouched rows get small random values: the saved
teacher then puts a soft tail of probability on the rest of the vocabulary, as a real model does,
so top-k logprobs at the real vocabulary are not degenerate.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from rayjobs.demo.train_lm import IGNORE_INDEX


def compact_ids(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> list[int]:
    """Sorted real ids of every token in ``texts`` plus the tokenizer's special tokens."""
    ids = set(tokenizer.all_special_ids)
    for text in texts:
        ids.update(tokenizer.encode(text, add_special_tokens=False))
    return sorted(ids)


class CompactIds:
    """The bijection real id <-> compact id over one id set; encoding fails loudly on an id outside it."""

    def __init__(self, real_ids: Sequence[int]):
        self.real_ids = list(real_ids)
        self._compact = {real: i for i, real in enumerate(self.real_ids)}

    def __len__(self) -> int:
        return len(self.real_ids)

    def encode(self, ids: Sequence[int]) -> list[int]:
        try:
            return [i if i == IGNORE_INDEX else self._compact[i] for i in ids]
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the compact vocabulary; widen the "
                             "texts compact_ids was built from") from None

    def examples(self, stream: Iterator[tuple[list[int], list[int]]]) -> Iterator[tuple[list[int], list[int]]]:
        """(input_ids, labels) pairs of real ids, re-expressed in compact ids."""
        for ids, labels in stream:
            yield self.encode(ids), self.encode(labels)

    def special_ids(self, ids: dict[str, int | None]) -> dict[str, int | None]:
        return {k: None if v is None else self._compact[v] for k, v in ids.items()}


def expand(compact: PreTrainedModel, full_config: PretrainedConfig, ids: CompactIds, tail_scale: float,
           seed: int) -> PreTrainedModel:
    """A full-vocabulary copy of ``compact``: trained rows at their real ids, a random tail elsewhere.

    Tail rows are N(0, (tail_scale * std of the trained rows)^2), so their logits sit near zero while
    the trained ids' logits stay far above: greedy answers are unchanged and the tail's share of
    the probability mass is small but not zero. Embeddings are tied, so this sets the LM head too.
    """
    full = type(compact)(full_config)
    body = {k: v for k, v in compact.state_dict().items() if "embed_tokens" not in k and k != "lm_head.weight"}
    missing, unexpected = full.load_state_dict(body, strict=False)
    if unexpected or any("embed_tokens" not in k and k != "lm_head.weight" for k in missing):
        raise ValueError(f"compact and full teacher shapes differ: missing {missing}, unexpected {unexpected}")
    trained = compact.get_input_embeddings().weight.detach()[: len(ids)]
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(full_config.vocab_size, trained.shape[1], generator=generator)
    table.mul_(tail_scale * float(trained.std()))
    table[torch.tensor(ids.real_ids)] = trained
    with torch.no_grad():
        full.get_input_embeddings().weight.copy_(table)
    full.tie_weights()
    full.eval()
    return full


@torch.no_grad()
def tail_mass(model: PreTrainedModel, batch: dict[str, torch.Tensor], ids: CompactIds) -> float:
    """Mean probability the full model puts outside the task's id set, over the labelled positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    probs = logits.float().softmax(-1)
    inside = probs[..., torch.tensor(ids.real_ids)].sum(-1)
    # Logits at position t predict the label at t + 1.
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    return float((1 - inside[:, :-1])[mask].mean())
