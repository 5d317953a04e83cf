"""Ablation controls: what a head's output averages to, for mean ablation.

Zero ablation needs nothing measured: the ``"zero"`` source of ``engine.replace`` gives the head
an all-zero attention matrix, so its output before the output projection is exactly zero. Mean
ablation replaces that output by its average over the real tokens of some texts (the selection
split), measured here with the unmodified model through the same attention function.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnprog.engine.batching import batches_by_length, make_batch
from attnprog.engine.replace import MeanOutput, replace_heads


@torch.no_grad()
def head_output_means(
    model, token_ids: Sequence[Sequence[int]], *, batch_size: int = 8, pad_id: int = 0,
    impl: str = "auto",
) -> torch.Tensor:
    """[layers, heads, head_dim] float32: each head's output before the output projection,
    averaged over every real token of ``token_ids`` (padding excluded)."""
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in token_ids]
    sums: dict[int, torch.Tensor] = {}
    count = 0
    with replace_heads(model, {}, impl=impl) as replacement:
        replacement.capture = {}
        for texts in batches_by_length(lengths, batch_size):
            batch = make_batch([token_ids[s] for s in texts], pad_id=pad_id, device=device)
            replacement.forward(batch)
            real = batch.attention_mask.to(torch.float64)  # [batch, query_pos]
            for layer, outputs in replacement.capture.items():
                out = outputs.pop()  # [batch, head_index, query_pos, head_dim]
                total = torch.einsum("bhnd,bn->hd", out.double(), real)
                sums[layer] = sums[layer] + total if layer in sums else total
            count += int(real.sum())
    return torch.stack([sums[layer] for layer in sorted(sums)]).div(count).float().cpu()


def mean_sources(means: torch.Tensor, heads: Sequence[tuple[int, int]]) -> dict:
    """replace_heads' sources for mean-ablating ``heads`` (layer, head) with ``means``."""
    return {(layer, head): MeanOutput(means[layer, head]) for layer, head in heads}
