"""The packed causal layout shared by attention and program outputs (numpy only).

A corpus of S texts with token lengths n_s is the concatenation, text by text, of
the lower triangle (i >= j, row-major) of each n_s x n_s matrix. ``offsets[s]`` is
where text s starts and ``offsets[S] == C``, the total number of cells.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def n_cells(n: int) -> int:
    """Cells in the causal triangle of an n x n matrix."""
    return n * (n + 1) // 2


def causal_offsets(lengths) -> np.ndarray:
    """Start of each text in the packed layout; shape [S + 1], last entry is C."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths * (lengths + 1) // 2, out=offsets[1:])
    return offsets


def text_cells(offsets, texts) -> np.ndarray:
    """Packed-layout indices of the cells of ``texts`` (in that order): [C_texts] int64."""
    offsets = np.asarray(offsets, dtype=np.int64)
    parts = [np.arange(offsets[s], offsets[s + 1]) for s in texts]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def prefix_cells(lengths, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the first ``rows`` query rows of every text, in the packed layout of texts of
    ``lengths``; the offsets of those cells packed on their own): each text cut at ``rows``
    tokens, a shorter one whole. Because a row's cells come before the next row's, a text's
    first rows are the start of its triangle."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets, cut = causal_offsets(lengths), np.minimum(lengths, rows)
    cells = [np.arange(offsets[s], offsets[s] + n_cells(int(n))) for s, n in enumerate(cut)]
    return (np.concatenate(cells) if cells else np.zeros(0, dtype=np.int64)), causal_offsets(cut)


@lru_cache(maxsize=64)
def tril_index(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each packed cell of an n x n triangle, in packed order."""
    rows, cols = np.tril_indices(n)
    rows.setflags(write=False)
    cols.setflags(write=False)
    return rows, cols


def pack(matrix: np.ndarray) -> np.ndarray:
    """Lower triangle of ``matrix[..., n, n]`` as ``[..., n(n+1)/2]``."""
    n = matrix.shape[-1]
    rows, cols = tril_index(n)
    return matrix[..., rows, cols]


def unpack(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack`: ``[..., n(n+1)/2]`` to ``[..., n, n]`` with zeros above."""
    rows, cols = tril_index(n)
    dense = np.zeros(packed.shape[:-1] + (n, n), dtype=packed.dtype)
    dense[..., rows, cols] = packed
    return dense
