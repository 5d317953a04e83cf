"""What each term of a fitted program is worth, and the shortest program that fits.

A term's contribution is the mean IoU the (rounded) program loses on the synthesis texts, the
split it was fitted on, when that one weight is set to 0 and nothing else changes; the sink
share's likewise, with the share at 0. Terms are ranked by contribution.

For k in ``COUNTS`` below the program's own number of terms, from the largest down, a cut
is made from the next larger one (the program itself first): that program's terms ranked by
contribution in it, its best k kept and refitted on the synthesis texts (the fitter's own
refit, weights and sink share warm-started, ``REFIT_STEPS`` steps at the fitter's step size)
and rounded as fitted programs are. Ranking again in each cut matters when terms stand in for
one another: over the demo's 270 heads the 1- to 4-term cuts score 0.004 to 0.012 higher
held-out than cuts of the full program's ranking, for the same time. A cut is refitted on
every synthesis text, as the full program was fitted (on 12 of the demo's 34 with 30 steps,
the cuts scored 0.002 to 0.008 lower held-out; 45 steps are within 0.002 of 120).
Every cut and the full program are scored on the held-out texts: ``iou_by_terms``.
``terms_needed`` is the fewest terms whose held-out IoU is within ``TOLERANCE`` of the best count's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attnprog.engine.fit import (
    CorpusFeatures,
    corpus_features,
    fit_tensors,
    model_cells,
    refit,
    text_iou,
)
from attnprog.synth.features import attach_syntax
from attnprog.synth.fitted import SYNTAX_FEATURE_NAMES, round_fit

COUNTS = (1, 2, 3, 4, 6, 8, 12)
TOLERANCE = 0.01
REFIT_STEPS = 45
REFIT_LR = 0.08
CHUNK = 48  # programs scored or refitted at once: bounds [cells, chunk] tensors


@dataclass
class TermReport:
    """One fitted program, term by term (see the module)."""

    fit: dict  # the program's fit, {"share", "weights"}
    ranked: list[str]  # its terms, the largest contribution first
    contributions: dict[str, float]  # synthesis IoU lost without each term
    share_contribution: float  # synthesis IoU lost with the sink share at 0
    synthesis_iou: float
    cuts: dict[int, dict]  # number of terms -> the (refitted, rounded) fit with that many
    cut_synthesis_iou: dict[int, float]
    iou_by_terms: dict[int, float]  # number of terms -> held-out IoU
    terms_needed: int

    @property
    def shortest(self) -> dict:
        """The fit with ``terms_needed`` terms."""
        return self.cuts[self.terms_needed]


def term_counts(n_terms: int, counts: Sequence[int] = COUNTS) -> list[int]:
    """The numbers of terms a program of ``n_terms`` is measured at: ``counts`` below it, and
    its own."""
    return [k for k in counts if k < n_terms] + [n_terms]


def terms_needed(iou_by_terms: dict[int, float], tolerance: float = TOLERANCE) -> int:
    """The fewest terms whose IoU is within ``tolerance`` of the best."""
    best = max(iou_by_terms.values())
    return min(k for k, iou in iou_by_terms.items() if iou >= best - tolerance)


# --- a split's features and attention --------------------------------------------------------


@dataclass
class _Split:
    data: CorpusFeatures
    cells: torch.Tensor  # the split's cells in the store's packed layout

    @property
    def device(self) -> torch.device:
        return self.data.values.device


def _split(store, split: str, names: Sequence[str], device: str = "cpu") -> _Split:
    """The features of ``split``'s texts."""
    texts = store.split_indices(split)
    sentences = store.sentences(texts)
    if set(names) & set(SYNTAX_FEATURE_NAMES):
        attach_syntax(sentences)  # as the fitter did
    cells = torch.cat([torch.arange(int(store.offsets[s]), int(store.offsets[s + 1])) for s in texts])
    return _Split(corpus_features(sentences, names, device=device), cells)


def _attention(store, rows: Sequence[int], split: _Split) -> torch.Tensor:
    """[cells, len(rows)] (cell-major) attention of heads ``rows`` on the split's cells."""
    attn = store.attn_packed[list(rows)][:, split.cells.to(store.device)].float()
    return attn.to(split.data.values.device).T.contiguous()


