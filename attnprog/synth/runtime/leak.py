"""The leak check: does a program's row i read tokens after i?

A surrogate head may use only the tokens up to the query. A program leaks when its rows on
a text differ from its rows on a prefix of that text: the prefix ending at token i is the
text as it stood when token i arrived, so a causal program gives rows 0..i the same there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from attnprog.layout import causal_offsets, tril_index
from attnprog.synth.causal_syntax import prefix_end
from attnprog.synth.features import Sentence, attach_syntax
from attnprog.synth.program import Program

LEAK_TOLERANCE = 1e-5  # L1 per row; float32 rows of a causal program agree far closer
CUT_POINTS = (0.3, 0.55, 0.8)  # where texts are cut, as shares of their length


def prefix_sentence(s: Sentence, i: int) -> Sentence:
    """The text as it stood when token i arrived: tokens 0..i and the characters they cover."""
    prefix = Sentence(text=s.text[: prefix_end(s.offsets, i)], ids=s.ids[: i + 1],
                      tokens=s.tokens[: i + 1], offsets=s.offsets[: i + 1])
    if s.token_similarity is not None:  # a pair's similarity depends on those two tokens only
        prefix.token_similarity = s.token_similarity[: i + 1, : i + 1]
    return prefix


def cut_points(n: int, shares: Sequence[float] = CUT_POINTS) -> list[int]:
    """Distinct token positions that cut a text of ``n`` tokens (never its last token)."""
    return sorted({min(max(1, int(share * n)), n - 2) for share in shares}) if n > 2 else []


def program_leaks(programs: Sequence[Program], sentences: Sequence[Sentence],
                  evaluate: Callable | None = None, shares: Sequence[float] = CUT_POINTS,
                  causal_syntax: bool = True) -> np.ndarray:
    """Each program's leak: the largest L1 difference between a row on a full text and the
    same row on a prefix of it: float64 [programs]. 0 (to LEAK_TOLERANCE) is causal.

    Rows 0..i of the prefix ending at token i are compared, at ``cut_points`` of each text. A
    program that fails on exactly one of the two counts as 2 (rows differ entirely).
    ``evaluate(programs, sentences)``: ProgramOutputs; the sandboxed default without a cache.
    Texts get POS tags and arcs (when spaCy is installed) the way ``causal_syntax`` says:
    ``False`` measures programs against whole-text parses, as before tags were causal.
    """
    evaluate = evaluate or _evaluate_uncached
    sentences = [s.copy() for s in sentences]
    cuts = [(t, i) for t, s in enumerate(sentences) for i in cut_points(s.n, shares)]
    if not programs or not cuts:
        return np.zeros(len(programs))
    prefixes = [prefix_sentence(sentences[t], i) for t, i in cuts]
    texts = sentences + prefixes
    attach_syntax(texts, causal=causal_syntax)
    outputs = evaluate(list(programs), texts)
    offsets = causal_offsets([s.n for s in texts])
    leaks = np.zeros(len(programs))
    for k, (t, i) in enumerate(cuts):
        p = len(sentences) + k  # the prefix's index among ``texts``
        n_rows = i + 1  # rows 0..i hold the same cells in the full text's packing
        full = outputs.values[:, offsets[t] : offsets[t] + n_rows * (n_rows + 1) // 2]
        cut = outputs.values[:, offsets[p] : offsets[p + 1]]
        diff = np.add.reduceat(np.abs(full.astype(np.float64) - cut), _row_starts(n_rows), axis=1)
        leak = diff.max(axis=1)
        one_failed = outputs.failed[:, t] != outputs.failed[:, p]
        leak = np.where(one_failed, 2.0, np.where(outputs.failed[:, t], 0.0, leak))
        leaks = np.maximum(leaks, leak)
    return leaks


def is_leaky(leak: float) -> bool:
    """True when a measured leak is more than rounding."""
    return bool(leak > LEAK_TOLERANCE)


def _row_starts(n: int) -> np.ndarray:
    """Where each row begins among the n(n+1)/2 packed cells of an n-token text."""
    rows, _ = tril_index(n)
    return np.flatnonzero(np.r_[True, np.diff(rows) != 0])


def _evaluate_uncached(programs, sentences):
    from attnprog.synth.runtime.evaluate import evaluate_programs

    return evaluate_programs(programs, sentences, use_cache=False, progress=False)
