"""95 % bootstrap intervals over texts: a perplexity increase, and a mean IoU.

Texts are resampled with replacement; each resample recomputes the figure from per-text sums
(summed NLL and token counts for perplexity, so long texts weigh what they weigh in the point
estimate). The interval is the percentile interval of the resampled figures.
"""

from __future__ import annotations

import numpy as np

N_RESAMPLES = 2000
LEVEL = 0.95


def resamples(n_texts: int, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """[resamples, texts] text indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n_texts, size=(n_resamples, n_texts))


def ppl_increase(base_nll, nll, tokens) -> float:
    """% perplexity increase from per-text summed NLL [texts] (or [seeds, texts]: the mean
    over seeds of each seed's increase) against the unmodified model's [texts]."""
    nll = np.atleast_2d(np.asarray(nll, dtype=np.float64))
    delta = (nll.sum(axis=1) - np.sum(base_nll)) / np.sum(tokens)
    return float(np.mean(100.0 * np.expm1(delta)))


def ppl_increase_interval(base_nll, nll, tokens, *, n_resamples: int = N_RESAMPLES,
                          seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """[low, high] of the % perplexity increase, texts resampled (paired with the base).

    With several seeds ([seeds, texts]) each resample also draws one seed, so the interval
    holds the spread between seeds as well as between texts.
    """
    base_nll, tokens = np.asarray(base_nll, np.float64), np.asarray(tokens, np.float64)
    nll = np.atleast_2d(np.asarray(nll, dtype=np.float64))
    draws = resamples(len(tokens), n_resamples, seed)  # [resamples, texts]
    picked = np.random.default_rng(seed + 1).integers(0, nll.shape[0], size=n_resamples)
    summed = nll[:, draws].sum(axis=2)[picked, np.arange(n_resamples)]  # [resamples]
    delta = (summed - base_nll[draws].sum(axis=1)) / tokens[draws].sum(axis=1)
    return _percentiles(100.0 * np.expm1(delta), level)


def mean_interval(values, *, n_resamples: int = N_RESAMPLES, seed: int = 0,
                  level: float = LEVEL) -> tuple[float, float]:
    """[low, high] of the mean over items of each item's mean over texts, from values
    [items, texts] (e.g. the held-out IoU of every head's best fit on every text)."""
    values = np.asarray(values, dtype=np.float64)
    per_text = values.mean(axis=0)  # the mean over items commutes with resampling texts
    draws = resamples(values.shape[1], n_resamples, seed)
    return _percentiles(per_text[draws].mean(axis=1), level)


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)