def _narrow(data: CorpusFeatures, weights: torch.Tensor) -> tuple[CorpusFeatures, torch.Tensor]:
    """``data`` and ``weights`` with only the features some row of ``weights`` uses."""
    used = (weights != 0).any(dim=0).nonzero().squeeze(1)
    narrow = dataclasses.replace(data, values=data.values[:, used].contiguous(),
                                 scale=data.scale[used.cpu()])
    return narrow, weights[:, used]


def _mean_iou(weights, shares, attn, data) -> torch.Tensor:
    return text_iou(model_cells(weights, shares, data), attn, data).mean(dim=0)


def scores(fits: Sequence[dict], rows: Sequence[int], store, split: _Split,
           names: Sequence[str]) -> np.ndarray:
    """Mean IoU of each rounded fit against head ``rows[i]`` on the split: [len(fits)]."""
    out = np.zeros(len(fits))
    for start in range(0, len(fits), CHUNK):
        part = slice(start, start + CHUNK)
        weights, shares = fit_tensors(fits[part], names, split.data.scale, split.device)
        data, weights = _narrow(split.data, weights)
        with torch.no_grad():
            iou = _mean_iou(weights, shares, _attention(store, rows[part], split), data)
        out[part] = iou.cpu().numpy()
    return out


# --- contributions ---------------------------------------------------------------------------


def contributions(fits: Sequence[dict], rows: Sequence[int], store, split: _Split,
                  names: Sequence[str]) -> tuple[np.ndarray, list[dict[str, float]], np.ndarray]:
    """Each fit's IoU against its head on the split, the IoU lost without each of its terms
    ({term: loss}) and without its sink share."""
    base, lost_share, lost = np.zeros(len(fits)), np.zeros(len(fits)), []
    column = {name: k for k, name in enumerate(names)}
    for start in range(0, len(fits), CHUNK):
        chunk = list(fits[start : start + CHUNK])
        weights, shares = fit_tensors(chunk, names, split.data.scale, split.device)
        used = (weights != 0).any(dim=0).nonzero().squeeze(1)
        position = {int(c): k for k, c in enumerate(used)}  # column -> narrowed column
        data, weights = _narrow(split.data, weights)
        attn = _attention(store, rows[start : start + CHUNK], split)
        with torch.no_grad():
            full = _mean_iou(weights, shares, attn, data)
            base[start : start + len(chunk)] = full.cpu().numpy()
            no_share = full - _mean_iou(weights, 0 * shares, attn, data)
            lost_share[start : start + len(chunk)] = no_share.cpu().numpy()
            losses = [{} for _ in chunk]
            for t in range(max((len(f["weights"]) for f in chunk), default=0)):
                held = [(r, position[column[list(f["weights"])[t]]]) for r, f in enumerate(chunk)
                        if len(f["weights"]) > t]
                without = weights.clone()
                without[[r for r, _ in held], [c for _, c in held]] = 0.0
                iou = (full - _mean_iou(without, shares, attn, data)).cpu()
                for r, _ in held:
                    losses[r][list(chunk[r]["weights"])[t]] = float(iou[r])
        lost += losses
    return base, lost, lost_share


# --- cuts: the program with its best k terms, refitted ---------------------------------------


