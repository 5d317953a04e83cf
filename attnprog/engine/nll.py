"""Token log-probabilities of a model whose chosen heads may be replaced, and perplexity."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from attnprog.engine.batching import batches_by_length, make_batch
from attnprog.engine.replace import replace_heads
from attnprog.errors import CorpusError


@torch.no_grad()
def token_logprobs(
    model,
    token_ids: Sequence[Sequence[int]],
    heads: dict | None = None,
    *,
    batch_size: int = 8,
    impl: str = "auto",
    pad_id: int = 0,
    corpus_indices: Sequence[int] | None = None,
    progress: bool = False,
    desc: str = "forward",
) -> list[np.ndarray]:
    """log p(token t | tokens < t) for t = 1..n-1 of every text: one float64 array per text.

    ``heads`` maps (layer, head) to a source. ``OutputsRow`` sources were evaluated on these
    texts in this order, or on a corpus where text i sits at ``corpus_indices[i]``.
    """
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in token_ids]
    result: list[np.ndarray] = [np.zeros(0)] * len(token_ids)
    with replace_heads(model, heads or {}, impl=impl) as replacement:
        for texts in tqdm(batches_by_length(lengths, batch_size), desc=desc, unit="batch",
                          disable=None if progress else True, leave=False):
            indices = texts if corpus_indices is None else [corpus_indices[s] for s in texts]
            batch = make_batch([token_ids[s] for s in texts], pad_id=pad_id, indices=indices,
                               device=device)
            logits = replacement.forward(batch).logits[:, :-1]  # [batch, query_pos 0..n-2, vocab]
            targets = batch.input_ids[:, 1:]  # padding targets are scored, then dropped
            logp = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                    reduction="none").view(targets.shape)
            logp = logp.double().cpu().numpy()  # one transfer per batch
            for b, s in enumerate(texts):
                result[s] = logp[b, : lengths[s] - 1]
    return result


def perplexity(logprobs: Sequence[np.ndarray]) -> float:
    """exp of the mean negative log-likelihood over all predicted tokens."""
    total = sum(float(lp.sum()) for lp in logprobs)
    count = sum(len(lp) for lp in logprobs)
    if count == 0:
        raise CorpusError("no tokens to score: every text has a single token")
    return math.exp(-total / count)
