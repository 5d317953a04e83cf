"""The paper's protocol beside ours: best fits chosen and reported on the same few texts.

The paper picks each head's best program on 5 sentences and reports its IoU on those same 5;
attnprog picks on the selection split and reports on held-out texts (DESIGN.md, Metrics). For a
figure comparable with the paper's, labelled as such, draws of 5 held-out texts are scored the
paper's way from one ranking of every program against every head on every held-out text
(``engine.rank`` with ``per_text``, the one IoU definition). The same ranking gives a bootstrap
interval for our held-out figure.

The paper's sentences have 12 to 20 words, and soft IoU falls as texts grow longer (a late row
spreads over more keys). So the best fits are also scored on the first m tokens of every
held-out text (:func:`best_fit_iou_by_length`): the model is causal, and so is a program that
passes the leak check, so these rows are those of the texts cut at m tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from attnprog.engine.bootstrap import mean_interval
from attnprog.engine.rank import rank
from attnprog.errors import StoreError
from attnprog.kernels.iou import segment_iou
from attnprog.layout import causal_offsets, prefix_cells, text_cells

DRAWS = 20
TEXTS_PER_DRAW = 5
PREFIX_TOKENS = (10, 20, 32, 64)  # 20: about the paper's sentences


def same_text_best_fits(per_text: torch.Tensor, heads: Sequence[int], *, draws: int = DRAWS,
                        texts_per_draw: int = TEXTS_PER_DRAW, seed: int = 0) -> np.ndarray:
    """[draws]: for each draw of ``texts_per_draw`` texts, the mean over ``heads`` of the best
    program's mean IoU on those texts, chosen on the same texts. ``per_text`` is
    [programs, n_heads_total, texts]."""
    n_texts = per_text.shape[2]
    if n_texts < texts_per_draw:
        raise StoreError(f"the paper's protocol draws {texts_per_draw} texts, the split has "
                         f"{n_texts}: use a corpus with more held-out texts")
    rng = np.random.default_rng(seed)
    chosen = per_text[:, list(heads)]  # [programs, heads, texts]
    figures = []
    for _ in range(draws):
        texts = torch.as_tensor(rng.choice(n_texts, size=texts_per_draw, replace=False))
        best = chosen[:, :, texts].mean(dim=2).max(dim=0).values  # [heads]
        figures.append(float(best.mean()))
    return np.asarray(figures)


def protocol_figures(store, outputs, best_index, heads: Sequence[int], *, split: str = "heldout",
                     seed: int = 0, impl: str = "auto") -> dict:
    """{"paper_protocol_iou": {"mean", "min", "max"}, "paper_protocol" (how it was drawn),
    "mean_best_fit_iou_ci": [low, high]}
    for ``heads`` on the ``split`` texts, ``best_index`` [n_heads_total] being our best fits
    (chosen on the selection split). The paper's figure is None with fewer texts than a draw."""
    per_text = rank(store, outputs, split=split, per_text=True, impl=impl).per_text
    ours = per_text[torch.as_tensor(best_index)[list(heads)], list(heads)]  # [heads, texts]
    interval = list(mean_interval(ours.numpy()))
    if per_text.shape[2] < TEXTS_PER_DRAW:
        return {"paper_protocol_iou": None, "mean_best_fit_iou_ci": interval}
    draws = same_text_best_fits(per_text, heads, seed=seed)
    return {
        "paper_protocol_iou": {"mean": float(draws.mean()), "min": float(draws.min()),
                               "max": float(draws.max())},
        "paper_protocol": {"draws": DRAWS, "texts_per_draw": TEXTS_PER_DRAW, "split": split,
                           "protocol": "best fit chosen and reported on the same texts, as "
                                       "the paper did; ours chooses on selection texts"},
        "mean_best_fit_iou_ci": interval,
    }


def best_fit_iou_by_length(store, outputs, best_index, heads: Sequence[int], *,
                           lengths: Sequence[int] = PREFIX_TOKENS, split: str = "heldout",
                           heads_per_chunk: int = 64) -> dict[str, float]:
    """{str(m): mean IoU of ``heads``' best fits (``best_index`` [n_heads_total], causal
    programs) on the first m tokens of every ``split`` text} for each m of ``lengths``; a
    shorter text counts whole. A program that failed on a text scores 0 there, as in ``rank``."""
    texts, heads = store.split_indices(split), list(heads)
    best = torch.as_tensor(best_index)[heads].tolist()
    unique = sorted(set(best))
    position = {p: k for k, p in enumerate(unique)}
    row = [position[p] for p in best]  # each head's program among ``chosen``
    chosen = outputs.select(unique)
    values = np.asarray(chosen.rows(0, len(unique), texts), dtype=np.float32)  # [programs, cells]
    failed = np.asarray(chosen.failed, dtype=bool)[:, texts]  # [programs, texts]
    full = store.lengths[texts].numpy().astype(np.int64)
    offsets = causal_offsets(full)  # of ``values``' texts
    bad = ~np.isfinite(values)
    if bad.any():  # a non-finite value fails the program on that text, as rank has it
        failed |= np.add.reduceat(bad, offsets[:-1], axis=1) > 0
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    attn = store.attn_packed[heads][:, torch.as_tensor(text_cells(store.offsets, texts))]
    figures = {}
    for m in lengths:
        cells, cut_offsets = prefix_cells(full, m)  # of ``values``' texts
        per_text = []  # [texts, heads], in chunks of heads
        for start in range(0, len(heads), heads_per_chunk):
            part = row[start : start + heads_per_chunk]
            pred = torch.from_numpy(values[part][:, cells]).T.contiguous()
            target = attn[start : start + heads_per_chunk][:, torch.from_numpy(cells)]
            iou = segment_iou(pred, target.float().cpu().T.contiguous(), cut_offsets)
            per_text.append(iou.masked_fill(torch.from_numpy(failed[part].T), 0.0))
        figures[str(m)] = float(torch.cat(per_text, dim=1).double().mean())
    return figures
