"""Fit one readable program per head: a sink share plus a softmax over named features.

Every head of a store is fitted at once (the features are the same for all heads; only the
weights differ) by gradient ascent on the mean soft IoU of the synthesis split. For
row-stochastic matrices a text's IoU is (n - D/2) / (n + D/2) with D the L1 distance, so
this is L1 fitting, not cross-entropy. Two phases: all features with an L1 penalty on the
weights, then the ``max_terms`` strongest features only, refitted without it. A few swap
rounds follow (every feature reopened under the penalty, the strongest chosen again,
refitted), each head keeping its best choice: the first choice is often not the best set.
The weights are rounded for reading, and the rounded fit is what the program computes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attnprog.engine.heads import head_label
from attnprog.engine.store import AttentionStore
from attnprog.kernels.iou import iou_from_l1, iou_from_l1_grad, segment_iou
from attnprog.synth.features import attach_syntax
from attnprog.synth.fitted import (
    EMBEDDING_FEATURE_NAMES,
    FEATURE_NAMES,
    SYNTAX_FEATURE_NAMES,
    feature_packed,
    key_token_name,
    program_from_fit,
    query_token_name,
    round_fit,
)
from attnprog.synth.program import Program


@dataclass
class FitSettings:
    """How hard to fit: terms kept per head, optimiser steps per phase, and where to run."""

    max_terms: int = 12  # features kept per head (the sink share is one more setting)
    search_steps: int = 100  # phase 1: every feature, L1 penalty
    refit_steps: int = 120  # phase 2: the kept features only
    swap_rounds: int = 2  # phase 1 again from the best refit, then phase 2, per round
    reopen_steps: int = 60  # steps of each swap round's phase 1
    lr: float = 0.08
    penalty: float = 2e-3  # L1 on the (scaled) weights during phase 1
    key_tokens: int = 40  # the most frequent token pieces of the split, as key features
    query_tokens: int = 0  # ... and as queries gating the first token (no gain measured)
    heads_per_chunk: int = 48  # bounds memory: [chunk, cells] tensors
    device: str = "cpu"
    syntax: bool = True  # offer POS / dependency features when spaCy is installed
    embeddings: bool = True  # offer token-meaning features when the store keeps embeddings
    initial_share: float | None = None  # None: half the head's mean attention on token 0
    threads: int | None = None  # CPU threads; None: torch's default (every core)


@dataclass
class CorpusFeatures:
    """Features of every causal cell of some texts (cell-major: segment sums over query rows
    and texts are then contiguous), with the indices the loss needs. ``query_rows``: every
    text's query positions back to back (the sum of the texts' lengths)."""

    values: torch.Tensor  # [cells, features] float32, each feature divided by its scale
    scale: torch.Tensor  # [features] what each feature was divided by
    row: torch.Tensor  # [cells] int64 global query row of each cell
    row_cells: torch.Tensor  # [query_rows] cells per query row (i + 1 for query_pos i)
    text_cells: torch.Tensor  # [texts] cells per text
    lengths: torch.Tensor  # [texts] float32 tokens per text (a text's IoU needs n)
    first_cell: torch.Tensor  # [query_rows] int64 the cell of each row's key 0
    text: torch.Tensor  # [cells] int64 the text of each cell


def corpus_features(sentences: Sequence, names: Sequence[str] = FEATURE_NAMES,
                    device: str = "cpu") -> CorpusFeatures:
    """Every feature on every causal cell of ``sentences`` (packed like the store)."""
    blocks, row_cells = [], []
    for s in sentences:
        blocks.append(feature_packed(s, names).astype(np.float32).T)
        row_cells.append(np.arange(1, s.n + 1))
    values = torch.from_numpy(np.concatenate(blocks, axis=0))
    scale = values.abs().amax(dim=0).clamp_min(1.0)  # binary features keep scale 1
    row_cells = torch.from_numpy(np.concatenate(row_cells))
    starts = torch.cumsum(row_cells, 0) - row_cells
    lengths = torch.tensor([s.n for s in sentences], dtype=torch.float32)
    text_cells = (lengths * (lengths + 1) / 2).long()
    return CorpusFeatures(
        values=(values / scale).contiguous().to(device),
        scale=scale,
        row=torch.repeat_interleave(torch.arange(len(row_cells)), row_cells).to(device),
        row_cells=row_cells.to(device),
        text_cells=text_cells.to(device),
        lengths=lengths.to(device),
        first_cell=starts.to(device),
        text=torch.repeat_interleave(torch.arange(len(text_cells)), text_cells).to(device),
    )


def distinct_features(names: Sequence[str], data: CorpusFeatures) -> tuple[list[str], CorpusFeatures]:
    """``names`` less each feature that is zero on every cell or equal to an earlier one (e.g.
    'self_punct' and 'self_from_punct'): two copies would share one weight and take two of a
    program's terms."""
    columns = data.values.T.cpu().numpy()
    seen, keep = set(), []
    for k, column in enumerate(columns):
        key = column.tobytes()
        if column.any() and key not in seen:
            seen.add(key)
            keep.append(k)
    index = torch.tensor(keep, dtype=torch.long)
    return [names[k] for k in keep], dataclasses.replace(
        data, values=data.values[:, index.to(data.values.device)].contiguous(), scale=data.scale[index])


