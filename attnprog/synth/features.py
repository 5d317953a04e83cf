"""Per-text features: a ``Sentence`` built once from the tokens the model saw."""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

_PUNCT = set(string.punctuation) | {"“", "”", "‘", "’", "—", "–", "…"}
_SENTENCE_END = {".", "!", "?", "…"}


@dataclass
class Sentence:
    """One tokenised text, as programs see it.

    ``tokens[i]`` is the decoded piece of token i (leading space kept), ``offsets[i]``
    its (start, end) character span in ``text`` and ``word_ids[i]`` the index of the
    whitespace-separated word it belongs to.
    """

    text: str
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    word_ids: list[int] = field(default_factory=list)
    pos: list[str] | None = None
    dep_head: list[int] | None = None

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.tokens) == len(self.offsets)):
            raise ValueError("ids, tokens and offsets must have one entry per token")
        if not self.word_ids:
            self.word_ids = _word_ids(self.text, self.offsets)

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def is_punct(self) -> np.ndarray:
        """[n] bool: the token is only punctuation (spaces ignored)."""
        return np.array(
            [bool(t.strip()) and all(c in _PUNCT for c in t.strip()) for t in self.tokens]
        )

    @property
    def is_word_start(self) -> np.ndarray:
        """[n] bool: the token starts a new word."""
        starts = np.ones(self.n, dtype=bool)
        starts[1:] = np.diff(np.asarray(self.word_ids)) != 0
        return starts

    @property
    def is_sentence_start(self) -> np.ndarray:
        """[n] bool: first token, or first non-punctuation token after . ! ? …"""
        starts = np.zeros(self.n, dtype=bool)
        if self.n:
            starts[0] = True
        after_end = False
        for i, tok in enumerate(self.tokens):
            stripped = tok.strip()
            if after_end and stripped and stripped[0] not in _PUNCT:
                starts[i] = True
                after_end = False
            if stripped and stripped[-1] in _SENTENCE_END:
                after_end = True
        return starts


def _word_ids(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Word index per token: a new word starts where whitespace precedes the token's text."""
    word_ids: list[int] = []
    word = -1
    prev_end = 0
    for start, end in offsets:
        first = start
        while first < end and text[first].isspace():
            first += 1
        gap = text[prev_end:first]
        if word < 0 or (gap and gap[-1].isspace()) or (first > start):
            word += 1
        word_ids.append(max(word, 0))
        prev_end = max(prev_end, end)
    return word_ids
