"""Causal syntax: each token's POS tag and arcs from a parse of the text up to that token.

A parse of the whole text lets a token's tag change with the words after it, so a program
that reads it would see the future. Here token i gets the tag spaCy gives it in the parse of
the text from its sentence's start to the end of token i, by the POS rules that do not read the
dependency label of that newest word (on unfinished text spaCy often makes it the root, and its
rules then tag a trailing "a" as a pronoun); its head is kept only when it is
an earlier token (an arc to a later word is not known yet: the token then points to itself,
as a root does), and its dependents are the earlier tokens whose head, in that same parse,
is token i's word.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Parse = list[tuple[int, int, str, int]]  # spaCy tokens: (start, end, POS, head's start)


def prefix_end(offsets: Sequence[tuple[int, int]], i: int) -> int:
    """End of the text known when token i arrives: the furthest character of tokens 0..i."""
    return max((end for _, end in offsets[: i + 1]), default=0)


def windows(s) -> list[tuple[int, int, int]]:
    """(first token, first character, last character) of the text parsed for each token: from
    the start of its sentence (``s.is_sentence_start``, itself causal) to the token's end.
    spaCy draws no arc across sentences, and a parse of one sentence costs far less than
    one of the whole prefix."""
    starts = s.most_recent(s.is_sentence_start, include_self=True)
    ends = np.maximum.accumulate([end for _, end in s.offsets]) if s.n else []  # prefix_end
    out = []
    for i in range(s.n):
        first = int(max(starts[i], 0))
        out.append((first, _window_start(s, first, i), int(ends[i])))
    return out


def parsed_prefixes(s) -> list[str]:
    """The distinct texts ``s``'s tokens need parsed (one per token with text)."""
    return list(dict.fromkeys(s.text[a:b] for i, (_, a, b) in enumerate(windows(s))
                              if _first_char(s.text, s.offsets[i]) is not None))


def causal_alignment(s, parses: dict[str, Parse]) -> tuple[list[str], list[int], list[list[int]]]:
    """(pos, dep_head, dependents) of each token of ``s``, each from its own prefix's parse.

    ``parses`` maps each of :func:`parsed_prefixes` to its spaCy parse.
    """
    found = [token_syntax(s, i, window, parses) for i, window in enumerate(windows(s))]
    return [f[0] for f in found], [f[1] for f in found], [f[2] for f in found]


def last_window(s) -> tuple[int, int, int] | None:
    """The window of ``s``'s last token (as :func:`windows` gives it), None when that token
    has no text of its own; what a growing text needs parsed for its newest token."""
    i = s.n - 1
    if i < 0 or _first_char(s.text, s.offsets[i]) is None:
        return None
    first = int(max(s.most_recent(s.is_sentence_start, include_self=True)[i], 0))
    return first, _window_start(s, first, i), prefix_end(s.offsets, i)


def token_syntax(s, i: int, window: tuple[int, int, int] | None,
                 parses: dict[str, Parse]) -> tuple[str, int, list[int]]:
    """(tag, head, dependents) of token i of ``s`` from the parse of its ``window``."""
    if window is None or _first_char(s.text, s.offsets[i]) is None:  # BOS, spaces
        return "X", i, []
    first_token, start, end = window
    parse = [(a + start, b + start, tag, h + start)
             for a, b, tag, h in parses[s.text[start:end]]]  # to characters of s.text
    tag, head, deps = _last_token_arcs(s.text, s.offsets[first_token : i + 1], parse)
    return tag, head + first_token, [d + first_token for d in deps]


def _window_start(s, first: int, i: int) -> int:
    """First character of the window: where token ``first`` (its sentence's start) begins."""
    for t in range(first, i + 1):
        c = _first_char(s.text, s.offsets[t])
        if c is not None:
            return c
    return s.offsets[i][0]


def _first_char(text: str, span: tuple[int, int]) -> int | None:
    """The first non-space character of a token's span, None when it has none."""
    start, end = span
    while start < end and text[start].isspace():
        start += 1
    return start if start < end else None


def _last_token_arcs(text: str, offsets, parse: Parse) -> tuple[str, int, list[int]]:
    """The last token's (tag, head, dependents) in ``parse`` of the prefix these tokens cover."""
    char_word = {}  # character index -> spaCy token index
    for w, (a, b, _, _) in enumerate(parse):
        for c in range(a, b):
            char_word[c] = w
    token_word = [char_word.get(c) if c is not None else None
                  for c in (_first_char(text, span) for span in offsets)]
    last = len(offsets) - 1
    word = token_word[last]
    if word is None:  # the prefix's parse split differently: no word covers this token
        return "X", last, []
    first_of = {}
    for t, w in enumerate(token_word):
        if w is not None:
            first_of.setdefault(w, t)
    head_word = [char_word.get(head_start) for _, _, _, head_start in parse]
    head = first_of.get(head_word[word], last)
    dependents = [t for t, w in enumerate(token_word[:last])
                  if w is not None and w != word and head_word[w] == word]
    return parse[word][2], head, dependents
