"""Twenty simple programs in the style an LLM writes (loops over tokens, small numpy),
shared by the sandbox benchmark and the sandbox tests."""

from __future__ import annotations

from attnprog.synth.program import Program

_SOURCES = {
    "previous_token": """
import numpy as np

def program(s):
    n = s.n
    out = np.zeros((n, n))
    out[0, 0] = 1.0
    for i in range(1, n):
        out[i, i - 1] = 1.0
    return out
""",
    "first_token": """
import numpy as np

def program(s):
    out = np.zeros((s.n, s.n))
    out[:, 0] = 1.0
    return out
""",
    "self_attention": """
import numpy as np

def program(s):
    return np.eye(s.n)
""",
    "uniform_causal": """
import numpy as np

def program(s):
    return np.tril(np.ones((s.n, s.n)))
""",
    "two_back": """
import numpy as np

def program(s):
    n = s.n
    out = np.zeros((n, n))
    for i in range(n):
        out[i, max(i - 2, 0)] = 1.0
    return out
""",
    "punctuation": """
import numpy as np

def program(s):
    n = s.n
    out = np.zeros((n, n))
    punct = s.is_punct
    for i in range(n):
        for j in range(i + 1):
            if punct[j]:
                out[i, j] = 1.0
    return out
""",
    "most_recent_punct": """
import numpy as np

def program(s):
    n = s.n
    out = np.zeros((n, n))
    last = 0
    for i in range(n):
        out[i, last] = 1.0
        if s.is_punct[i]:
            last = i
    return out
""",
    "same_token": """
import numpy as np

def program(s):
    n = s.n
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i):
            if s.ids[j] == s.ids[i]:
                out[i, j] = 1.0
    return out
""",
    "same_token_lower": """
import numpy as np

def program(s):
    words = [t.strip().lower() for t in s.tokens]
    n = len(words)
    out = np.zeros((n, n))
    for i, w in enumerate(words):
        for j in range(i):
            if words[j] == w:
                out[i, j] = 1.0
    return out
""",
    "induction": """
import numpy as np

def program(s):
    n = s.n
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(1, i):
            if s.ids[j - 1] == s.ids[i]:
                out[i, j] = 1.0
    return out
""",
    "sentence_start": """
import numpy as np

def program(s):
    n = s.n
    out = np.zeros((n, n))
    start = 0
    starts = s.is_sentence_start
    for i in range(n):
        if starts[i]:
            start = i
        out[i, start] = 1.0
    return out
""",
    "word_start": """
import numpy as np

def program(s):
    n = s.n
    out = np.zeros((n, n))
    first = s.word_start_index
    for i in range(n):
        out[i, first[i]] = 1.0
    return out
""",
    "capitalised": """
import numpy as np

def program(s):
    cap = s.is_capitalised
    out = np.tril(np.outer(np.ones(s.n), cap.astype(float)))
    return out
""",
    "recency_decay": """
import numpy as np

def program(s):
    idx = np.arange(s.n)
    dist = idx[:, None] - idx[None, :]
    return np.where(dist >= 0, 0.5 ** dist, 0.0)
""",
    "bos_and_previous": """
import numpy as np

def program(s):
    n = s.n
    out = np.zeros((n, n))
    out[:, 0] = 0.5
    for i in range(1, n):
        out[i, i - 1] += 0.5
    return out
""",
    "stopword_targets": """
import numpy as np

def program(s):
    mask = s.is_stopword
    out = np.zeros((s.n, s.n))
    for i in range(s.n):
        out[i, : i + 1] = mask[: i + 1]
    return out
""",
    "comma_after": """
import numpy as np

def program(s):
    n = s.n
    out = np.zeros((n, n))
    for i in range(n):
        if i > 0 and s.tokens[i - 1].strip() == ",":
            out[i, i - 1] = 1.0
        else:
            out[i, 0] = 1.0
    return out
""",
    "quote_pairing": """
import numpy as np

def program(s):
    n = s.n
    out = np.zeros((n, n))
    opened = None
    for i, tok in enumerate(s.tokens):
        if '"' in tok:
            if opened is None:
                opened = i
            else:
                out[i, opened] = 1.0
                opened = None
        out[i, 0] += 0.1
    return out
""",
    "same_word_start": """
import numpy as np
from collections import defaultdict

def program(s):
    seen = defaultdict(list)
    n = s.n
    out = np.zeros((n, n))
    for i, tok in enumerate(s.tokens):
        key = tok.strip().lower()
        for j in seen[key]:
            out[i, j] = 1.0
        seen[key].append(i)
    return out
""",
    "paper_previous_token": """
import numpy as np

def program(sentence: str, tokenizer):
    toks = tokenizer([sentence], return_tensors="pt")
    n = len(toks.input_ids[0])
    out = np.zeros((n, n))
    out[0, 0] = 1.0
    for i in range(1, n):
        out[i, i - 1] = 1.0
    return "Previous token", out
""",
}


