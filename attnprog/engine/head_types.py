"""Head types: how much of each head's attention follows the classic patterns, and which one
dominates.

A pattern is a set of (query i, key j <= i) cells. A head's score on a pattern is
TransformerLens' ``detect_head`` score with ``error_measure="mul"``: on one text, the attention
on the pattern's cells divided by all the attention of the query rows scored,

    score = Σ A[i, j] P[i, j] / Σ A[i, j]          (sums over the scored rows i, all keys j)

averaged over texts (held-out texts; ``detect_head`` averages a list of sequences the same
way). The patterns:

    first token      j == 0
    self             j == i
    previous token   j == i - 1                     TL's "previous_token_head"
    duplicate token  ids[j] == ids[i], j < i        TL's "duplicate_token_head"
    induction        ids[j - 1] == ids[i], j >= 1   TL's "induction_head", measured (as TL's
                     tutorials do) on sequences of random tokens repeated twice, run through
                     the model (:func:`induction_scores`), not on the corpus
    punctuation      the key is punctuation or a line break (delimiters)
    recent window    i - 3 <= j <= i                the token and the three before it

Rows scored (``rows="applicable"``, the default): every query row but row 0, and of those only
the rows where the pattern has a cell (an earlier copy of the token for duplicate token, a
delimiter so far for punctuation, the second repeat for induction). Row 0 has one cell and says
nothing about a head; rows without a cell would cap a perfect head's score at the share of rows
that have one. So a head that does exactly what a pattern says scores 1.0. TransformerLens scores
every row (``exclude_bos=False``); ``rows="all"`` gives its number exactly, and the two relate as
TL = (ours · rows scored + [pattern holds (0, 0)]) / n on an n-token text (for the first-token,
self, previous-token and window patterns: TL = (ours · (n − 1) + [first or self or window]) / n;
for induction on [r, r] with 2N tokens, TL ≈ ours / 2).

A head's type (:func:`classify`), the first rule that holds, with ``DOMINANT`` = 0.5 (over half
the attention where the pattern applies):

1. "induction" when its induction score is at least ``DOMINANT``: the probe is built to show
   induction, and on ordinary text, with few repeats, an induction head mostly rests on the
   first token;
2. the pattern other than first token, induction and the window with the highest score, when it
   is at least ``DOMINANT``;
3. "first token" when the first token holds at least ``DOMINANT`` (an attention sink);
4. "recent window" when the window holds at least ``DOMINANT`` (a local head no single offset
   explains);
5. "mixed" when the two highest patterns other than the window hold ``MIXED`` = 0.5 together;
6. else "content": no classic pattern holds the attention; it goes by what the tokens are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attnprog.layout import tril_index

PATTERNS = ("first token", "self", "previous token", "duplicate token", "induction",
            "punctuation", "recent window")
TEXT_PATTERNS = tuple(p for p in PATTERNS if p != "induction")  # scored on the corpus
TYPES = PATTERNS + ("mixed", "content")
WINDOW = 4  # tokens in the recent window, the query's own included
DOMINANT = 0.5
MIXED = 0.5
PROBE_TOKENS = 40  # random tokens per repeat of the induction probe
PROBE_SEQUENCES = 8


def pattern_masks(ids: Sequence[int], delimiter: np.ndarray | None = None,
                  patterns: Sequence[str] = PATTERNS) -> np.ndarray:
    """Each pattern's cells on one text: bool [patterns, query_pos, key_pos] (lower triangle)."""
    ids = np.asarray(ids)
    n = len(ids)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    causal = j <= i
    delimiter = np.zeros(n, dtype=bool) if delimiter is None else np.asarray(delimiter, dtype=bool)
    after_copy = np.zeros((n, n), dtype=bool)
    after_copy[:, 1:] = ids[:, None] == ids[None, :-1]  # the key's previous token is the query's
    cells = {
        "first token": j == 0, "self": j == i, "previous token": j == i - 1,
        "duplicate token": (ids[:, None] == ids[None, :]) & (j < i), "induction": after_copy,
        "punctuation": delimiter[None, :], "recent window": j > i - WINDOW,
    }
    return np.stack([np.broadcast_to(cells[p] & causal, (n, n)) for p in patterns])


def text_scores(attention: torch.Tensor, masks: np.ndarray, rows: str = "applicable") -> torch.Tensor:
    """Scores of every head on one text: ``attention`` [heads, cells] (the text's packed causal
    cells), ``masks`` [patterns, n, n] -> [heads, patterns], NaN where no row is scored."""
    if rows not in ("applicable", "all"):
        raise ValueError(f"rows must be 'applicable' or 'all', not {rows!r}")
    n = masks.shape[-1]
    r, c = tril_index(n)
    cells = torch.from_numpy(np.ascontiguousarray(masks[:, r, c])).float()  # [patterns, cells]
    if rows == "all":
        scored = torch.ones_like(cells)
    else:
        has_cell = masks.any(axis=2)  # [patterns, query_pos]
        has_cell[:, 0] = False
        scored = torch.from_numpy(has_cell[:, r]).float()  # [patterns, cells]: the cell's row counts
    attention = attention.float()
    on_pattern = attention @ (cells * scored).T  # [heads, patterns]
    total = attention @ scored.T
    return torch.where(total > 0, on_pattern / total.clamp_min(1e-30), torch.full_like(total, torch.nan))


