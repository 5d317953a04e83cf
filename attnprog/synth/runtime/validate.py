"""Sandboxed validation: a program passes when its source passes the static check and every
probe text gives a finite n x n matrix whose normalised rows sum to 1."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attnprog.errors import ProgramError
from attnprog.layout import unpack
from attnprog.synth.features import attach_syntax, probe_sentences
from attnprog.synth.policy import check_source, entry_point
from attnprog.synth.program import Program
from attnprog.synth.runtime.evaluate import _reads_syntax
from attnprog.synth.runtime.execute import escape
from attnprog.synth.runtime.paper_form import library_programs, read_source
from attnprog.synth.runtime.sandbox import Sandbox, uses_spacy

_ROW_SUM_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ValidationResult:
    """Whether a program passed validation, and if not, why (in words an LLM can act on)."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def check_file(path, name: str | None = None, unsafe: bool = False, *, tokenizer=None,
               probes=None, model=None) -> list[tuple[str, str]]:
    """Validate the programs of a file: one program (entry point ``name`` or inferred), or
    a library in the paper's layout (many ``f(sentence, tokenizer)`` beside helpers).
    ``tokenizer``: the model's, for paper-form programs, with ``probes`` tokenised by it; or
    ``model``, called for (tokenizer, probes) only when some program passes the static check.
    Returns (entry point, "" or the escaped reason) per program."""
    source = read_source(path)
    library = library_programs(source, str(path)) if name is None else []
    if len(library) > 1:
        programs = library
    else:
        entry = entry_point(source, name or "program")
        if entry is None:
            raise ProgramError(f"{path}: no program function found; define `def program(s)`")
        if name is not None and entry != name:  # not another function in its place
            raise ProgramError(f"{path} has no top-level function {name!r}: pass the name of "
                               f"its program's function (e.g. --name {entry})")
        programs = [Program(source=source, name=entry, family="custom")]
    if model is not None and not all(check_source(p) for p in programs):  # some will run
        tokenizer, probes = model()
    results = validate_many(programs, probes=probes, unsafe=unsafe, tokenizer=tokenizer)
    return [(p.name, escape(r.reason)) for p, r in zip(programs, results, strict=True)]


def validate(program: Program, probes=None, sandbox=None) -> ValidationResult:
    """Check ``program``'s source, then run it in the sandbox on three probe texts.

    It passes when the source is well-formed and every probe gives a finite n x n matrix
    whose normalised rows sum to 1. ``sandbox``: an open Sandbox to reuse.
    """
    return validate_many([program], probes=probes, sandbox=sandbox)[0]


def validate_many(
    programs: Sequence[Program], probes=None, sandbox=None, *, unsafe: bool = False,
    tokenizer=None,
) -> list[ValidationResult]:
    """:func:`validate` for many programs with one sandbox run. ``unsafe``: run without OS
    isolation where it is unavailable; ``tokenizer``: the model's, for paper-form programs
    (both only for the sandbox made here, not a given one)."""
    probes = list(probes) if probes is not None else probe_sentences()
    results: list[ValidationResult | None] = [None] * len(programs)
    to_run = []
    for i, program in enumerate(programs):
        problem = check_source(program)
        if problem:
            results[i] = ValidationResult(False, problem)
        else:
            to_run.append(i)
    if to_run:
        if any(_reads_syntax(programs[i]) for i in to_run):  # as evaluate_programs tags texts
            attach_syntax([s for s in probes if not s.has_syntax])
        runs = _run_probes([programs[i] for i in to_run], probes, sandbox, unsafe, tokenizer)
        for i, run in zip(to_run, runs, strict=True):
            results[i] = _judge_probe_run(run, probes)
    return results


def _run_probes(programs, probes, sandbox, unsafe: bool, tokenizer=None):
    if sandbox is not None:
        return sandbox.run(programs, probes, progress=False)
    workers = 1 if len(programs) < 8 else None
    with Sandbox(workers, progress=False, spacy=uses_spacy(programs), unsafe=unsafe,
                 tokenizer=tokenizer) as box:
        return box.run(programs, probes)


def _judge_probe_run(run, probes) -> ValidationResult:
    if run.failed.any():
        first = int(np.argmax(run.failed))
        reason = (run.reason or "failed").removesuffix(f" on text {first}")
        return ValidationResult(False, f"on probe text {first} ({probes[first].text!r}): {reason}")
    start = 0
    for s in probes:
        cells = run.values[start : start + s.n * (s.n + 1) // 2]
        start += len(cells)
        if not np.allclose(unpack(cells, s.n).sum(axis=1), 1.0, atol=_ROW_SUM_TOLERANCE):
            return ValidationResult(False, "rows do not sum to 1 after normalisation")
    return ValidationResult(True)