def refitted_cuts(fits: Sequence[dict], ranked: Sequence[Sequence[str]], rows: Sequence[int],
                  store, split: _Split, names: Sequence[str], counts: Sequence[int] = COUNTS,
                  steps: int = REFIT_STEPS, progress: bool = False) -> list[dict[int, dict]]:
    """Per fit, {k: its cut to ``k`` terms, refitted on the split and rounded} for every k of
    :func:`term_counts` below its own count, and {own count: the fit itself}. Each cut comes
    from the next larger one, whose terms are ranked by contribution there (``ranked[i]``: the
    fit's own ranking)."""
    from tqdm.auto import tqdm

    cuts = [{len(f["weights"]): f} for f in fits]
    sizes = sorted({k for f in fits for k in term_counts(len(f["weights"]), counts)
                    if k < len(f["weights"])}, reverse=True)
    for k in tqdm(sizes, desc="refit cuts", unit="size", disable=None if progress else True):
        todo = [i for i, f in enumerate(fits) if len(f["weights"]) > k]
        larger = [cuts[i][min(cuts[i])] for i in todo]
        order = [list(ranked[i]) for i in todo]
        again = [n for n, (i, fit) in enumerate(zip(todo, larger)) if fit is not fits[i]]
        if again:  # cuts: rank their terms by contribution in the cut itself
            _, lost, _ = contributions([larger[n] for n in again], [rows[todo[n]] for n in again],
                                       store, split, names)
            for n, loss in zip(again, lost):
                order[n] = sorted(larger[n]["weights"], key=lambda name, loss=loss: -loss[name])
        for i, cut in zip(todo, _refit_cut(larger, order, [rows[i] for i in todo], k, store,
                                           split, names, steps)):
            cuts[i][k] = cut
    return cuts


def _refit_cut(fits: Sequence[dict], ranked: Sequence[Sequence[str]], rows: Sequence[int], k: int,
               store, split: _Split, names: Sequence[str], steps: int) -> list[dict]:
    """Each fit's ``k`` best-ranked terms refitted on the split from its weights, rounded."""
    column = {name: c for c, name in enumerate(names)}
    scale = split.data.scale
    out = []
    for start in range(0, len(fits), CHUNK):
        part = slice(start, start + CHUNK)
        starts = [{"share": fit["share"], "weights": {n: fit["weights"][n] for n in order[:k]}}
                  for fit, order in zip(fits[part], ranked[part])]
        weights, shares = fit_tensors(starts, names, scale, split.device)
        mask = (weights != 0).float()
        attn = _attention(store, rows[part], split)
        weights, shares = refit(weights, shares, mask, attn, split.data, steps, REFIT_LR)
        for w, share, start_fit in zip(weights.cpu(), shares.cpu(), starts):
            per_unit = {n: float(w[column[n]]) / float(scale[column[n]]) for n in start_fit["weights"]}
            out.append(round_fit({"share": float(share), "weights": per_unit}))
    return out


def term_reports(store, fits: Sequence[dict], rows: Sequence[int], split: str = "synthesis",
                 heldout: str = "heldout", counts: Sequence[int] = COUNTS,
                 steps: int = REFIT_STEPS, device: str = "cpu",
                 progress: bool = False) -> list[TermReport]:
    """A :class:`TermReport` per fit ``fits[i]`` of head ``rows[i]`` (its head_index) of ``store``:
    contributions on ``split`` (where the fits were made), cuts refitted there, every cut
    scored on ``heldout``."""
    fits, rows = list(fits), [int(r) for r in rows]
    names = list(dict.fromkeys(name for fit in fits for name in fit["weights"]))
    fitting = _split(store, split, names, device)
    base, lost, lost_share = contributions(fits, rows, store, fitting, names)
    ranked = [sorted(f["weights"], key=lambda n, loss=loss: -loss[n]) for f, loss in zip(fits, lost)]
    cuts = refitted_cuts(fits, ranked, rows, store, fitting, names, counts, steps, progress)
    flat = [(i, k, fit) for i, by_k in enumerate(cuts) for k, fit in sorted(by_k.items())]
    cut_rows = [rows[i] for i, _, _ in flat]
    held = scores([fit for _, _, fit in flat], cut_rows, store, _split(store, heldout, names, device),
                  names)
    there = scores([fit for _, _, fit in flat], cut_rows, store, fitting, names)
    reports = [TermReport(f, ranked[i], lost[i], float(lost_share[i]), float(base[i]), cuts[i], {}, {}, 0)
               for i, f in enumerate(fits)]
    for (i, k, _), held_iou, there_iou in zip(flat, held, there):
        reports[i].iou_by_terms[k] = round(float(held_iou), 4)
        reports[i].cut_synthesis_iou[k] = round(float(there_iou), 4)
    for report in reports:
        report.terms_needed = terms_needed(report.iou_by_terms)
    return reports
