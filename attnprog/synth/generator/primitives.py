"""The generator's DSL: attention primitives, each an n x n causal score matrix over a Sentence.

Every primitive is a plain, self-contained function of ``s`` (and its parameters) that uses
only numpy and the Sentence's ``n``, ``ids``, ``tokens``, ``word_ids`` and ``pos``. The
generator copies their source verbatim into the programs it emits, and the vectorised
evaluator calls the very same functions, so the two paths cannot drift apart.

Scores are non-negative and zero above the diagonal; a row may be all zero ("no target"),
which a fallback or the final normalisation (one-hot on token 0) then decides.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np

# ---------------------------------------------------------------------------------------
# Positional primitives: they look only at positions.


def first_token(s):
    """Every token attends to token 0 (the BOS token / attention sink)."""
    m = np.zeros((s.n, s.n))
    m[:, 0] = 1.0
    return m


def second_token(s):
    """Every token from position 1 on attends to token 1 (a second sink)."""
    m = np.zeros((s.n, s.n))
    if s.n > 1:
        m[1:, 1] = 1.0
    return m


def self_token(s):
    """Every token attends to itself."""
    return np.eye(s.n)


def previous(s, k):
    """Token i attends to token i - k; the first k tokens have no target."""
    return np.eye(s.n, k=-k)


def recency(s, rate):
    """Token i gives rate ** (i - j) to every j <= i: attention decays with distance."""
    pos = np.arange(s.n)
    distance = pos[:, None] - pos[None, :]
    return np.where(distance >= 0, rate ** np.maximum(distance, 0), 0.0)


def sink_recency(s, sink, rate):
    """Attention decays with distance (rate ** (i - j)) and token 0 scores `sink` on top.

    Like a softmax with a fixed attention-sink logit: the sink's share of a row shrinks as
    the recent context gains mass (rate 1.0: every token so far scores 1, the sink `sink`).
    """
    pos = np.arange(s.n)
    distance = pos[:, None] - pos[None, :]
    m = np.where(distance >= 0, rate ** np.maximum(distance, 0), 0.0)
    m[:, 0] += sink
    return m


def uniform(s):
    """Token i attends equally to every token up to and including itself."""
    return np.tril(np.ones((s.n, s.n)))


def window(s, width):
    """Token i attends equally to the last `width` tokens, itself included."""
    pos = np.arange(s.n)
    distance = pos[:, None] - pos[None, :]
    return ((distance >= 0) & (distance < width)).astype(float)


# ---------------------------------------------------------------------------------------
# Lexical primitives: they look at the tokens' text and ids.


def punctuation(s):
    """Token i attends to every punctuation token at or before i."""
    is_punct = np.array([t.strip() != "" and not any(c.isalnum() for c in t) for t in s.tokens])
    return np.tril(np.ones((s.n, s.n)) * is_punct[None, :])


def the_tokens(s):
    """Token i attends to every "the" token at or before i (any case)."""
    is_the = np.array([t.strip().lower() == "the" for t in s.tokens])
    return np.tril(np.ones((s.n, s.n)) * is_the[None, :])


def last_punctuation(s):
    """Token i attends to the most recent punctuation token at or before i."""
    m = np.zeros((s.n, s.n))
    last = -1
    for i, t in enumerate(s.tokens):
        if t.strip() != "" and not any(c.isalnum() for c in t):
            last = i
        if last >= 0:
            m[i, last] = 1.0
    return m


def sentence_start(s):
    """Token i attends to the first token of its sentence (sentences end with . ! or ?)."""
    m = np.zeros((s.n, s.n))
    start = 0
    after_end = False
    for i, t in enumerate(s.tokens):
        text = t.strip()
        if after_end and any(c.isalnum() for c in text):
            start, after_end = i, False
        if text and text[-1] in ".!?":
            after_end = True
        m[i, start] = 1.0
    return m


def same_token(s):
    """Token i attends to every earlier occurrence of its own token (duplicate-token head)."""
    ids = np.asarray(s.ids)
    return np.tril(ids[:, None] == ids[None, :], k=-1).astype(float)


def last_same_token(s):
    """Token i attends to the most recent earlier occurrence of its own token."""
    m = np.zeros((s.n, s.n))
    last_seen = {}
    for i, token_id in enumerate(s.ids):
        if token_id in last_seen:
            m[i, last_seen[token_id]] = 1.0
        last_seen[token_id] = i
    return m


def induction(s):
    """Token i attends to the token after each earlier occurrence of its own token."""
    ids = np.asarray(s.ids)
    earlier_copy = np.tril(ids[:, None] == ids[None, :], k=-1)  # [i, j]: j < i holds ids[i]
    m = np.zeros((s.n, s.n))
    m[:, 1:] = earlier_copy[:, :-1]  # shift each copy j one to the right: j + 1 <= i
    return m


def last_induction(s):
    """Token i attends to the token after the most recent earlier occurrence of its token."""
    m = np.zeros((s.n, s.n))
    last_seen = {}
    for i, token_id in enumerate(s.ids):
        if token_id in last_seen:
            m[i, last_seen[token_id] + 1] = 1.0
        last_seen[token_id] = i
    return m


def same_word(s):
    """Token i attends to the tokens of earlier words spelled like its own word so far (any case)."""
    spelling, so_far = {}, []
    for w, t in zip(s.word_ids, s.tokens, strict=True):
        spelling[w] = spelling.get(w, "") + t
        so_far.append(spelling[w].strip().lower())  # token i's word up to token i: no later piece
    word_ids = np.asarray(s.word_ids)
    words = np.array([spelling[w].strip().lower() for w in s.word_ids])  # earlier words: complete
    earlier_word = word_ids[:, None] > word_ids[None, :]
    return ((np.array(so_far)[:, None] == words[None, :]) & earlier_word).astype(float)


def word_start(s):
    """Token i attends to the first token of the word it belongs to."""
    m = np.zeros((s.n, s.n))
    start = 0
    for i in range(s.n):
        if i > 0 and s.word_ids[i] != s.word_ids[i - 1]:
            start = i
        m[i, start] = 1.0
    return m


def current_word(s):
    """Token i attends equally to the tokens of its own word up to itself."""
    word_ids = np.asarray(s.word_ids)
    return np.tril(word_ids[:, None] == word_ids[None, :]).astype(float)


def previous_word(s):
    """Token i attends to every token of the word before its own."""
    word_ids = np.asarray(s.word_ids)
    return np.tril(word_ids[None, :] == word_ids[:, None] - 1).astype(float)


def previous_word_end(s):
    """Token i attends to the last token of the previous word (the token before its word)."""
    m = np.zeros((s.n, s.n))
    start = 0
    for i in range(s.n):
        if i > 0 and s.word_ids[i] != s.word_ids[i - 1]:
            start = i
        if start > 0:
            m[i, start - 1] = 1.0
    return m


def word_starts(s):
    """Token i attends to the first token of every word at or before it."""
    word_ids = np.asarray(s.word_ids)
    is_start = np.ones(s.n, dtype=bool)
    is_start[1:] = word_ids[1:] != word_ids[:-1]
    return np.tril(np.ones((s.n, s.n)) * is_start[None, :])


def capitalised(s):
    """Token i attends to every token at or before i that starts with a capital letter."""
    is_cap = np.array([t.strip()[:1].isupper() for t in s.tokens])
    return np.tril(np.ones((s.n, s.n)) * is_cap[None, :])


def last_capitalised(s):
    """Token i attends to the most recent capitalised token at or before i."""
    m = np.zeros((s.n, s.n))
    last = -1
    for i, t in enumerate(s.tokens):
        if t.strip()[:1].isupper():
            last = i
        if last >= 0:
            m[i, last] = 1.0
    return m


def numbers(s):
    """Token i attends to every token at or before i that contains a digit."""
    has_digit = np.array([any(c.isdigit() for c in t) for t in s.tokens])
    return np.tril(np.ones((s.n, s.n)) * has_digit[None, :])


def quote_open(s):
    """Inside a double-quoted span, each token and the closing quote attend to the opening quote."""
    m = np.zeros((s.n, s.n))
    opening = -1
    for i, t in enumerate(s.tokens):
        is_quote = '"' in t or "\u201c" in t or "\u201d" in t
        if opening >= 0:
            m[i, opening] = 1.0
            if is_quote:
                opening = -1
        elif is_quote:
            opening = i
    return m


def quote_pair(s):
    """A closing double quote attends to its opening quote; every other row is empty."""
    m = np.zeros((s.n, s.n))
    opening = -1
    for i, t in enumerate(s.tokens):
        if '"' in t or "\u201c" in t or "\u201d" in t:
            if opening >= 0:
                m[i, opening] = 1.0
                opening = -1
            else:
                opening = i
    return m


# ---------------------------------------------------------------------------------------
# Part-of-speech primitives: empty (all rows without a target) when s.pos is None.


def pos_tag(s, tag):
    """Token i attends to every token at or before i whose POS tag is `tag`."""
    if getattr(s, "pos", None) is None:
        return np.zeros((s.n, s.n))
    is_tag = np.array([p == tag for p in s.pos])
    return np.tril(np.ones((s.n, s.n)) * is_tag[None, :])


def last_pos_tag(s, tag):
    """Token i attends to the most recent token at or before i whose POS tag is `tag`."""
    m = np.zeros((s.n, s.n))
    if getattr(s, "pos", None) is None:
        return m
    last = -1
    for i, p in enumerate(s.pos):
        if p == tag:
            last = i
        if last >= 0:
            m[i, last] = 1.0
    return m


def same_pos(s):
    """Token i attends to every earlier token with the same POS tag as itself."""
    if getattr(s, "pos", None) is None:
        return np.zeros((s.n, s.n))
    tags = np.array(s.pos)
    return np.tril(tags[:, None] == tags[None, :], k=-1).astype(float)


# ---------------------------------------------------------------------------------------
# Combinator helpers, emitted alongside the primitives a program uses.


def with_fallback(m, fallback):
    """Rows of `m` with no score take the row of `fallback` instead."""
    empty = m.sum(axis=1) == 0
    m[empty] = fallback[empty]
    return m


def rows(m):
    """Divide each row by its sum so mixture weights mean shares; empty rows stay zero."""
    sums = m.sum(axis=1, keepdims=True)
    return m / np.where(sums > 0, sums, 1.0)


# ---------------------------------------------------------------------------------------
# The registry the generator enumerates.


@dataclass(frozen=True)
class Primitive:
    """A DSL primitive: its function, family tag, parameter settings and a short phrase."""

    fn: Callable
    family: str
    settings: tuple[dict, ...] = ({},)  # the argument sets the generator enumerates
    can_be_empty: bool = True  # some rows may have no target, so fallbacks make sense
    phrase: str = ""  # for docstrings; formatted with the arguments

    @property
    def name(self) -> str:
        return self.fn.__name__

    def describe(self, args: dict) -> str:
        return self.phrase.format(**args)


# sink_recency: the sink's weight in tokens, and the decay of the recent context (1.0: none)
SINK_SIZES = (1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
SINK_RECENCY_RATES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0)
_POS_TAGS = ("NOUN", "VERB", "ADJ", "ADV", "DET", "ADP", "PRON", "PROPN", "AUX", "CCONJ")

PRIMITIVES: dict[str, Primitive] = {
    p.name: p
    for p in [
        Primitive(first_token, "first", can_be_empty=False, phrase="the first token"),
        Primitive(second_token, "second", phrase="the second token"),
        Primitive(self_token, "self", can_be_empty=False, phrase="the token itself"),
        Primitive(
            previous,
            "previous",
            tuple({"k": k} for k in (1, 2, 3, 4)),
            phrase="the token {k} back",
        ),
        Primitive(
            recency,
            "recency",
            tuple({"rate": r} for r in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)),
            can_be_empty=False,
            phrase="recent tokens (decay {rate})",
        ),
        Primitive(
            sink_recency,
            "sink+recency",
            tuple({"sink": c, "rate": r} for c in SINK_SIZES for r in SINK_RECENCY_RATES),
            can_be_empty=False,
            phrase="recent tokens (decay {rate}) with {sink} extra on the first token",
        ),
        Primitive(uniform, "uniform", can_be_empty=False, phrase="all tokens so far"),
        Primitive(
            window,
            "window",
            tuple({"width": w} for w in (2, 3, 4, 8)),
            can_be_empty=False,
            phrase="the last {width} tokens",
        ),
        Primitive(punctuation, "punctuation", phrase="punctuation so far"),
        Primitive(last_punctuation, "punctuation", phrase="the last punctuation"),
        Primitive(the_tokens, "the", phrase='"the" tokens so far'),
        Primitive(sentence_start, "sentence-start", can_be_empty=False, phrase="the sentence start"),
        Primitive(same_token, "duplicate", phrase="earlier copies of the token"),
        Primitive(last_same_token, "duplicate", phrase="the last earlier copy of the token"),
        Primitive(induction, "induction", phrase="tokens after earlier copies of the token"),
        Primitive(last_induction, "induction", phrase="the token after its last earlier copy"),
        Primitive(same_word, "same-word", phrase="earlier copies of the word"),
        Primitive(word_start, "word-start", can_be_empty=False, phrase="the start of its word"),
        Primitive(current_word, "word", can_be_empty=False, phrase="its own word so far"),
        Primitive(previous_word, "previous-word", phrase="the previous word"),
        Primitive(previous_word_end, "previous-word", phrase="the end of the previous word"),
        Primitive(word_starts, "word-start", can_be_empty=False, phrase="word starts so far"),
        Primitive(capitalised, "capitalised", phrase="capitalised tokens"),
        Primitive(last_capitalised, "capitalised", phrase="the last capitalised token"),
        Primitive(numbers, "number", phrase="number tokens"),
        Primitive(quote_open, "quote", phrase="the opening quote"),
        Primitive(quote_pair, "quote", phrase="the matching opening quote"),
        Primitive(pos_tag, "pos", tuple({"tag": t} for t in _POS_TAGS), phrase="{tag} tokens so far"),
        Primitive(
            last_pos_tag,
            "pos",
            tuple({"tag": t} for t in ("NOUN", "VERB", "ADJ", "DET", "PROPN")),
            phrase="the last {tag}",
        ),
        Primitive(same_pos, "pos", phrase="earlier tokens with its POS tag"),
    ]
}

# Fallbacks for rows with no match: name -> (primitive, args).
FALLBACKS: dict[str, tuple[str, dict]] = {
    "self": ("self_token", {}),
    "previous": ("previous", {"k": 1}),
    "first": ("first_token", {}),
}

HELPERS: dict[str, Callable] = {fn.__name__: fn for fn in (with_fallback, rows)}


@cache
def source_of(name: str) -> str:
    """Source text of a primitive or helper function, as written in this module."""
    fn = PRIMITIVES[name].fn if name in PRIMITIVES else HELPERS[name]
    return inspect.getsource(fn)
