"""Fitted programs: a head explained as a sink share plus a softmax over named features.

A fitted program gives every query i the row

    share * [j == 0] + (1 - share) * softmax over keys j <= i of sum_k weight_k * f_k(i, j)

where each feature f_k is one numpy expression of the Sentence ``s`` and the position grids
``i`` (queries, [n, 1]) and ``j`` (keys, [1, n]). The fitter (``attnprog.engine.fit``) and
the emitted source evaluate the very same expression text, so they cannot drift apart.
A fit is the JSON-able dict ``{"share": float, "weights": {feature name: float}}``.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

from attnprog.errors import ProgramError
from attnprog.layout import causal_offsets, tril_index
from attnprog.synth.features import attach_syntax
from attnprog.synth.program import Program

FITTER = "softmax-features"


@dataclass(frozen=True)
class Feature:
    """A named feature of (query i, key j): a numpy expression and what a weight on it means."""

    name: str
    expr: str
    phrase: str  # "{w}" is replaced by the weight in words, e.g. "+1.8 on punctuation"


def _key(name: str, attr: str, phrase: str) -> Feature:
    return Feature(name, f"s.{attr}[j]", f"{{w}} on {phrase}")


def _first_from(name: str, attr: str, phrase: str) -> Feature:
    return Feature(f"first_from_{name}", f"(j == 0) & s.{attr}[i]",
                   f"{{w}} on the first token from {phrase}")


_CLASSES = (  # (name, Sentence attribute, phrase): token classes used for keys and queries
    ("punct", "is_punct", "punctuation"), ("sentence_end", "is_sentence_end", "sentence ends"),
    ("newline", "is_newline", "line breaks"), ("word_start", "is_word_start", "word starts"),
    ("sentence_start", "is_sentence_start", "sentence starts"),
    ("capitalised", "is_capitalised", "capitalised tokens"), ("name", "is_name", "names"),
    ("function_word", "is_stopword", "function words"),
    ("determiner", "is_determiner", "determiners"), ("pronoun", "is_pronoun", "pronouns"),
    ("preposition", "is_preposition", "prepositions"),
    ("conjunction", "is_conjunction", "conjunctions"), ("number", "is_number", "numbers"),
    ("quote", "is_quote", "quotes"), ("content_word", "is_content_word", "content words"),
)
POS_TAGS = ("NOUN", "VERB", "ADJ", "ADV", "PROPN", "PRON", "AUX", "ADP", "DET", "CCONJ")


FEATURES: tuple[Feature, ...] = (
    # positions
    Feature("first", "j == 0", "{w} on the first token"),
    Feature("second", "j == 1", "{w} on the second token"),
    Feature("self", "j == i", "{w} on the token itself"),
    Feature("previous_1", "j == i - 1", "{w} on the previous token"),
    Feature("previous_2", "j == i - 2", "{w} on the token 2 back"),
    Feature("previous_3", "j == i - 3", "{w} on the token 3 back"),
    Feature("distance", "i - j", "{w} per token back"),
    Feature("log_distance", "np.log1p(np.abs(i - j))", "{w} x log(1 + distance)"),
    Feature("first_late", "(j == 0) * np.log1p(i)", "{w} x log(1 + position) on the first token"),
    Feature("first_from_word_middle", "(j == 0) & ~s.is_word_start[i]",
            "{w} on the first token from inside a word"),
    Feature("self_punct", "(j == i) & s.is_punct[i]", "{w} on itself for punctuation"),
    *(_key(*c) for c in _CLASSES),  # classes of the key token
    *(_first_from(*c) for c in _CLASSES),  # the first token, for some kinds of query
    # relations between query and key
    Feature("same_token", "(np.asarray(s.ids)[j] == np.asarray(s.ids)[i]) & (j < i)",
            "{w} on earlier copies of the token"),
    Feature("last_copy", "j == s.previous_occurrence[i]", "{w} on the last earlier copy"),
    Feature("induction", "(np.asarray(s.ids)[np.maximum(j - 1, 0)] == np.asarray(s.ids)[i]) & (j > 0)",
            "{w} on tokens after earlier copies (induction)"),
    Feature("last_induction", "(j == s.previous_occurrence[i] + 1) & (s.previous_occurrence[i] >= 0)",
            "{w} on the token after the last copy"),
    Feature("same_word", "np.asarray(s.word_ids)[j] == np.asarray(s.word_ids)[i]",
            "{w} on its own word"),
    Feature("word_begin", "j == s.word_start_index[i]", "{w} on the start of its word"),
    Feature("previous_word", "np.asarray(s.word_ids)[j] == np.asarray(s.word_ids)[i] - 1",
            "{w} on the previous word"),
    Feature("previous_word_end", "j == s.word_start_index[i] - 1",
            "{w} on the end of the previous word"),
    Feature("same_sentence", "s.sentence_ids[j] == s.sentence_ids[i]", "{w} on its own sentence"),
    Feature("own_sentence_start", "j == s.most_recent(s.is_sentence_start, True)[i]",
            "{w} on its sentence's start"),
    Feature("last_punct", "j == s.most_recent(s.is_punct)[i]", "{w} on the last punctuation"),
    Feature("last_sentence_end", "j == s.most_recent(s.is_sentence_end)[i]",
            "{w} on the last sentence end"),
    Feature("last_name", "j == s.most_recent(s.is_name)[i]", "{w} on the last name"),
    Feature("last_function_word", "j == s.most_recent(s.is_stopword)[i]",
            "{w} on the last function word"),
)
_PAIR_CLASSES = ("punct", "sentence_end", "function_word", "content_word", "name", "pronoun",
                 "determiner", "preposition", "word_start")
_CLASS = {name: (attr, phrase) for name, attr, phrase in _CLASSES}
# from a class of query to a class of key: "+1.2 from pronouns to names"
PAIR_FEATURES: tuple[Feature, ...] = tuple(
    Feature(f"{q}_to_{k}", f"s.{_CLASS[q][0]}[i] & s.{_CLASS[k][0]}[j]",
            f"{{w}} from {_CLASS[q][1]} to {_CLASS[k][1]}")
    for q in _PAIR_CLASSES for k in _PAIR_CLASSES
)
FEATURES = FEATURES + PAIR_FEATURES
# the first token of a class: a second sink in many heads (e.g. the text's first ' the')
_FIRST_CLASSES = ("punct", "sentence_end", "function_word", "determiner", "preposition",
                  "pronoun", "content_word", "name")
# classes of query that move the self / previous-token / decay terms
_QUERY_CLASSES = ("punct", "function_word", "determiner", "preposition", "pronoun",
                  "conjunction", "content_word", "name", "word_start", "sentence_start")
FEATURES = FEATURES + (
    Feature("key_position", "np.log1p(j)", "{w} x log(1 + key position)"),
    Feature("first_copy", "s.is_first_copy[j] & (j > 0)",
            "{w} on the first copy of each token"),
    Feature("first_copy_function_word", "s.is_first_copy[j] & s.is_stopword[j]",
            "{w} on the first copy of each function word"),
    Feature("first_copy_punct", "s.is_first_copy[j] & s.is_punct[j]",
            "{w} on the first copy of each punctuation mark"),
    *(Feature(f"first_{c}", f"j == s.first_index(s.{_CLASS[c][0]})",
              f"{{w}} on the first of the {_CLASS[c][1]}") for c in _FIRST_CLASSES),
    *(Feature(f"self_from_{c}", f"(j == i) & s.{_CLASS[c][0]}[i]",
              f"{{w}} on itself for {_CLASS[c][1]}") for c in _QUERY_CLASSES),
    *(Feature(f"previous_from_{c}", f"(j == i - 1) & s.{_CLASS[c][0]}[i]",
              f"{{w}} on the previous token from {_CLASS[c][1]}") for c in _QUERY_CLASSES),
    *(Feature(f"distance_from_{c}", f"(i - j) * s.{_CLASS[c][0]}[i]",
              f"{{w}} per token back from {_CLASS[c][1]}") for c in _QUERY_CLASSES),
)
# with spaCy: POS tags of the key and dependency arcs (all zero on texts without syntax); the
# tags and arcs are causal (attach_syntax): a query's arcs are those known when it arrives
SYNTAX_FEATURES: tuple[Feature, ...] = (
    Feature("syntactic_head", "j == s.head_index[i]", "{w} on its syntactic head"),
    Feature("syntactic_dependent", "s.dependent_matrix[i, j]", "{w} on its syntactic dependents"),
    *(Feature(f"pos_{tag.lower()}", f"s.has_pos({tag!r})[j]", f"{{w}} on {tag} tokens")
      for tag in POS_TAGS),
)  # fmt: skip
# with the model's input embeddings (a store's texts): token meaning, as cosine similarity
EMBEDDING_FEATURES: tuple[Feature, ...] = (
    Feature("similar", "s.embedding_similarity(i, j) * (j < i)",
            "{w} x similarity in meaning to the query"),
    Feature("similar_to_previous", "s.embedding_similarity(np.maximum(i - 1, 0), j) * (j < i)",
            "{w} x similarity to the token before the query"),
    Feature("after_similar", "s.embedding_similarity(i, np.maximum(j - 1, 0)) * (j > 0)",
            "{w} x similarity of the key's previous token to the query"),
    Feature("similar_content", "s.embedding_similarity(i, j) * (j < i) * s.is_content_word[j]",
            "{w} x similarity to the query, on content words"),
)
FEATURE_NAMES = tuple(f.name for f in FEATURES)
SYNTAX_FEATURE_NAMES = tuple(f.name for f in SYNTAX_FEATURES)
EMBEDDING_FEATURE_NAMES = tuple(f.name for f in EMBEDDING_FEATURES)
_BY_NAME = {f.name: f for f in FEATURES + SYNTAX_FEATURES + EMBEDDING_FEATURES}
KEY_TOKEN = "key_token:"  # + JSON string of a token piece: the key is that very token
QUERY_TOKEN = "first_from_token:"  # + JSON piece: key 0, seen from a query that is that token


def key_token_name(piece: str) -> str:
    """Name of the feature "the key is the token ``piece``" (e.g. ',' or ' said')."""
    return KEY_TOKEN + json.dumps(piece)


def query_token_name(piece: str) -> str:
    """Name of the feature "key 0, from a query that is the token ``piece``"."""
    return QUERY_TOKEN + json.dumps(piece)


def _piece(name: str, prefix: str) -> str | None:
    try:
        piece = json.loads(name[len(prefix):])
    except ValueError:
        return None
    return piece if isinstance(piece, str) else None


def feature(name: str) -> Feature:
    """The feature called ``name``: one of FEATURES, or a ``key_token:`` /
    ``first_from_token:`` feature of one token piece."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    piece = _piece(name, KEY_TOKEN) if name.startswith(KEY_TOKEN) else None
    if piece is not None:
        return Feature(name, f"np.array([t == {piece!r} for t in s.tokens])[j]",
                       f"{{w}} on {piece!r}")
    piece = _piece(name, QUERY_TOKEN) if name.startswith(QUERY_TOKEN) else None
    if piece is not None:
        return Feature(name, f"(j == 0) & np.array([t == {piece!r} for t in s.tokens])[i]",
                       f"{{w}} on the first token from {piece!r}")
    raise ProgramError(f"unknown fitted feature {name!r}; known: {', '.join(FEATURE_NAMES)} "
                       f"and {KEY_TOKEN}\"piece\"")


