"""The paper's program form, ``f(sentence: str, tokenizer) -> (label, matrix)``, run on a Sentence.

A published program calls a Hugging Face tokenizer on the sentence. Inside the sandbox
there is no real tokenizer, so :class:`SentenceTokenizer` stands in for it: it knows
only the Sentence being explained and returns exactly the tokens the model saw
(special tokens included), so the matrix a program builds is n x n.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from attnprog.errors import ProgramError
from attnprog.synth.features import Sentence


class Encoding(dict):
    """What the tokenizer returns: a dict whose keys are also attributes (``enc.input_ids``)."""

    def __getattr__(self, key: str):
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(key) from err

    def word_ids(self, batch_index: int = 0) -> list[int]:
        return list(self["_word_ids"])

    def tokens(self, batch_index: int = 0) -> list[str]:
        return list(self["_tokens"])


class SentenceTokenizer:
    """A tokenizer shim that tokenises one sentence exactly as the model did."""

    is_fast = True
    bos_token = eos_token = pad_token = unk_token = None

    def __init__(self, sentence: Sentence) -> None:
        self._s = sentence
        self._piece = dict(zip(sentence.ids, sentence.tokens, strict=True))
        self._id = {t: i for i, t in self._piece.items()}

    def _check(self, text) -> bool:
        """Accept the sentence itself or a one-item list of it; return True when batched."""
        batched = isinstance(text, (list, tuple))
        single = text[0] if batched and len(text) == 1 else text
        if single != self._s.text:
            raise ProgramError(
                "the tokenizer given to a paper-form program only tokenises the sentence "
                "being explained; call it on that sentence, not on a part of it or another text"
            )
        return batched

    def __call__(self, text, return_tensors=None, return_offsets_mapping=False, **_) -> Encoding:
        batched = self._check(text) or return_tensors is not None

        def shaped(values):
            return np.asarray([values]) if return_tensors is not None else (
                [list(values)] if batched else list(values)
            )

        enc = Encoding(
            input_ids=shaped(self._s.ids),
            attention_mask=shaped([1] * self._s.n),
            _word_ids=list(self._s.word_ids),
            _tokens=list(self._s.tokens),
        )
        if return_offsets_mapping:
            enc["offset_mapping"] = shaped([tuple(o) for o in self._s.offsets])
        return enc

    def encode(self, text, **_) -> list[int]:
        self._check(text)
        return list(self._s.ids)

    def tokenize(self, text, **_) -> list[str]:
        self._check(text)
        return list(self._s.tokens)

    def convert_ids_to_tokens(self, ids, **_):
        if isinstance(ids, (int, np.integer)):
            return self._piece.get(int(ids), "")
        return [self._piece.get(int(i), "") for i in np.asarray(ids).reshape(-1)]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._id.get(tokens, -1)
        return [self._id.get(t, -1) for t in tokens]

    def convert_tokens_to_string(self, tokens) -> str:
        return "".join(tokens)

    def decode(self, ids, **_) -> str:
        return "".join(self.convert_ids_to_tokens(np.atleast_1d(np.asarray(ids)).tolist()))

    def batch_decode(self, sequences, **_) -> list[str]:
        return [self.decode(ids) for ids in sequences]

    def __len__(self) -> int:
        return max(self._s.ids, default=-1) + 1


def adapt_paper_form(function: Callable) -> Callable[[Sentence], object]:
    """Wrap ``f(sentence: str, tokenizer) -> (label, matrix)`` as ``g(s) -> matrix``."""

    def native(s: Sentence):
        result = function(s.text, SentenceTokenizer(s))
        if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], str):
            return result[1]
        return result

    native.__name__ = getattr(function, "__name__", "program")
    return native
