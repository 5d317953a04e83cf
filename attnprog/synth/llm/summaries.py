"""Attention summaries: what an LLM reads about a head, as lines of token-to-token edges.

Two formats. ``stratified`` (the paper's "stratified pairs"): the causal edges with weight
>= 0.01 are split into weight quarters, the top quarter shows up to 15 edges and the
other three up to 10 each, spread evenly over the quarter's range; self-edges and edges
to the first token are capped at 3 per quarter, since sink heads would otherwise fill
every line with them. ``top``: the strongest fraction of all causal edges. Every edge is
one line ``'tok_i'[i] -> 'tok_j'[j] (0.772)``, with token strings escaped so that quotes,
newlines and odd Unicode cannot break the prompt. A summary of several texts stops
adding texts when its size budget (in estimated LLM tokens) is spent.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import numpy as np

FORMATS = ("stratified", "top")
MIN_WEIGHT = 0.01
TOP_QUARTER_EDGES = 15
OTHER_QUARTER_EDGES = 10
SPECIAL_EDGES_PER_QUARTER = 3  # self-edges and first-token edges
_QUARTER_NAMES = ("top quarter", "second quarter", "third quarter", "bottom quarter")
_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# control, format, surrogate, private-use, unassigned, line/paragraph separators
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def escape_token(token: str) -> str:
    """``token`` as a single-quoted literal on one line: quotes, backslashes, newlines,
    control and invisible characters are escaped (``\\n``, ``\\u200b``)."""
    out = []
    for char in token:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif unicodedata.category(char) in _UNSAFE_CATEGORIES or not char.isprintable() and char != " ":
            code = ord(char)
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(char)
    return "'" + "".join(out) + "'"


def edge_text(tokens: Sequence[str], i: int, j: int) -> str:
    """An edge without its weight: ``'tok_i'[i] -> 'tok_j'[j]``."""
    return f"{escape_token(tokens[i])}[{i}] -> {escape_token(tokens[j])}[{j}]"


def edge_line(tokens: Sequence[str], i: int, j: int, weight: float) -> str:
    """One edge: ``'tok_i'[i] -> 'tok_j'[j] (0.772)``."""
    return f"{edge_text(tokens, i, j)} ({weight:.3f})"


def _causal_edges(attention: np.ndarray, min_weight: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, weights) of causal edges with weight >= ``min_weight``, strongest first
    (ties: earlier query, then earlier key)."""
    attention = np.asarray(attention, dtype=np.float64)
    rows, cols = np.tril_indices(attention.shape[0])
    weights = attention[rows, cols]
    keep = weights >= min_weight
    rows, cols, weights = rows[keep], cols[keep], weights[keep]
    order = np.lexsort((cols, rows, -weights))
    return rows[order], cols[order], weights[order]


def _spread(count: int, k: int) -> np.ndarray:
    """``k`` indices into ``range(count)`` spread evenly from the first to the last."""
    if k >= count:
        return np.arange(count)
    if k <= 0:
        return np.arange(0)
    return np.unique(np.linspace(0, count - 1, k).round().astype(int))


def stratified_pairs(attention: np.ndarray, tokens: Sequence[str], *, min_weight: float = MIN_WEIGHT,
                     top_edges: int = TOP_QUARTER_EDGES, other_edges: int = OTHER_QUARTER_EDGES,
                     special_cap: int = SPECIAL_EDGES_PER_QUARTER) -> list[str]:
    """The stratified-pairs lines of one head on one text (``attention``: n x n)."""
    rows, cols, weights = _causal_edges(attention, min_weight)
    if len(weights) == 0:
        return [f"(no edge has weight >= {min_weight})"]
    lines = []
    for quarter, members in enumerate(np.array_split(np.arange(len(weights)), 4)):
        if len(members) == 0:
            continue
        cap = top_edges if quarter == 0 else other_edges
        special = [m for m in members if rows[m] == cols[m] or cols[m] == 0]
        regular = [m for m in members if not (rows[m] == cols[m] or cols[m] == 0)]
        shown_special = special[:special_cap]
        room = max(cap - len(shown_special), 0)
        shown_regular = [regular[k] for k in _spread(len(regular), room)]
        shown = sorted(shown_special + shown_regular)  # members are in weight order already
        lines.append(f"{_QUARTER_NAMES[quarter]} ({len(members)} edges, weights "
                     f"{weights[members[0]]:.3f} to {weights[members[-1]]:.3f}):")
        lines += ["  " + edge_line(tokens, rows[m], cols[m], weights[m]) for m in shown]
        if len(special) > len(shown_special):
            lines.append(f"  (+ {len(special) - len(shown_special)} more self/first-token edges)")
        if len(regular) > len(shown_regular):
            lines.append(f"  (+ {len(regular) - len(shown_regular)} more edges in this quarter)")
    return lines


def top_fraction(attention: np.ndarray, tokens: Sequence[str], *, fraction: float = 0.05,
                 min_weight: float = MIN_WEIGHT, max_edges: int = 40) -> list[str]:
    """The strongest ``fraction`` of the causal cells (at most ``max_edges``), strongest first."""
    n = np.asarray(attention).shape[0]
    rows, cols, weights = _causal_edges(attention, min_weight)
    count = min(len(weights), max_edges, max(1, int(round(fraction * n * (n + 1) / 2))))
    lines = [f"strongest {count} of {n * (n + 1) // 2} causal edges:"]
    lines += ["  " + edge_line(tokens, rows[k], cols[k], weights[k]) for k in range(count)]
    if len(weights) > count:
        lines.append(f"  (+ {len(weights) - count} more edges with weight >= {min_weight})")
    return lines


def estimate_tokens(text: str) -> int:
    """Rough LLM token count (4 characters per token, the usual rule for English and code)."""
    return (len(text) + 3) // 4


def summarise_head(examples: Sequence[tuple[object, np.ndarray]], fmt: str = "stratified",
                   budget_tokens: int = 1500) -> str:
    """A summary of one head on several texts: ``examples`` are (Sentence, n x n attention).

    Texts are added in order until the next would exceed ``budget_tokens`` (estimated); the
    first text is always shown, cut to the budget if it alone is too long.
    """
    if fmt not in FORMATS:
        from attnprog.errors import LLMError

        raise LLMError(f"unknown summary format {fmt!r}: use one of {', '.join(FORMATS)}")
    blocks, used = [], 0
    for k, (sentence, attention) in enumerate(examples):
        lines = (stratified_pairs if fmt == "stratified" else top_fraction)(attention, sentence.tokens)
        text = escape_token(sentence.text)[1:-1]
        block = [f"Text {k + 1} ({sentence.n} tokens): {text}", *lines]
        size = estimate_tokens("\n".join(block)) + 1
        if used + size > budget_tokens:
            if blocks:
                break
            block = _cut(block, budget_tokens)
            size = budget_tokens
        blocks.append("\n".join(block))
        used += size
    omitted = len(examples) - len(blocks)
    tail = [f"({omitted} more texts left out to keep the summary short)"] if omitted else []
    return "\n\n".join(blocks + tail)


def _cut(block: list[str], budget_tokens: int) -> list[str]:
    """The first lines of ``block`` that fit the budget, and a note that the rest was cut."""
    kept, used = [], 0
    for line in block:
        size = estimate_tokens(line) + 1
        if used + size > budget_tokens - 8 and kept:
            kept.append(f"(+ {len(block) - len(kept)} more lines cut to fit the summary budget)")
            break
        kept.append(line if size <= budget_tokens else line[: 4 * (budget_tokens - 8)] + "...")
        used += size
    return kept