def _order(name: str) -> tuple:
    known = FEATURE_NAMES + SYNTAX_FEATURE_NAMES + EMBEDDING_FEATURE_NAMES
    return (known.index(name), "") if name in _BY_NAME else (len(known), name)


@cache
def _compiled(expr: str):
    return compile(expr, f"<feature {expr}>", "eval")


def feature_dense(s, names: Sequence[str] = FEATURE_NAMES,
                  queries: Sequence[int] | None = None) -> np.ndarray:
    """Each named feature on one text as a dense float64 [features, query_pos, key_pos] (values
    above the diagonal are left as computed; the fitted model masks them). ``queries``: only
    those query rows (e.g. the newest token's, when generating)."""
    n = s.n
    i = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    grids = {"np": np, "s": s, "i": i[:, None], "j": np.arange(n)[None, :]}
    out = np.empty((len(names), len(i), n), dtype=np.float64)
    for k, name in enumerate(names):
        out[k] = eval(_compiled(feature(name).expr), grids)  # noqa: S307 - our own expressions
    return out


def feature_packed(s, names: Sequence[str] = FEATURE_NAMES) -> np.ndarray:
    """Each named feature on one text's causal cells: float64 [features, cells] (n(n+1)/2
    cells)."""
    rows, cols = tril_index(s.n)
    return feature_dense(s, names)[:, rows, cols]


