"""Program matrices on new texts, each program by the path its origin allows.

attnprog's own programs run in this process, without the sandbox: fitted programs and
generator programs are computed from the data their source is regenerated from (never by
running the source), and the golden library's native programs run as the trusted code they
are. Everything else (LLM programs, paper-form programs, edited ones) goes through the
sandbox and its output cache (``synth.runtime.evaluate``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from attnprog.layout import causal_offsets

FITTED, GENERATOR, GOLDEN, SANDBOX = "fitted (in-process)", "generator (in-process)", \
    "golden (in-process)", "sandbox (output cache)"


@lru_cache(maxsize=1)
def _golden_native() -> frozenset[str]:
    """Hashes of the golden library's native programs (our code, trusted as written)."""
    from attnprog.synth.generator.golden import golden_programs

    return frozenset(p.hash for p in golden_programs() if p.provenance.get("form") == "native")


def program_path(program) -> str:
    """How ``program``'s rows are computed: FITTED, GENERATOR, GOLDEN or SANDBOX."""
    from attnprog.synth.fitted import is_fitted
    from attnprog.synth.generator.specs import is_generated

    if is_fitted(program):
        return FITTED
    if is_generated(program):
        return GENERATOR
    if program.hash in _golden_native():
        return GOLDEN
    return SANDBOX


def program_rows(programs: Sequence, sentences: Sequence, tokenizer=None,
                 paths: Sequence[str] | None = None) -> np.ndarray:
    """Normalised outputs of ``programs`` on ``sentences``, packed: [programs, cells] float32.

    Each program takes its ``program_path``; a program that fails on a text gives zeros there
    (the replacement turns such rows one-hot on position 0, as the sweep does).
    """
    from attnprog.synth.features import attach_syntax
    from attnprog.synth.runtime.evaluate import _reads_syntax

    programs, sentences = list(programs), list(sentences)
    paths = [program_path(p) for p in programs] if paths is None else list(paths)
    if any(not s.has_syntax for s in sentences) and any(map(_reads_syntax, programs)):
        attach_syntax(sentences)  # causal tags, as evaluate_programs gives them
    offsets = causal_offsets([s.n for s in sentences])
    values = np.zeros((len(programs), int(offsets[-1])), dtype=np.float32)
    for path, run in ((FITTED, _fitted), (GENERATOR, _generated), (GOLDEN, _golden),
                      (SANDBOX, _sandboxed)):
        rows = [k for k, p in enumerate(paths) if p == path]
        if rows:
            values[rows] = run([programs[k] for k in rows], sentences, tokenizer)
    return values


def _fitted(programs, sentences, tokenizer) -> np.ndarray:
    from attnprog.synth.fitted import evaluate_fitted

    return evaluate_fitted(programs, sentences)


def _generated(programs, sentences, tokenizer) -> np.ndarray:
    from attnprog.synth.generator.specs import evaluate_generated

    return evaluate_generated(programs, sentences)


def _golden(programs, sentences, tokenizer) -> np.ndarray:
    from attnprog.synth.runtime.execute import run_trusted

    return np.stack([r.values for r in run_trusted(programs, sentences, tokenizer)])


def _sandboxed(programs, sentences, tokenizer) -> np.ndarray:
    from attnprog.synth.runtime.evaluate import evaluate_programs

    return evaluate_programs(programs, sentences, tokenizer=tokenizer, progress=False).values