def model_cells(weights: torch.Tensor, share: torch.Tensor, data: CorpusFeatures) -> torch.Tensor:
    """The fitted model on every cell: [cells, heads] (cell-major). ``weights``
    [heads, features] (scaled), ``share`` [heads]."""
    score = data.values @ weights.T  # [cells, heads]
    peak = torch.segment_reduce(score.detach(), "max", lengths=data.row_cells)  # [query_rows, heads]
    e = torch.exp(score - peak[data.row])
    total = torch.zeros_like(peak).index_add_(0, data.row, e)
    pred = (1.0 - share) * (e / total[data.row])
    pred[data.first_cell] += share  # the sink share goes to key 0 of every row
    return pred


def text_iou(pred: torch.Tensor, attn: torch.Tensor, data: CorpusFeatures) -> torch.Tensor:
    """Soft IoU per text and head, [texts, heads], of [cells, heads] (cell-major): the kernels'
    :func:`iou_from_l1` with ΣA + ΣÂ = 2n, since rows of both sum to 1."""
    distance = torch.segment_reduce((pred - attn).abs(), "sum", lengths=data.text_cells)
    return iou_from_l1(2.0 * data.lengths[:, None], distance)


class _MeanIoU(torch.autograd.Function):
    """``text_iou(model_cells(weights, share, data), attn, data).mean(0)`` [heads], with its
    gradient written out: about half the passes over [cells, heads] (cell-major) that autograd
    makes, in the fit's inner loop. Values and gradients equal autograd's to float rounding.
    The IoU is the kernels' :func:`iou_from_l1` of the L1 distance and ΣA + ΣÂ = 2n (every
    query row of the model and of the attention sums to 1), its derivative
    :func:`iou_from_l1_grad`."""

    @staticmethod
    def forward(ctx, weights, share, attn, data):
        # scatter/index_add/index_select rather than segment_reduce and x[index]: 3-6x faster
        # on the CPU, the same maxima, sums in another order
        n_rows, n_heads = len(data.row_cells), weights.shape[0]
        row = data.row[:, None].expand(-1, n_heads)
        score = data.values @ weights.T  # [cells, heads]
        peak = score.new_empty(n_rows, n_heads).scatter_reduce_(0, row, score, "amax",
                                                                include_self=False)  # [query_rows, heads]
        prob = score.sub_(peak.index_select(0, data.row)).exp_()  # in place: scores not needed again
        total = torch.zeros_like(peak).index_add_(0, data.row, prob)
        prob.div_(total.index_select(0, data.row))  # [cells, heads] softmax of each query row
        pred = prob * (1.0 - share)  # (1 - s) prob + s at key 0, as model_cells adds it
        pred[data.first_cell] += share
        diff = pred.sub_(attn)  # [cells, heads] pred - attn
        distance = diff.new_zeros(len(data.text_cells), n_heads).index_add_(0, data.text,
                                                                            diff.abs())
        total = 2.0 * data.lengths[:, None]  # ΣA + ΣÂ per text
        iou = iou_from_l1(total, distance)
        ctx.save_for_backward(prob, diff, distance, total, share)
        ctx.data = data
        return iou.mean(dim=0)

    @staticmethod
    def backward(ctx, grad_iou):
        prob, diff, distance, total, share = ctx.saved_tensors
        data = ctx.data
        # d IoU / d distance per text and head (ΣÂ is n whatever the weights); mean over texts
        grad_distance = grad_iou / len(distance) * iou_from_l1_grad(total, distance)  # [texts, heads]
        grad_pred = diff.sign().mul_(grad_distance.index_select(0, data.text))  # [cells, heads]
        grad_share = (grad_pred.index_select(0, data.first_cell).sum(dim=0)
                      - (grad_pred * prob).sum(dim=0))
        grad_prob = grad_pred.mul_(1.0 - share)
        row_dot = prob.new_zeros(len(data.row_cells), prob.shape[1])
        row_dot.index_add_(0, data.row, grad_prob * prob)  # [query_rows, heads] Σ_row g · p
        grad_score = grad_prob.sub_(row_dot.index_select(0, data.row)).mul_(prob)  # softmax backward
        return grad_score.T @ data.values, grad_share, None, None


