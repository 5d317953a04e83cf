"""Token meaning: the model's own input embeddings of the tokens a corpus uses.

A run keeps, for every token id that occurs in its texts, that token's input-embedding row
(``model.get_input_embeddings()``), so that programs can compare tokens by meaning without
loading a model: each ``Sentence`` gets the n x n cosine similarity of its tokens
(:func:`attach_similarity`), which travels with it into the sandbox.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenEmbeddings:
    """Input-embedding rows of some token ids: ``ids`` [k] int64 sorted, ``rows`` [k, d]
    float32 (as the model holds them), ``source`` says where they came from."""

    ids: np.ndarray
    rows: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids, dtype=np.int64)
        rows = np.asarray(self.rows, dtype=np.float32)
        if ids.ndim != 1 or rows.ndim != 2 or len(ids) != len(rows):
            raise ValueError("TokenEmbeddings needs ids [k] and rows [k, d]")
        order = np.argsort(ids, kind="stable")
        object.__setattr__(self, "ids", ids[order])
        object.__setattr__(self, "rows", rows[order])

    def unit_rows(self, ids: Sequence[int]) -> np.ndarray:
        """[len(ids), d] float64 rows divided by their norms (zero rows stay zero); KeyError
        for an id the table does not hold."""
        ids = np.asarray(ids, dtype=np.int64)
        at = np.searchsorted(self.ids, ids)
        at = np.minimum(at, len(self.ids) - 1)
        missing = self.ids[at] != ids if len(self.ids) else np.ones(len(ids), bool)
        if missing.any():
            raise KeyError(f"no input embedding kept for token id {int(ids[missing][0])}")
        rows = self.rows[at].astype(np.float64)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)

    def similarity(self, ids: Sequence[int]) -> np.ndarray:
        """[n, n] float32 cosine between the input embeddings of tokens ``ids`` (1 on the
        diagonal, 0 where a row is zero)."""
        unit = self.unit_rows(ids)
        return (unit @ unit.T).astype(np.float32)


def attach_similarity(sentences: Sequence, table: TokenEmbeddings) -> None:
    """Give each Sentence the cosine similarity of its tokens' input embeddings
    (``s.embedding_similarity(i, j)``)."""
    for s in sentences:
        s.token_similarity = table.similarity(s.ids)
        s.token_similarity.setflags(write=False)
