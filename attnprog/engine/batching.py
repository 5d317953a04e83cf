"""Batches of texts for a forward pass: grouped by length, right-padded, with the pad id."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attnprog.errors import ModelError


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Text indices grouped by similar length, so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda s: lengths[s])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class Batch:
    """Right-padded token ids of a batch of texts, and what sources need to build their matrices.

    input_ids, attention_mask [batch, width] (width: the longest text's length); lengths
    [batch]; ``sentences`` for Program sources;
    ``indices`` are the texts' positions in the corpus an ``OutputsRow`` was evaluated on.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: list[int]
    sentences: list | None = None
    indices: list[int] | None = None

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])


def make_batch(
    token_ids: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    sentences: list | None = None,
    indices: list[int] | None = None,
    device: str | torch.device = "cpu",
) -> Batch:
    """Left-aligned, right-padded batch from token id lists."""
    lengths = [len(ids) for ids in token_ids]
    if not lengths or min(lengths) == 0:
        raise ModelError("a batch needs at least one text and every text at least one token")
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for b, ids in enumerate(token_ids):
        input_ids[b, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[b, : len(ids)] = 1
    return Batch(input_ids.to(device), attention_mask.to(device), lengths, sentences, indices)


def pad_token_id(tokenizer) -> int:
    """Any valid id works for padding (masked out); prefer pad, then eos, then 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if isinstance(value, int):
            return value
    return 0
