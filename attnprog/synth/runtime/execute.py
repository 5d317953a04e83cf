"""Running one program on one text: compile, call, check the output, normalise and pack it.

The sandbox workers and the trusted in-process path both use these functions, so a
trusted program gives bit-identical results either way.
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from attnprog.errors import ProgramError
from attnprog.layout import causal_offsets
from attnprog.synth.features import Sentence
from attnprog.synth.policy import entry_point
from attnprog.synth.program import Program, normalise_packed
from attnprog.synth.runtime.paper_form import adapt_paper_form
from attnprog.synth.runtime.paper_helpers import PaperHelpers

_MAX_REASON = 300


@dataclass
class ProgramResult:
    """One program on S texts: packed normalised outputs [C] float32 (0 where failed),
    failed [S] bool and the first failure reason ("" when none)."""

    values: np.ndarray
    failed: np.ndarray
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed.any()


class OutputRejected(Exception):
    """A program's return value is not a usable n x n matrix."""


def filename(name: str) -> str:
    """The pseudo file name a program's code objects carry (used to find its line numbers)."""
    return f"<program {name}>"


def call_form(function: Callable) -> str:
    """'native' for ``f(s)``, 'paper' for ``f(sentence, tokenizer)``; ProgramError otherwise."""
    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError) as err:
        raise ProgramError(f"cannot read the program's signature ({err})") from err
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) == 2:
        return "paper"
    if len(required) == 1 or (not required and positional):
        return "native"
    raise ProgramError(
        f"the function takes {len(required)} required arguments; write `def program(s)` "
        "(s is a Sentence) or the paper's form `def program(sentence: str, tokenizer)`"
    )


def escape(text: str) -> str:
    """``text`` with control characters written as escapes (a reason cannot move the cursor,
    clear the screen or fake a line of output)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def compile_program(source: str, name: str, tokenizer=None) -> Callable[[Sentence], object]:
    """Execute ``source`` and return its entry point as ``f(s) -> matrix``: the function
    ``name``, else the one :func:`~attnprog.synth.policy.entry_point` infers. Paper-form
    functions get ``tokenizer`` (the model's, when given) or a per-sentence stand-in, and
    every program the paper authors' helpers (:mod:`.paper_helpers`) unless it defines them.

    Raises ProgramError when the source does not compile or defines no such function.
    """
    helpers = PaperHelpers()
    namespace: dict = {"__name__": "attnprog_program", "np": np, **helpers.namespace()}
    try:
        code = compile(source, filename(name), "exec")
    except SyntaxError as err:
        raise ProgramError(f"syntax error on line {err.lineno}: {err.msg}; fix the syntax") from err
    try:
        exec(code, namespace)
    except Exception as err:
        raise ProgramError(f"defining the program raised {describe_exception(err, name)}") from err
    function = namespace.get(name)
    if not callable(function):
        inferred = entry_point(source, name)
        function = namespace.get(inferred) if inferred else None
    if not callable(function):
        raise ProgramError(f"the source defines no function named `{name}`; define `def {name}(s)`")
    if call_form(function) == "paper":
        return adapt_paper_form(function, tokenizer, helpers)
    return function


def check_output(result, n: int) -> np.ndarray:
    """Normalised, packed float32 cells of a program's return value; OutputRejected if unusable."""
    if isinstance(result, np.ndarray):
        matrix = result
    elif isinstance(result, (list, tuple)) or hasattr(result, "__array__"):
        try:
            matrix = np.asarray(result, dtype=np.float64)
        except (ValueError, TypeError) as err:
            raise OutputRejected(
                f"returned a {type(result).__name__} that is not a numeric {n} x {n} array"
            ) from err
    else:
        raise OutputRejected(f"returned {type(result).__name__}, expected an {n} x {n} array")
    if matrix.shape != (n, n):
        raise OutputRejected(f"shape {tuple(matrix.shape)}, expected ({n}, {n})")
    if matrix.dtype.kind not in "biuf":
        raise OutputRejected(f"dtype {matrix.dtype}, expected numbers")
    if not np.isfinite(matrix).all():
        raise OutputRejected("non-finite values (NaN or inf) in the output")
    return normalise_packed(matrix).astype(np.float32)


def describe_exception(err: BaseException, name: str) -> str:
    """``ValueError: ... (line 7)``: the exception and the program line that raised it."""
    line = None
    for frame, lineno in traceback.walk_tb(err.__traceback__):
        if frame.f_code.co_filename == filename(name):
            line = lineno
    where = f" (line {line})" if line else ""
    message = escape(f"{type(err).__name__}: {err}")
    if len(message) > _MAX_REASON:
        message = message[:_MAX_REASON] + "…"
    return message + where


def call_program(function: Callable, s: Sentence, name: str) -> tuple[np.ndarray | None, str]:
    """Run one program on one text: (packed cells, "") or (None, reason).

    MemoryError and KeyboardInterrupt propagate: the caller decides what they mean.
    """
    try:
        result = function(s.copy())
        return check_output(result, s.n), ""
    except OutputRejected as err:
        return None, escape(str(err))
    except (MemoryError, KeyboardInterrupt):
        raise
    except SystemExit:
        return None, "called sys.exit(); return a matrix instead"
    except Exception as err:
        return None, f"raised {describe_exception(err, name)}{_none_hint(err, s)}"


def _none_hint(err: Exception, s: Sentence) -> str:
    """What to do when a program used an attribute this text leaves None (syntax without spaCy,
    ``token_similarity`` without embeddings); "" for any other error."""
    if not isinstance(err, (TypeError, AttributeError)) or "NoneType" not in str(err):
        return ""
    if s.pos is None:
        return ("; s.pos, s.dep_head and s.dependents are None here (no spaCy English pipeline: "
                "pip install 'attnprog[spacy]'), so test s.has_syntax before reading them")
    if s.token_similarity is None:
        return ("; s.token_similarity is None here (no token embeddings): test s.has_embeddings "
                "first, or run it from a store or with `attnprog check --model`")
    return ""


def run_trusted(
    programs: Sequence[Program], sentences: Sequence[Sentence], tokenizer=None
) -> list[ProgramResult]:
    """Run trusted programs in this process, one text at a time (no sandbox, no timeout).

    For programs whose source you wrote or reviewed (tests, the golden library); the
    sandbox gives the same results for them.
    """
    offsets = causal_offsets([s.n for s in sentences])
    for s in sentences:
        s.warm_features()
    return [_run_one_program(p, sentences, offsets, tokenizer) for p in programs]


def _run_one_program(program: Program, sentences, offsets, tokenizer) -> ProgramResult:
    values = np.zeros(int(offsets[-1]), dtype=np.float32)
    failed = np.ones(len(sentences), dtype=bool)
    try:
        function = compile_program(program.source, program.name, tokenizer)
    except ProgramError as err:
        return ProgramResult(values, failed, str(err))
    reason = ""
    for i, s in enumerate(sentences):
        cells, why = call_program(function, s, program.name)
        if cells is None:
            reason = reason or f"{why} on text {i}"
            continue
        values[offsets[i] : offsets[i + 1]] = cells
        failed[i] = False
    return ProgramResult(values, failed, reason)