def mean_iou(weights: torch.Tensor, share: torch.Tensor, attn: torch.Tensor,
             data: CorpusFeatures) -> torch.Tensor:
    """Mean soft IoU over texts of the fitted model against ``attn`` [cells, heads] (cell-major):
    [heads], differentiable."""
    return _MeanIoU.apply(weights, share, attn, data)


def _optimise(weights, logit, mask, attn, data, steps, lr, penalty):
    """Adam on -mean IoU (+ L1 penalty); returns each head's best weights seen (by IoU)."""
    used = mask.any(dim=0).nonzero().squeeze(1)
    if len(used) < mask.shape[1]:  # a refit: only the features some head keeps enter the product
        narrow = dataclasses.replace(data, values=data.values[:, used].contiguous(),
                                     scale=data.scale[used.cpu()])  # the scale stays on the CPU
        found, found_logit = _optimise(weights[:, used], logit, mask[:, used], attn, narrow,
                                       steps, lr, penalty)
        return torch.zeros_like(weights).index_copy_(1, used, found), found_logit
    weights = weights.clone().requires_grad_(True)
    logit = logit.clone().requires_grad_(True)
    best = torch.full((weights.shape[0],), -torch.inf, device=weights.device)
    best_weights, best_logit = weights.detach().clone(), logit.detach().clone()
    opt = torch.optim.Adam([weights, logit], lr=lr)
    # the step size falls to 0 along a cosine: Adam's steps of ~lr would keep the weights
    # jittering around the optimum
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, steps) / max(steps, 1))))
    for _ in range(steps + 1):
        opt.zero_grad(set_to_none=True)
        iou = mean_iou(weights * mask, torch.sigmoid(logit), attn, data)
        better = iou.detach() > best
        best = torch.where(better, iou.detach(), best)
        best_weights[better], best_logit[better] = weights.detach()[better], logit.detach()[better]
        if _ == steps:
            break
        loss = -iou.sum() + penalty * (weights * mask).abs().sum()
        loss.backward()
        opt.step()
        schedule.step()
    if penalty:  # the search phase ends where it ended: its best-by-IoU ignores the penalty
        return weights.detach() * mask, logit.detach()
    return best_weights * mask, best_logit