# ---------------------------------------------------------------------------------------
# A fit: check, round, evaluate


def check_fit(fit: dict) -> dict:
    """The fit with float values, or ProgramError when it names an unknown feature."""
    try:
        share = float(fit["share"])
        weights = {str(k): float(v) for k, v in fit["weights"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ProgramError(f"a fit needs 'share' and 'weights' ({err})") from err
    for name in weights:
        feature(name)  # raises for an unknown name
    if not 0.0 <= share < 1.0 or not all(map(math.isfinite, weights.values())):
        raise ProgramError(f"a fit needs 0 <= share < 1 and finite weights, got {fit!r}")
    return {"share": share, "weights": weights}


def round_fit(fit: dict, digits: int = 3) -> dict:
    """Weights to ``digits`` significant digits and the share to 3 decimals, for reading. A
    fitter's share at or near 1 (a sigmoid saturates) becomes 0.999: a fit needs share < 1."""
    if isinstance(fit, dict) and isinstance(fit.get("share"), int | float):
        fit = {**fit, "share": min(fit["share"], 0.999)}
    fit = check_fit(fit)
    weights = {k: float(f"{v:.{digits}g}") for k, v in fit["weights"].items()}
    return {"share": round(fit["share"], 3), "weights": {k: v for k, v in weights.items() if v}}


def fitted_dense(fit: dict, features: np.ndarray) -> np.ndarray:
    """The fitted model's n x n matrix from dense features [features, query_pos, key_pos] (one
    feature per weight of the fit, in order), computed exactly as the emitted source computes it."""
    weights = list(fit["weights"].values())
    n = features.shape[-1]
    score = np.zeros((n, n))
    for w, f in zip(weights, features, strict=True):
        score += w * f
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    score = np.where(j <= i, score, -np.inf)
    attention = np.exp(score - score.max(axis=1, keepdims=True))
    attention /= attention.sum(axis=1, keepdims=True)
    attention *= 1.0 - fit["share"]
    attention[:, 0] += fit["share"]
    return attention


def features_used(fits: Sequence[dict], sentences: Sequence) -> list[str]:
    """The features ``fits`` read, in a fixed order; attaches syntax to ``sentences`` when one
    of them needs it (as evaluate_programs does for programs that read s.pos)."""
    used = sorted({k for f in fits for k in f["weights"]}, key=_order)
    if set(used) & set(SYNTAX_FEATURE_NAMES) and not all(s.has_syntax for s in sentences):
        attach_syntax(sentences)
    return used


def evaluate_fits(fits: Sequence[dict], sentences: Sequence) -> np.ndarray:
    """Normalised outputs of fits on ``sentences``, packed: [programs, cells] float32 (features per text
    computed once for all fits)."""
    fits = [check_fit(f) for f in fits]
    used = features_used(fits, sentences)
    offsets = causal_offsets([s.n for s in sentences])
    out = np.empty((len(fits), int(offsets[-1])), dtype=np.float32)
    for t, s in enumerate(sentences):
        dense = feature_dense(s, used)
        rows, cols = tril_index(s.n)
        for p, fit in enumerate(fits):
            own = dense[[used.index(k) for k in fit["weights"]]]
            out[p, offsets[t] : offsets[t + 1]] = fitted_dense(fit, own)[rows, cols]
    return out


# ---------------------------------------------------------------------------------------
# Words and source


def _weight_words(name: str, w: float) -> str:
    if name == "distance":
        return f"{'decays' if w < 0 else 'grows'} x{math.exp(w):.2f}"
    return f"{w:+.2g}"


_SHORT_LABELS = {  # (label for a positive weight, for a negative one) where the phrase reads badly
    "distance": ("distant tokens", "recency"),
    "log_distance": ("distant tokens (log)", "recency (log)"),
    "key_position": ("later keys", "earlier keys"),
    "first_late": ("first token, more in later rows", "first token, less in later rows"),
    "induction": ("induction", "not induction"),
    "same_token": ("earlier copies", "not earlier copies"),
    "similar": ("similar in meaning to the query", "unlike the query in meaning"),
    "similar_to_previous": ("similar to the token before the query",
                            "unlike the token before the query"),
    "after_similar": ("after tokens similar to the query", "not after tokens similar to the query"),
    "similar_content": ("content words similar to the query", "content words unlike the query"),
}


def term_label(name: str, weight: float) -> str:
    """A term in a few words, for program names: 'previous token', "' the'", 'recency',
    'not punctuation' (a negative weight)."""
    if name in _SHORT_LABELS:
        return _SHORT_LABELS[name][weight < 0]
    if name.startswith("distance_from_"):
        return f"{'distant tokens' if weight > 0 else 'recency'} from {_CLASS[name[14:]][1]}"
    phrase = feature(name).phrase.removeprefix("{w} ").removeprefix("on ").removeprefix("the ")
    return phrase if weight >= 0 else f"not {phrase}"


def describe_fit(fit: dict) -> str:
    """What the head does, in words: '62 % on the first token; otherwise decays ...'."""
    fit = check_fit(fit)
    parts = []
    terms = sorted(fit["weights"].items(), key=lambda kv: -abs(kv[1]) if kv[0] != "distance" else -1e9)
    for name, w in terms:
        parts.append(feature(name).phrase.format(w=_weight_words(name, w)))
    body = "; ".join(parts) if parts else "uniform over the tokens so far"
    if fit["share"] >= 0.0005:
        return f"{100 * fit['share']:.0f} % on the first token; the rest: {body}."
    return f"A softmax over the tokens so far: {body}."


_PIECE_WORDS = {".": "PERIOD", ",": "COMMA", '"': "QUOTE", "'": "APOSTROPHE", "!": "BANG",
                "?": "QUESTION", ":": "COLON", ";": "SEMICOLON", "-": "DASH", "\n": "NEWLINE"}


def _constant(name: str, taken: set[str] | None = None) -> str:
    """A readable constant name: W_PUNCT, W_TOKEN_SAID, W_FIRST_FROM_TOKEN_PERIOD_QUOTE."""
    if name.startswith(KEY_TOKEN):
        prefix, piece = "W_TOKEN_", json.loads(name[len(KEY_TOKEN):])
    elif name.startswith(QUERY_TOKEN):
        prefix, piece = "W_FIRST_FROM_TOKEN_", json.loads(name[len(QUERY_TOKEN):])
    else:
        return f"W_{name.upper()}"
    words, word = [], ""
    for c in piece.strip() or piece:
        if c.isascii() and c.isalnum():
            word += c.upper()
            continue
        if word:
            words.append(word)
            word = ""
        words.append(_PIECE_WORDS.get(c, f"U{ord(c):04X}"))
    words += [word] if word else []
    constant = prefix + "_".join(words)
    while taken is not None and constant in taken:  # " The" and "The" both read THE
        constant += "_"
    return constant


def _constants(names) -> dict[str, str]:
    taken: set[str] = set()
    out = {}
    for name in names:
        out[name] = _constant(name, taken)
        taken.add(out[name])
    return out


def source_from_fit(fit: dict, about: str = "") -> str:
    """Readable, self-contained source ``def program(s) -> np.ndarray`` for ``fit``."""
    fit = check_fit(fit)
    doc = textwrap.fill(
        (about + " " if about else "") + describe_fit(fit), width=88, subsequent_indent="    "
    )
    constants = _constants(fit["weights"])
    share = f"SINK_SHARE = {fit['share']!r}  # of every row, on the first token"
    lines = ["import numpy as np", "", share]
    for name, w in fit["weights"].items():
        lines.append(f"{constants[name]} = {w!r}")
    lines += ["", "", "def program(s) -> np.ndarray:", f'    """{doc}"""',
              "    i = np.arange(s.n)[:, None]  # query positions",
              "    j = np.arange(s.n)[None, :]  # key positions",
              "    score = np.zeros((s.n, s.n))"]
    for name in fit["weights"]:
        lines.append(f"    score += {constants[name]} * ({feature(name).expr})")
    lines += [
        "    score = np.where(j <= i, score, -np.inf)",
        "    attention = np.exp(score - score.max(axis=1, keepdims=True))",
        "    attention /= attention.sum(axis=1, keepdims=True)",
        "    attention *= 1.0 - SINK_SHARE",
        "    attention[:, 0] += SINK_SHARE",
        "    return attention",
    ]
    return "\n".join(lines) + "\n"


def program_from_fit(fit: dict, *, head: str = "", model_id: str = "", split: str = "synthesis",
                     score: float | None = None) -> Program:
    """The Program for a fit; provenance records the fit, the head and the split it came from."""
    fit = check_fit(fit)
    if score is not None:  # rounded once, so the source regenerates from the provenance exactly
        score = round(float(score), 4)
    about = f"Fitted to {model_id} head {head} on the {split} split".strip()
    if score is not None:
        about += f" (IoU {score:.3f} there)"
    about = about + ":" if head or model_id else ""
    provenance = {"fitted": FITTER, "fit": fit, "head": head, "model_id": model_id, "split": split}
    if score is not None:
        provenance["split_iou"] = score
    return Program(source=source_from_fit(fit, about), name="program", family="fitted",
                   provenance=provenance)


def is_fitted(program: Program) -> bool:
    """True when ``program`` is an unedited fitted program (its source matches its fit)."""
    provenance = program.provenance or {}
    if provenance.get("fitted") != FITTER or not isinstance(provenance.get("fit"), dict):
        return False
    try:
        # no sort_keys: the order of the weights is the order of the terms in the source
        return _regenerate(json.dumps(provenance)) == program.source
    except (ProgramError, KeyError, TypeError, ValueError):
        return False


@lru_cache(maxsize=4096)
def _regenerate(provenance_json: str) -> str:
    p = json.loads(provenance_json)
    return program_from_fit(p["fit"], head=p.get("head", ""), model_id=p.get("model_id", ""),
                            split=p.get("split", "synthesis"), score=p.get("split_iou")).source


def evaluate_fitted(programs: Sequence[Program], sentences: Sequence) -> np.ndarray:
    """Outputs of unedited fitted programs without running their sources: [programs, cells] float32."""
    for program in programs:
        if not is_fitted(program):
            raise ProgramError(f"program {program.hash} is not an unedited fitted program; "
                               "evaluate it in the sandbox instead")
    return evaluate_fits([p.provenance["fit"] for p in programs], sentences)
