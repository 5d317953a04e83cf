"""Small hand-written probe texts, tokenised without a model, for de-duplicating candidates.

A toy tokeniser splits words and punctuation (leading space kept, like BPE pieces) and cuts
long words into pieces, so word-level and token-level primitives differ on the probes. A
tiny lexicon gives POS tags so POS-based candidates are told apart too.
"""

from __future__ import annotations

import re

from attnprog.synth.features import Sentence

PROBE_TEXTS = (
    'The cat sat on the mat. The cat saw a dog, and the dog ran away! "Run," said Anna.',
    "Alice met Bob in Paris in 2019. Alice and Bob talked about extraordinary "
    "mathematics; Bob liked it, Alice did not.",
    'He said "we will win" and then, after 3 long hours, they finally won the game. Did they celebrate? Yes.',
    "Mary had a little lamb, little lamb, little lamb. Mary had a little lamb whose "
    "fleece was white as snow.",
    "In the beginning (before anything else) there was nothing: no light, no sound, "
    "no time. Then everything changed quickly.",
    "Transformers compute attention between tokens. Attention heads often attend to "
    "previous tokens, to the first token, or to repeated tokens.",
)

_PIECE = re.compile(r"\s*\w+|\s*[^\w\s]")
_MAX_PIECE = 7  # longer word pieces are cut, as a BPE vocabulary would

_LEXICON = {
    "DET": "the a an no every",
    "ADP": "on in about after before between to of as",
    "PRON": "he they we it whose anything everything nothing",
    "CCONJ": "and or but",
    "AUX": "will did was had",
    "ADV": "away then finally often quickly not yes",
    "ADJ": "long little white extraordinary first previous repeated else",
    "VERB": "sat saw ran run said met talked liked win won celebrate compute attend changed was had",
}
_TAG_OF = {word: tag for tag, words in _LEXICON.items() for word in words.split()}


def _tag(word: str, first_in_sentence: bool) -> str:
    if not any(c.isalnum() for c in word):
        return "PUNCT"
    if word.isdigit():
        return "NUM"
    if word.lower() in _TAG_OF:
        return _TAG_OF[word.lower()]
    if word[0].isupper() and not first_in_sentence:
        return "PROPN"
    return "NOUN"


def tokenise(text: str, vocab: dict[str, int], with_pos: bool = True) -> Sentence:
    """Split ``text`` into toy BPE-like pieces; ids come from (and extend) ``vocab``."""
    tokens: list[str] = []
    offsets: list[tuple[int, int]] = []
    pos: list[str] = []
    first_in_sentence = True
    for match in _PIECE.finditer(text):
        piece, start = match.group(), match.start()
        word = piece.strip()
        tag = _tag(word, first_in_sentence)
        first_in_sentence = word in {".", "!", "?"}
        while piece:
            cut = len(piece) if len(piece) <= _MAX_PIECE else _MAX_PIECE - 2
            tokens.append(piece[:cut])
            offsets.append((start, start + cut))
            pos.append(tag)
            piece, start = piece[cut:], start + cut
    ids = [vocab.setdefault(t, len(vocab)) for t in tokens]
    pos_tags = pos if with_pos else None
    return Sentence(text=text, ids=ids, tokens=tokens, offsets=offsets, pos=pos_tags)


def probe_sentences() -> list[Sentence]:
    """The probe texts as Sentences sharing one toy vocabulary, POS tags included."""
    vocab: dict[str, int] = {}
    return [tokenise(text, vocab) for text in PROBE_TEXTS]
