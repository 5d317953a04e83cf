"""Token log-probabilities of a model whose chosen heads may be replaced, perplexity, and the KL
divergence of its next-token distributions from the unmodified model's."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass
class TextScores:
    """Per text, one float64 value per predicted token: log p(target) and KL(unmodified ‖ this)."""

    logprobs: list[np.ndarray]
    kl: list[np.ndarray]

    def mean_kl(self) -> float:
        """KL in nats, averaged over every predicted token."""
        return sum(float(k.sum()) for k in self.kl) / max(1, sum(len(k) for k in self.kl))


@torch.no_grad()
def score_against_base(
    model,
    token_ids: Sequence[Sequence[int]],
    conditions: Sequence[dict],
    *,
    batch_size: int = 8,
    impl: str = "auto",
    pad_id: int = 0,
    corpus_indices: Sequence[int] | None = None,
    progress: bool = False,
    desc: str = "forward",
) -> tuple[list[np.ndarray], list[TextScores]]:
    """(unmodified log-probs per text, TextScores per condition), ``conditions`` being
    ``heads`` dicts as :func:`token_logprobs` takes them.

    Batch by batch: one unmodified forward, whose log-distributions stay only while that
    batch's conditions run (vocab × tokens of a whole split would not fit), then one each.
    """
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in token_ids]
    base: list[np.ndarray] = [np.zeros(0)] * len(token_ids)
    scores = [TextScores(list(base), list(base)) for _ in conditions]
    batches = batches_by_length(lengths, batch_size)
    bar = tqdm(total=len(batches) * (1 + len(conditions)), desc=desc, unit="forward",
               disable=None if progress else True, leave=False)
    with replace_heads(model, {}, impl=impl) as replacement, bar:
        for texts in batches:
            indices = texts if corpus_indices is None else [corpus_indices[s] for s in texts]
            batch = make_batch([token_ids[s] for s in texts], pad_id=pad_id, indices=indices,
                               device=device)
            targets = batch.input_ids[:, 1:]
            base_logp = _log_distributions(replacement.forward(batch))
            _scatter(base, texts, lengths, _of_targets(base_logp, targets))
            bar.update()
            for heads, score in zip(conditions, scores, strict=True):
                replacement.use(heads)
                logp = _log_distributions(replacement.forward(batch))
                replacement.use({})
                _scatter(score.logprobs, texts, lengths, _of_targets(logp, targets))
                _scatter(score.kl, texts, lengths, _kl(base_logp, logp))
                bar.update()
    return base, scores


def _log_distributions(output) -> torch.Tensor:
    """[batch, query_pos 0..n-2, vocab] float32 log-softmax of the next-token logits."""
    return torch.log_softmax(output.logits[:, :-1].float(), dim=-1)


def _of_targets(logp: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """[batch, query_pos] log p(target); padding targets are scored, then dropped."""
    return logp.gather(-1, targets[..., None])[..., 0].double().cpu().numpy()


def _kl(base_logp: torch.Tensor, logp: torch.Tensor) -> np.ndarray:
    """[batch, query_pos] KL(base ‖ replaced) in nats, one text at a time (temporaries of
    vocab × tokens stay small)."""
    rows = [(b.exp() * (b - r)).sum(-1) for b, r in zip(base_logp, logp, strict=True)]
    # KL >= 0; float32 rounding of nearly equal distributions can dip just below
    return torch.stack(rows).clamp_min(0.0).double().cpu().numpy()


def _scatter(result: list, texts: Sequence[int], lengths: Sequence[int], values) -> None:
    for b, s in enumerate(texts):
        result[s] = values[b, : lengths[s] - 1]


def perplexity(logprobs: Sequence[np.ndarray]) -> float:
    """exp of the mean negative log-likelihood over all predicted tokens."""
    total = sum(float(lp.sum()) for lp in logprobs)
    count = sum(len(lp) for lp in logprobs)
    if count == 0:
        raise CorpusError("no tokens to score: every text has a single token")
    return math.exp(-total / count)
