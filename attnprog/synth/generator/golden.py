"""The golden library: hand-written programs for well-known kinds of attention head.

They serve as test fixtures, as examples in LLM prompts and as a baseline pool for
ranking. Most use the native contract ``def program(s) -> np.ndarray`` over a Sentence;
the last few use the paper's form ``f(sentence: str, tokenizer) -> (label, matrix)`` and
carry ``provenance["form"] == "paper"``.
"""

from __future__ import annotations

from attnprog.synth.program import Program

# (family, source) for native-form programs; each defines `program(s)`.
_NATIVE: list[tuple[str, str]] = [
    (
        "first",
        '''
def program(s):
    """First-token head: every token attends to token 0 (BOS, the attention sink)."""
    m = np.zeros((s.n, s.n))
    m[:, 0] = 1.0
    return m
''',
    ),
    (
        "previous",
        '''
def program(s):
    """Previous-token head: token i attends to token i - 1 (token 0 to itself)."""
    m = np.zeros((s.n, s.n))
    m[0, 0] = 1.0
    for i in range(1, s.n):
        m[i, i - 1] = 1.0
    return m
''',
    ),
    (
        "previous",
        '''
def program(s):
    """Two-back head: token i attends to token i - 2 (the first two to token 0)."""
    m = np.zeros((s.n, s.n))
    for i in range(s.n):
        m[i, max(i - 2, 0)] = 1.0
    return m
''',
    ),
    (
        "self",
        '''
def program(s):
    """Self head: every token attends to itself."""
    return np.eye(s.n)
''',
    ),
    (
        "uniform",
        '''
def program(s):
    """Uniform causal head: token i spreads its attention evenly over tokens 0..i."""
    return np.tril(np.ones((s.n, s.n)))
''',
    ),
    (
        "recency",
        '''
def program(s):
    """Recency head: attention halves with every step back from the current token."""
    pos = np.arange(s.n)
    distance = pos[:, None] - pos[None, :]
    return np.where(distance >= 0, 0.5 ** np.maximum(distance, 0), 0.0)
''',
    ),
    (
        "window",
        '''
def program(s):
    """Local head: token i attends evenly to itself and the two tokens before it."""
    m = np.zeros((s.n, s.n))
    for i in range(s.n):
        m[i, max(i - 2, 0) : i + 1] = 1.0
    return m
''',
    ),
    (
        "sink+previous",
        '''
def program(s):
    """Previous token with an attention sink: 70% to token i - 1, 30% to token 0."""
    m = np.zeros((s.n, s.n))
    m[:, 0] = 0.3
    for i in range(1, s.n):
        m[i, i - 1] += 0.7
    return m
''',
    ),
    (
        "sink+self",
        '''
def program(s):
    """Self with an attention sink: half to the token itself, half to token 0."""
    m = 0.5 * np.eye(s.n)
    m[:, 0] += 0.5
    return m
''',
    ),
    (
        "second",
        '''
def program(s):
    """Second-token sink: every token from 1 on attends to token 1."""
    m = np.zeros((s.n, s.n))
    m[0, 0] = 1.0
    if s.n > 1:
        m[1:, 1] = 1.0
    return m
''',
    ),
    (
        "duplicate",
        '''
def program(s):
    """Duplicate-token head: a token attends to its earlier copies, else to itself."""
    m = np.zeros((s.n, s.n))
    for i in range(s.n):
        copies = [j for j in range(i) if s.ids[j] == s.ids[i]]
        for j in copies:
            m[i, j] = 1.0
        if not copies:
            m[i, i] = 1.0
    return m
''',
    ),
    (
        "induction",
        '''
def program(s):
    """Induction head: after "A B ... A", attend to B, the token that followed the last A."""
    m = np.zeros((s.n, s.n))
    last_seen = {}
    for i, token_id in enumerate(s.ids):
        if token_id in last_seen:
            m[i, last_seen[token_id] + 1] = 1.0
        else:
            m[i, 0] = 1.0  # nothing to copy: rest on the first token
        last_seen[token_id] = i
    return m
''',
    ),
    (
        "punctuation",
        '''
def program(s):
    """Punctuation head: a token attends to all punctuation so far (else token 0)."""
    is_punct = s.is_punct
    m = np.zeros((s.n, s.n))
    for i in range(s.n):
        m[i, : i + 1] = is_punct[: i + 1]
    return m
''',
    ),
    (
        "punctuation",
        '''
def program(s):
    """Last-punctuation head: a token attends to the most recent punctuation mark."""
    m = np.zeros((s.n, s.n))
    last = 0
    for i, punct in enumerate(s.is_punct):
        if punct:
            last = i
        m[i, last] = 1.0
    return m
''',
    ),
    (
        "sentence-start",
        '''
def program(s):
    """Sentence-start head: a token attends to the first token of its sentence."""
    m = np.zeros((s.n, s.n))
    start = 0
    for i, is_start in enumerate(s.is_sentence_start):
        if is_start:
            start = i
        m[i, start] = 1.0
    return m
''',
    ),
    (
        "word-start",
        '''
def program(s):
    """Word-start head: a token attends to the first token of its own word."""
    m = np.zeros((s.n, s.n))
    start = 0
    for i, is_start in enumerate(s.is_word_start):
        if is_start:
            start = i
        m[i, start] = 1.0
    return m
''',
    ),
    (
        "word",
        '''
def program(s):
    """Current-word head: a token attends evenly to its word's tokens so far."""
    word_ids = np.asarray(s.word_ids)
    return np.tril(word_ids[:, None] == word_ids[None, :]).astype(float)
''',
    ),
    (
        "previous-word",
        '''
def program(s):
    """Previous-word head: a token attends to the last token of the word before its own."""
    m = np.zeros((s.n, s.n))
    word_start = 0
    for i in range(s.n):
        if i > 0 and s.word_ids[i] != s.word_ids[i - 1]:
            word_start = i
        m[i, max(word_start - 1, 0)] = 1.0
    return m
''',
    ),
    (
        "same-word",
        '''
def program(s):
    """Same-word head: a token attends to earlier tokens spelled the same (any case)."""
    words = [t.strip().lower() for t in s.tokens]
    m = np.zeros((s.n, s.n))
    for i in range(s.n):
        for j in range(i):
            if words[j] and words[j] == words[i]:
                m[i, j] = 1.0
    return m
''',
    ),
    (
        "capitalised",
        '''
def program(s):
    """Name head: a token attends to the capitalised tokens so far (names, sentence starts)."""
    is_cap = np.array([t.strip()[:1].isupper() for t in s.tokens])
    return np.tril(np.ones((s.n, s.n)) * is_cap[None, :])
''',
    ),
    (
        "number",
        '''
def program(s):
    """Number head: a token attends to the most recent token containing a digit."""
    m = np.zeros((s.n, s.n))
    last = 0
    for i, t in enumerate(s.tokens):
        if any(c.isdigit() for c in t):
            last = i
        m[i, last] = 1.0
    return m
''',
    ),
    (
        "quote",
        '''
def program(s):
    """Quote head: inside double quotes, tokens (and the closing quote) attend to the opener."""
    m = np.zeros((s.n, s.n))
    opening = None
    for i, t in enumerate(s.tokens):
        is_quote = any(q in t for q in '"\\u201c\\u201d')
        if opening is not None:
            m[i, opening] = 1.0
            if is_quote:
                opening = None
        else:
            m[i, i] = 1.0
            if is_quote:
                opening = i
    return m
''',
    ),
    (
        "bracket",
        '''
def program(s):
    """Bracket head: inside ( ), [ ] or { }, a token attends to the innermost opener."""
    m = np.zeros((s.n, s.n))
    openers = []
    for i, t in enumerate(s.tokens):
        text = t.strip()
        m[i, openers[-1] if openers else i] = 1.0
        if text in ("(", "[", "{"):
            openers.append(i)
        elif text in (")", "]", "}") and openers:
            openers.pop()
    return m
''',
    ),
    (
        "content-word",
        '''
def program(s):
    """Content-word head: a token attends to the most recent word that is not a stopword."""
    stopwords = {"a", "an", "the", "and", "or", "but", "of", "in", "on", "at", "to", "for",
                 "with", "is", "are", "was", "were", "it", "that", "this", "he", "she", "they"}
    m = np.zeros((s.n, s.n))
    last = 0
    for i, t in enumerate(s.tokens):
        word = t.strip().lower()
        if word.isalpha() and word not in stopwords:
            last = i
        m[i, last] = 1.0
    return m
''',
    ),
    (
        "pos",
        '''
def program(s):
    """Noun head: a token attends to the most recent noun (POS tags if present, else token 0)."""
    m = np.zeros((s.n, s.n))
    last = 0
    for i in range(s.n):
        if s.pos is not None and s.pos[i] in ("NOUN", "PROPN"):
            last = i
        m[i, last] = 1.0
    return m
''',
    ),
    (
        "syntax",
        '''
def program(s):
    """Syntactic-head head: a token attends to its dependency head when that comes earlier."""
    m = np.eye(s.n)
    if s.dep_head is None:
        return m
    for i, head in enumerate(s.dep_head):
        if 0 <= head < i:
            m[i, i] = 0.0
            m[i, head] = 1.0
    return m
''',
    ),
]