def llm_style_programs() -> list[Program]:
    """The twenty programs, each with its name as family."""
    return [
        Program(source=src.strip() + "\n", name="program", family=family)
        for family, src in _SOURCES.items()
    ]


# --- twenty programs that call spaCy on every sentence, as most published programs do -----
_SPACY_TEMPLATES = {
    "nearest_pos": """
import numpy as np
import spacy
from transformers import PreTrainedTokenizerBase


def _word_at(doc):
    starts = {{}}
    for tok in doc:
        starts[tok.idx] = tok
    return starts


def program(sentence: str, tokenizer: PreTrainedTokenizerBase):
    doc = spacy.load("en_core_web_sm")(sentence)
    spans = tokenizer(sentence, return_offsets_mapping=True)["offset_mapping"]
    starts = _word_at(doc)
    n = len(spans)
    out = np.zeros((n, n))
    last = 0
    for i, (a, b) in enumerate(spans):
        out[i, last] = 1.0
        word = starts.get(a) or starts.get(a + 1)
        if word is not None and word.pos_ in {tags!r}:
            last = i
    return "Nearest earlier {tags}", out
""",
    "syntactic_head": """
import numpy as np
import spacy


def program(sentence, tokenizer):
    doc = spacy.load("en_core_web_sm")(sentence)
    spans = tokenizer(sentence, return_offsets_mapping=True)["offset_mapping"]
    token_of = {{}}
    for i, (a, b) in enumerate(spans):
        token_of.setdefault(a, i)
        token_of.setdefault(a + 1, i)
    n = len(spans)
    out = np.eye(n) * {self_weight}
    for tok in doc:
        i, j = token_of.get(tok.idx), token_of.get(tok.head.idx)
        if i is not None and j is not None:
            out[i, j] += 1.0
    return "Syntactic head", out
""",
    "same_lemma": """
import numpy as np
import spacy


def program(sentence, tokenizer):
    doc = spacy.load("en_core_web_sm")(sentence)
    spans = tokenizer(sentence, return_offsets_mapping=True)["offset_mapping"]
    lemma_at = {{tok.idx: tok.lemma_.lower() for tok in doc}}
    lemmas = [lemma_at.get(a, lemma_at.get(a + 1)) for a, b in spans]
    n = len(lemmas)
    out = np.zeros((n, n))
    out[:, 0] = {sink}
    seen = {{}}
    for i, lemma in enumerate(lemmas):
        if lemma is not None and lemma in seen:
            out[i, seen[lemma]] = 1.0
        if lemma is not None:
            seen.setdefault(lemma, i)
    return "Same lemma", out
""",
    "entities": """
import numpy as np
import spacy


def program(sentence, tokenizer):
    doc = spacy.load("en_core_web_sm")(sentence)
    spans = tokenizer(sentence, return_offsets_mapping=True)["offset_mapping"]
    starts = {{ent.start_char for ent in doc.ents}}
    n = len(spans)
    out = np.tril(np.ones((n, n))) * {decay}
    for j, (a, b) in enumerate(spans):
        if a in starts or a + 1 in starts:
            out[j:, j] += 1.0
    return "Entities", out
""",
}
_SPACY_SETTINGS = {
    "nearest_pos": [{"tags": t} for t in (("NOUN",), ("VERB",), ("ADJ",), ("PROPN", "NOUN"),
                                           ("DET",))],
    "syntactic_head": [{"self_weight": w} for w in (0.0, 0.1, 0.3, 0.5, 1.0)],
    "same_lemma": [{"sink": w} for w in (0.0, 0.05, 0.1, 0.2, 0.5)],
    "entities": [{"decay": w} for w in (0.0, 0.01, 0.05, 0.1, 0.2)],
}


def spacy_style_programs() -> list[Program]:
    """Twenty paper-form programs that load spaCy and parse their sentence on every call."""
    return [
        Program(_SPACY_TEMPLATES[name].format(**setting), family=f"spacy_{name}")
        for name, settings in _SPACY_SETTINGS.items()
        for setting in settings
    ]
