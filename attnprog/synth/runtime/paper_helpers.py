"""The helpers the paper authors' programs call: ``tokenize``, ``spacy_parse``,
``align_tokens_to_spacy``, ``align_spacy_to_tokens`` and ``embedding_similarity``.

Their newest library defines these beside its programs; hundreds of programs in their
earlier libraries call them without defining them (some with fewer arguments, e.g.
``embedding_similarity(tokens, i, j)`` or ``align_spacy_to_tokens(sentence)``). Every
program's namespace gets them here, with the same meaning; the tokenizer argument may be
left out (the program's own tokenizer is used) and a program's own definitions win.

``embedding_similarity`` reads the model's input embeddings from the text being explained
(``Sentence.token_similarity``): the sandbox never loads a model.
"""

from __future__ import annotations

from attnprog.errors import ProgramError

HELPER_NAMES = ("tokenize", "spacy_parse", "align_tokens_to_spacy", "align_spacy_to_tokens",
                "embedding_similarity")
SPACY_HELPERS = ("spacy_parse", "align_tokens_to_spacy", "align_spacy_to_tokens")
_pipeline = None  # the full English spaCy pipeline, loaded once per process


def english_pipeline():
    """spaCy's English pipeline, as ``spacy.load("en_core_web_sm")`` gives it (in a sandbox
    worker, the preloaded one with every corpus text already parsed)."""
    global _pipeline
    if _pipeline is None:
        import spacy

        from attnprog.synth.features import _PIPELINE_NAMES

        for name in ("en_core_web_sm", *_PIPELINE_NAMES):
            try:
                _pipeline = spacy.load(name)
                break
            except (OSError, ImportError):
                continue
        else:
            raise ProgramError("spacy_parse needs an English spaCy pipeline: "
                               "python -m spacy download en_core_web_sm")
    return _pipeline


class PaperHelpers:
    """The helpers of one compiled program, bound to the text and tokenizer of each call."""

    def __init__(self) -> None:
        self.sentence = None  # the Sentence being explained
        self.tokenizer = None  # what the program was handed

    def bind(self, sentence, tokenizer) -> None:
        self.sentence, self.tokenizer = sentence, tokenizer

    def namespace(self) -> dict:
        """{helper name: function} to put in a program's globals."""
        return {name: getattr(self, name) for name in HELPER_NAMES}

    def tokenize(self, sentence: str, tokenizer=None) -> list[str]:
        """The model's tokens of ``sentence`` as token strings, special tokens included."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        ids = tokenizer(sentence)["input_ids"]
        return list(tokenizer.convert_ids_to_tokens(list(ids)))

    def spacy_parse(self, sentence: str):
        """spaCy's Doc of ``sentence`` (POS, dependencies, lemmas, entities)."""
        return english_pipeline()(sentence)

    def align_tokens_to_spacy(self, sentence: str, tokens=None, tokenizer=None) -> list[list[int]]:
        """For each model token, the indices of the spaCy tokens its characters overlap."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        tokens = tokens if tokens is not None else self.tokenize(sentence, tokenizer)
        doc = self.spacy_parse(sentence)
        spans = tokenizer(sentence, return_offsets_mapping=True)["offset_mapping"]
        out = [[k for k, w in enumerate(doc) if w.idx < end and w.idx + len(w.text) > start]
               for start, end in list(spans)[: len(tokens)]]
        return out + [[] for _ in range(len(tokens) - len(out))]

    def align_spacy_to_tokens(self, sentence: str, tokens=None, tokenizer=None) -> list[list[int]]:
        """For each spaCy token, the indices of the model tokens that overlap it."""
        forward = self.align_tokens_to_spacy(sentence, tokens, tokenizer)
        out: list[list[int]] = [[] for _ in self.spacy_parse(sentence)]
        for t, words in enumerate(forward):
            for w in words:
                if w < len(out):
                    out[w].append(t)
        return out

    def embedding_similarity(self, tokens, i: int, j: int, tokenizer=None) -> float:
        """Cosine between the model's input embeddings of ``tokens[i]`` and ``tokens[j]``
        (token strings, as ``tokenize`` gives them); 0.0 when either is not a token."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        try:
            a, b = (tokenizer.convert_tokens_to_ids(tokens[k]) for k in (i, j))
        except (IndexError, TypeError, KeyError):
            return 0.0
        s = self.sentence
        where = {token_id: at for at, token_id in reversed(list(enumerate(s.ids)))}
        for token_id, k in ((a, i), (b, j)):
            if token_id not in where:
                raise ProgramError(
                    f"embedding_similarity knows the tokens of the text being explained only; "
                    f"{tokens[k]!r} is not one of them")
        return float(s.embedding_similarity(where[a], where[b]))