def pattern_scores(store, texts: Sequence[int] | None = None, patterns: Sequence[str] = TEXT_PATTERNS,
                   rows: str = "applicable") -> np.ndarray:
    """Every head's mean score over ``texts`` of ``store`` (all when None): float64
    [n_heads_total, patterns]; a pattern no text has a scored row for scores 0."""
    texts = list(range(store.n_texts)) if texts is None else list(texts)
    # the delimiters come from the tokens' text; the other patterns read the ids only
    sentences = store.sentences(texts) if "punctuation" in patterns else [None] * len(texts)
    total = torch.zeros(store.n_rows, len(patterns), dtype=torch.float64)
    counted = torch.zeros_like(total)
    for s, sentence in zip(texts, sentences):
        delimiter = None if sentence is None else sentence.is_punct | sentence.is_newline
        masks = pattern_masks(store.token_ids(s), delimiter, patterns)
        attention = store.attn_packed[:, int(store.offsets[s]) : int(store.offsets[s + 1])].cpu()
        scores = text_scores(attention, masks, rows).double()
        seen = ~torch.isnan(scores)
        total += torch.where(seen, scores, 0.0)
        counted += seen
    return torch.where(counted > 0, total / counted.clamp_min(1), 0.0).numpy()


# --- induction, on repeated random tokens run through the model ------------------------------


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before every text (e.g. Llama's BOS); none for GPT-2's."""
    if tokenizer is None:
        return []
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    k = len(with_special) - len(plain)
    return with_special[:k] if k > 0 and with_special[k : k + len(plain)] == plain else []


def repeated_random_tokens(vocab_size: int, n_tokens: int, n_sequences: int, seed: int = 0,
                           prefix: Sequence[int] = (), exclude: Sequence[int] = ()) -> list[list[int]]:
    """``n_sequences`` sequences ``prefix + r + r``, ``r`` ``n_tokens`` distinct random ids
    (not in ``exclude``, e.g. the special tokens), as TransformerLens' induction tutorials make."""
    rng = np.random.default_rng(seed)
    candidates = np.setdiff1d(np.arange(vocab_size), np.asarray(list(exclude), dtype=np.int64))
    n_tokens = min(n_tokens, len(candidates))
    sequences = []
    for _ in range(n_sequences):
        r = rng.choice(candidates, size=n_tokens, replace=False).tolist()
        sequences.append(list(prefix) + r + r)
    return sequences


def induction_scores(model, tokenizer=None, n_tokens: int = PROBE_TOKENS,
                     n_sequences: int = PROBE_SEQUENCES, seed: int = 0, batch_size: int = 8,
                     rows: str = "applicable") -> np.ndarray:
    """Every head's induction score on repeated random tokens run through ``model`` (eager
    attention): float64 [n_heads_total]. Rows scored: the second repeat's (see the module)."""
    from attnprog.engine.corpus import TokenizedCorpus
    from attnprog.engine.extract import extract_attention
    from attnprog.engine.models import context_size

    prefix = special_prefix(tokenizer)
    n_tokens = max(2, min(n_tokens, (context_size(model) - len(prefix)) // 2))
    exclude = list(getattr(tokenizer, "all_special_ids", []) or [])
    ids = repeated_random_tokens(int(model.config.vocab_size), n_tokens, n_sequences, seed,
                                 prefix, exclude)
    corpus = TokenizedCorpus(texts=[""] * len(ids), splits=["probe"] * len(ids), ids=ids,
                             tokens=[[""] * len(x) for x in ids], spans=[[(0, 0)] * len(x) for x in ids],
                             corpus_hash="repeated-random-tokens", tokenizer_id="",
                             max_tokens=max(map(len, ids)))
    probe = extract_attention(model, tokenizer, corpus, batch_size=batch_size, progress=False)
    return pattern_scores(probe, patterns=("induction",), rows=rows)[:, 0]


# --- types -----------------------------------------------------------------------------------


def classify(scores: dict[str, float]) -> str:
    """A head's type from its pattern scores (the rules and thresholds in the module's doc)."""
    score = {p: float(scores.get(p, 0.0)) for p in PATTERNS}
    if score["induction"] >= DOMINANT:
        return "induction"
    others = [p for p in PATTERNS if p not in ("first token", "induction", "recent window")]
    best = max(others, key=lambda p: score[p])  # ties: the first in PATTERNS
    if score[best] >= DOMINANT:
        return best
    for pattern in ("first token", "recent window"):
        if score[pattern] >= DOMINANT:
            return pattern
    specific = sorted(score[p] for p in PATTERNS if p != "recent window")
    return "mixed" if sum(specific[-2:]) >= MIXED else "content"


@dataclass
class HeadTypes:
    """Every head's pattern scores and type."""

    scores: np.ndarray  # [n_heads_total, len(PATTERNS)] float64
    types: list[str]  # per head_index

    def scores_of(self, head_index: int) -> dict[str, float]:
        return {p: round(float(v), 4) for p, v in zip(PATTERNS, self.scores[head_index])}


def head_types(store, texts: Sequence[int], induction: np.ndarray | None = None) -> HeadTypes:
    """Types of every head of ``store`` from its attention on ``texts`` (held-out texts) and its
    ``induction`` scores (:func:`induction_scores`; 0 when not measured)."""
    text = pattern_scores(store, texts, TEXT_PATTERNS)
    scores = np.zeros((store.n_rows, len(PATTERNS)))
    for k, p in enumerate(TEXT_PATTERNS):
        scores[:, PATTERNS.index(p)] = text[:, k]
    if induction is not None:
        scores[:, PATTERNS.index("induction")] = induction
    types = [classify(dict(zip(PATTERNS, row))) for row in scores]
    return HeadTypes(scores, types)