def refit(weights: torch.Tensor, share: torch.Tensor, mask: torch.Tensor, attn: torch.Tensor,
          data: CorpusFeatures, steps: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fitter's refit phase from a start: only the features ``mask`` [heads, features]
    keeps move, with the sink share, for ``steps`` steps; each head's best (weights, share) seen,
    by mean IoU on ``data``'s cells. ``weights`` scaled as ``data.values``; ``attn`` [cells, heads]."""
    logit = torch.logit(share.clamp(1e-4, 1.0 - 1e-4))
    found, found_logit = _optimise(weights * mask, logit, mask, attn, data, steps, lr, 0.0)
    return found, torch.sigmoid(found_logit)


def fit_tensors(fits: Sequence[dict], names: Sequence[str], scale: torch.Tensor,
                device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Rounded fits as the torch model's ([fits, features] weights scaled by ``scale``, as
    :func:`corpus_features` scales its values; [fits] shares)."""
    column = {name: k for k, name in enumerate(names)}
    weights = torch.zeros(len(fits), len(names))
    for row, fit in enumerate(fits):
        for name, w in fit["weights"].items():
            weights[row, column[name]] = w * float(scale[column[name]])
    shares = torch.tensor([float(fit["share"]) for fit in fits])
    return weights.to(device), shares.to(device)


def fit_rows(attn: torch.Tensor, data: CorpusFeatures, settings: FitSettings,
             names: Sequence[str] = FEATURE_NAMES) -> list[dict]:
    """Fits for a chunk of heads' attention ``attn`` [cells, heads] (cell-major) on the cells of
    ``data``."""
    n_heads, n_features = attn.shape[1], len(names)
    device = attn.device
    weights = torch.zeros(n_heads, n_features, device=device)
    if settings.initial_share is None:  # half the mean first-token share, as the fixed share
        share = attn[data.first_cell].mean(dim=0).clamp(0.02, 0.9) * 0.5
    else:
        share = torch.full((n_heads,), settings.initial_share, device=device)
    logit = torch.logit(share)
    everything = torch.ones_like(weights)
    search, search_logit = _optimise(weights, logit, everything, attn, data,
                                     settings.search_steps, settings.lr, settings.penalty)
    best_iou = torch.full((n_heads,), -torch.inf, device=device)
    mask = torch.zeros_like(weights)
    for swap in range(settings.swap_rounds + 1):
        if swap:  # reopen every feature around the best refit so far, under the penalty
            search, search_logit = _optimise(weights, logit, everything, attn, data,
                                             settings.reopen_steps, settings.lr / 2,
                                             settings.penalty)
        keep = search.abs().topk(min(settings.max_terms, n_features), dim=1).indices
        chosen = torch.zeros_like(weights).scatter_(1, keep, 1.0)
        refit, refit_logit = _optimise(search, search_logit, chosen, attn, data,
                                       settings.refit_steps, settings.lr, 0.0)
        with torch.no_grad():
            iou = text_iou(model_cells(refit, torch.sigmoid(refit_logit), data), attn,
                           data).mean(dim=0)
        better = iou > best_iou
        best_iou = torch.where(better, iou, best_iou)
        weights[better], logit[better], mask[better] = (refit[better], refit_logit[better],
                                                        chosen[better])
    shares = torch.sigmoid(logit)
    with torch.no_grad():  # L1 is not smooth: a near-uniform head can end in a kink that the
        # uniform pattern (no weights, no share) beats; then uniform is its explanation
        fitted_iou, uniform_iou = (
            text_iou(model_cells(w, s, data), attn, data).mean(dim=0)
            for w, s in ((weights, shares), (torch.zeros_like(weights), torch.zeros_like(shares))))
    uniform = uniform_iou > fitted_iou
    shares = torch.where(uniform, 0.0, shares).cpu().numpy()
    weights[uniform] = 0.0
    per_unit = (weights / data.scale.to(device)).cpu().numpy()  # undo the feature scaling
    fits = []
    for h in range(n_heads):
        kept = [k for k in range(n_features) if mask[h, k] > 0 and per_unit[h, k] != 0.0]
        kept.sort(key=lambda k: -abs(float(weights[h, k])))  # strongest term first
        fits.append(round_fit({"share": float(shares[h]),
                               "weights": {names[k]: float(per_unit[h, k]) for k in kept}}))
    return fits


def frequent_pieces(sentences: Sequence, count: int) -> list[str]:
    """The ``count`` most frequent token pieces of ``sentences`` (ties: first seen first)."""
    from collections import Counter

    counts = Counter(t for s in sentences for t in s.tokens)
    return [piece for piece, _ in counts.most_common(count)]


def vocabulary(sentences: Sequence, key_tokens: int, query_tokens: int = 0,
               embeddings: bool = True) -> list[str]:
    """The features a fit chooses from: every named feature (syntax ones when the texts have
    POS tags, token-meaning ones when they carry embeddings and ``embeddings``), and the
    frequent tokens as keys and as queries (seen from which the first token scores more or
    less)."""
    syntax = list(SYNTAX_FEATURE_NAMES) if sentences and all(s.has_syntax for s in sentences) else []
    if embeddings and sentences and all(s.has_embeddings for s in sentences):
        syntax += list(EMBEDDING_FEATURE_NAMES)
    return (list(FEATURE_NAMES) + syntax
            + [key_token_name(p) for p in frequent_pieces(sentences, key_tokens)]
            + [query_token_name(p) for p in frequent_pieces(sentences, query_tokens)])


def fit_store(store: AttentionStore, split: str = "synthesis", settings: FitSettings | None = None,
              rows: Sequence[int] | None = None, progress: bool = True) -> list[dict]:
    """One rounded fit per head of ``store`` whose head_index is in ``rows`` (all heads when
    None), on ``split``'s texts."""
    from tqdm.auto import tqdm

    settings = settings or FitSettings()
    texts = store.split_indices(split)
    sentences = store.sentences(texts)
    if settings.syntax:
        attach_syntax(sentences)  # POS and dependency features when spaCy is installed
    names = vocabulary(sentences, settings.key_tokens, settings.query_tokens, settings.embeddings)
    names, data = distinct_features(names, corpus_features(sentences, names, device=settings.device))
    cells = torch.cat([torch.arange(int(store.offsets[s]), int(store.offsets[s + 1])) for s in texts])
    head_indices = list(range(store.n_rows)) if rows is None else list(rows)
    fits: list[dict] = []
    bar = tqdm(total=len(head_indices), desc="fit heads", unit="head", disable=not progress)
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        for start in range(0, len(head_indices), settings.heads_per_chunk):
            chunk = head_indices[start : start + settings.heads_per_chunk]
            attn = store.attn_packed[chunk][:, cells.to(store.device)].float().T.contiguous()
            fits += fit_rows(attn.to(settings.device), data, settings, names)
            bar.update(len(chunk))
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return fits


def fit_scores(fits: Sequence[dict], store: AttentionStore, split: str,
               rows: Sequence[int] | None = None) -> np.ndarray:
    """Mean IoU of each (rounded) fit against its own head (head_index ``rows[i]``, all heads
    in order when None) on ``split``: [len(fits)]."""
    from attnprog.synth.fitted import evaluate_fits

    texts = store.split_indices(split)
    head_indices = list(range(store.n_rows)) if rows is None else list(rows)
    sub = store.subset(texts)
    values = torch.from_numpy(evaluate_fits(fits, sub.sentences()))  # [programs, cells]
    attn = sub.attn_packed[head_indices].float().cpu()  # [programs, cells]: each fit's own head
    return segment_iou(values.T, attn.T, sub.offsets).double().mean(dim=0).numpy()


def fitted_programs(store: AttentionStore, split: str = "synthesis",
                    settings: FitSettings | None = None, progress: bool = True,
                    rows: Sequence[int] | None = None) -> list[Program]:
    """Fit every head of ``store`` whose head_index is in ``rows`` (all when None) on
    ``split`` and emit each fit as a program."""
    rows = list(range(store.n_rows)) if rows is None else list(rows)
    fits = fit_store(store, split, settings, rows=rows, progress=progress)
    scores = fit_scores(fits, store, split, rows)
    model_id = store.meta.get("model_id", "")
    return [
        program_from_fit(fit, head=head_label(head_index, store.n_heads), model_id=model_id, split=split,
                         score=score)
        for head_index, fit, score in zip(rows, fits, scores, strict=True)
    ]


FIT_VERSION = "5"  # bump when the fitter changes what it produces; 3: causal syntax, 4: token meaning,
# 5: the newest word's causal tag without its guessed dependency label, each distinct feature once