# (family, function name, source) in the paper's form f(sentence, tokenizer) -> (label, matrix).
_PAPER: list[tuple[str, str, str]] = [
    (
        "previous",
        "previous_token_pattern",
        '''
def previous_token_pattern(sentence: str, tokenizer):
    """Paper form. Each token attends to the token just before it."""
    toks = tokenizer([sentence], return_tensors="pt")
    len_seq = len(toks.input_ids[0])
    out = np.zeros((len_seq, len_seq))
    out[0, 0] = 1.0
    for i in range(1, len_seq):
        out[i, i - 1] = 1.0
    return "Previous Token Pattern", out
''',
    ),
    (
        "first",
        "first_token_pattern",
        '''
def first_token_pattern(sentence: str, tokenizer):
    """Paper form. Every token attends to the first token of the sequence."""
    toks = tokenizer([sentence], return_tensors="pt")
    len_seq = len(toks.input_ids[0])
    out = np.zeros((len_seq, len_seq))
    out[:, 0] = 1.0
    return "First Token Pattern", out
''',
    ),
    (
        "duplicate",
        "repeated_token_pattern",
        '''
def repeated_token_pattern(sentence: str, tokenizer):
    """Paper form. A token attends to earlier copies of itself, else to the first token."""
    ids = list(tokenizer([sentence], return_tensors="pt").input_ids[0])
    len_seq = len(ids)
    out = np.zeros((len_seq, len_seq))
    for i in range(len_seq):
        for j in range(i):
            if ids[j] == ids[i]:
                out[i, j] = 1.0
        if out[i].sum() == 0:
            out[i, 0] = 1.0
    return "Repeated Token Pattern", out
''',
    ),
]

_HEADER = "import numpy as np\n\n"


def golden_programs() -> list[Program]:
    """The golden library, native programs first, then the paper-form ones."""
    programs = [
        Program(
            source=_HEADER + source,
            name="program",
            family=family,
            provenance={"generator": "golden", "form": "native"},
        )
        for family, source in _NATIVE
    ]
    programs += [
        Program(
            source=_HEADER + source,
            name=name,
            family=family,
            provenance={"generator": "golden", "form": "paper"},
        )
        for family, name, source in _PAPER
    ]
    return programs
