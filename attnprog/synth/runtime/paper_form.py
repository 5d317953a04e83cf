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
from attnprog.synth.causal_syntax import prefix_end
from attnprog.synth.features import Sentence
from attnprog.synth.program import Program


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
    """A stand-in, when no real tokenizer was given, that tokenises one sentence exactly as
    the model did (special tokens: those covering no text)."""

    is_fast = True
    bos_token = eos_token = pad_token = unk_token = cls_token = sep_token = mask_token = None
    bos_token_id = eos_token_id = pad_token_id = unk_token_id = None
    cls_token_id = sep_token_id = mask_token_id = None

    def __init__(self, sentence: Sentence) -> None:
        self._s = sentence
        self._text = paper_text(sentence)
        self._piece = dict(zip(sentence.ids, sentence.tokens, strict=True))
        self._id = {t: i for i, t in self._piece.items()}
        special = [i for i, (a, b) in zip(sentence.ids, sentence.offsets, strict=True) if a == b]
        self.all_special_ids = list(dict.fromkeys(special))
        self.all_special_tokens = [self._piece[i] for i in self.all_special_ids]

    def _check(self, text) -> bool:
        """Accept the sentence itself or a one-item list of it; return True when batched."""
        batched = isinstance(text, (list, tuple))
        single = text[0] if batched and len(text) == 1 else text
        if single not in (self._text, self._s.text):
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


def paper_text(s: Sentence) -> str:
    """The text a paper-form program is handed: ``s.text``, cut after its last token where
    the tokens stop short of the text's end (a text truncated to ``--max-tokens``), so that
    the model's tokenizer gives the n tokens the model saw."""
    end = prefix_end(s.offsets, s.n - 1)
    return s.text[:end] if s.text[end:].strip() else s.text


def adapt_paper_form(function: Callable, tokenizer=None, helpers=None) -> Callable[[Sentence], object]:
    """Wrap ``f(sentence: str, tokenizer) -> (label, matrix)`` as ``g(s) -> matrix``; the
    function gets the text (:func:`paper_text`) and ``tokenizer`` when given, else a
    :class:`SentenceTokenizer`. ``helpers``
    (a :class:`~attnprog.synth.runtime.paper_helpers.PaperHelpers`) is bound to each call."""

    def native(s: Sentence):
        given = tokenizer if tokenizer is not None else SentenceTokenizer(s)
        if helpers is not None:
            helpers.bind(s, given)
        result = function(paper_text(s), given)
        if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], str):
            return result[1]
        return result

    native.__name__ = getattr(function, "__name__", "program")
    return native


# --- the model's own tokenizer, rebuilt inside the sandbox -----------------------------------
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")


def tokenizer_spec(tokenizer) -> dict | None:
    """What rebuilds ``tokenizer`` inside a sandbox worker (a fast Hugging Face tokenizer's
    JSON and special tokens); None when it is not a fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    special = {name: str(getattr(tokenizer, name)) for name in _SPECIAL_NAMES
               if getattr(tokenizer, name, None) is not None}
    extra = [str(t) for t in getattr(tokenizer, "additional_special_tokens", None) or []]
    return {
        "json": backend.to_str(),
        "special": special,
        "additional": extra,
        "model_max_length": int(min(getattr(tokenizer, "model_max_length", 10**6), 10**9)),
        "padding_side": getattr(tokenizer, "padding_side", "right"),
    }


def tokenizer_from_spec(spec: dict):
    """A ``PreTrainedTokenizerFast`` equal to the one :func:`tokenizer_spec` described."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    kwargs = dict(spec["special"])
    if spec.get("additional"):
        kwargs["additional_special_tokens"] = spec["additional"]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(spec["json"]),
        model_max_length=spec.get("model_max_length", 10**6),
        padding_side=spec.get("padding_side", "right"),
        **kwargs,
    )


# --- libraries of programs in the paper's file layout ----------------------------------------
def load_paper_library(path, family: str = "paper") -> list:
    """Programs from a file in the published layout: imports and helper functions, then
    many ``f(sentence, tokenizer)`` programs. Each Program's source is the file's shared
    part (imports, constants, helpers) followed by its own function, unchanged."""
    from pathlib import Path

    path = Path(path)
    return library_programs(read_source(path), path.name, family)


def read_source(path) -> str:
    """A program file's text; ProgramError (one line) when it is missing or not UTF-8."""
    from pathlib import Path

    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ProgramError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    except OSError as err:
        raise ProgramError(f"cannot read {path} ({err.strerror})") from err


def library_programs(text: str, origin: str = "", family: str = "paper") -> list:
    """The paper-form programs in a library file's ``text`` (see :func:`load_paper_library`)."""
    import ast

    try:
        tree = ast.parse(text)
    except SyntaxError as err:  # a null byte has no line
        where = f"{origin}:{err.lineno}" if err.lineno else origin
        raise ProgramError(f"{where}: syntax error ({err.msg})") from err
    except (ValueError, RecursionError, MemoryError) as err:  # nesting too deep for the parser
        raise ProgramError(f"{origin}: the source cannot be parsed ({type(err).__name__}); "
                           "simplify it") from err
    lines = text.splitlines(keepends=True)

    def segment(node) -> str:
        start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        return "".join(lines[start - 1 : node.end_lineno])

    called = {node.func.id for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    shared, entries = [], []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and _is_paper_entry(node, called):
            entries.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.Import, ast.ImportFrom, ast.Assign,
                               ast.AnnAssign, ast.ClassDef)):
            shared.append(segment(node))
    prelude = "".join(part if part.endswith("\n") else part + "\n" for part in shared)
    return [
        Program(source=prelude + "\n" + segment(node), name=node.name, family=family,
                provenance={"library": origin})
        for node in entries
    ]


def _is_paper_entry(node, called: set[str]) -> bool:
    """``f(sentence, tokenizer)`` that no other code calls and whose name is public."""
    if node.name.startswith("_") or node.name in called:
        return False
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args]
    return len(names) - len(args.defaults) == 2 and names[:2] == ["sentence", "tokenizer"]
