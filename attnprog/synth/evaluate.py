"""Program outputs on a corpus: the one entry point the engine calls.

Cached outputs are reused; generator candidates go to the generator's vectorised
evaluator (recomputed each time: cheaper than reading them back); everything else runs in
the sandbox, and its outputs are cached. The sandbox's
workers stay up between calls (the engine evaluates batch after batch) and stop at exit.
"""

from __future__ import annotations

import atexit
import itertools
from collections.abc import Sequence

import numpy as np

from attnprog.errors import CorpusError
from attnprog.layout import causal_offsets
from attnprog.synth.cache import OutputCache
from attnprog.synth.cache import corpus_hash as hash_corpus
from attnprog.synth.features import Sentence, attach_syntax
from attnprog.synth.outputs import ProgramOutputs
from attnprog.synth.program import Program


def evaluate_programs(
    programs: Sequence[Program],
    sentences: Sequence[Sentence],
    *,
    corpus_hash: str | None = None,
    tokenizer_id: str = "",
    cache_dir=None,
    workers: int | None = None,
    timeout: float = 2.0,
    progress: bool = True,
    memory_mb: float = 1024,
    use_cache: bool = True,
) -> ProgramOutputs:
    """Normalised outputs of every program on every text, packed like the AttentionStore.

    ``values`` is 0 and ``failed`` True where a program failed on a text; ``reasons``
    holds each program's first failure. ``corpus_hash`` defaults to a hash of the texts
    and token ids; ``tokenizer_id`` names the tokenizer in cache keys.
    """
    programs, sentences = list(programs), list(sentences)
    if not sentences:
        raise CorpusError("no texts to evaluate programs on: give at least one tokenised text")
    corpus = corpus_hash or hash_corpus(sentences)
    if _needs_syntax(programs, sentences):
        attach_syntax(sentences)  # no-op without spaCy; such programs then see pos=None
    if all(s.has_syntax for s in sentences):
        tokenizer_id += "+syntax"  # outputs with and without POS tags are cached apart
    offsets = causal_offsets([s.n for s in sentences])
    outputs = ProgramOutputs(
        programs=programs,
        values=np.zeros((len(programs), int(offsets[-1])), dtype=np.float32),
        failed=np.zeros((len(programs), len(sentences)), dtype=bool),
        offsets=offsets,
        reasons=[""] * len(programs),
        corpus_hash=corpus,
    )
    cache = OutputCache(cache_dir) if use_cache else None
    rows_by_hash: dict[str, list[int]] = {}
    for row, program in enumerate(programs):
        rows_by_hash.setdefault(program.hash, []).append(row)  # identical programs run once
    generated, others = _split_generated([programs[rows[0]] for rows in rows_by_hash.values()])
    # generator outputs are recomputed (faster than reading gigabytes back); sandboxed ones are cached
    todo = _fill_from_cache(outputs, {p.hash: rows_by_hash[p.hash] for p in others}, cache, corpus,
                            tokenizer_id)
    computed = _evaluate_in_sandbox([programs[rows[0]] for rows in todo], sentences, workers, timeout,
                                    memory_mb, progress)
    if cache is not None:
        for program, values, failed, reason in computed:
            cache.put(program.hash, corpus, tokenizer_id, values, failed, reason)
    results = itertools.chain(computed, _evaluate_generated(generated, sentences))
    for program, values, failed, reason in results:
        for row in rows_by_hash[program.hash]:
            outputs.values[row] = values
            outputs.failed[row] = failed
            outputs.reasons[row] = reason
    return outputs


def _needs_syntax(programs: list[Program], sentences: list[Sentence]) -> bool:
    missing = any(not s.has_syntax for s in sentences)
    return missing and any(".pos" in p.source or "dep_head" in p.source for p in programs)


def _fill_from_cache(outputs, rows_by_hash, cache, corpus, tokenizer_id) -> list[list[int]]:
    """Copy cached outputs in; return the row groups still to compute."""
    todo = []
    n_cells, n_texts = outputs.values.shape[1], outputs.failed.shape[1]
    for program_hash, rows in rows_by_hash.items():
        hit = cache.get(program_hash, corpus, tokenizer_id, n_cells, n_texts) if cache else None
        if hit is None:
            todo.append(rows)
            continue
        for row in rows:
            outputs.values[row] = hit.values
            outputs.failed[row] = hit.failed
            outputs.reasons[row] = hit.reason
    return todo


def _split_generated(programs: list[Program]) -> tuple[list[Program], list[Program]]:
    """(programs the generator evaluates vectorised, the rest)."""
    generator = _generator_module()
    is_generated = getattr(generator, "is_generated", None)
    if is_generated is None or not hasattr(generator, "evaluate_generated"):
        return [], programs
    generated = [p for p in programs if is_generated(p)]
    return generated, [p for p in programs if not is_generated(p)]


def _generator_module():
    """The built-in generator module, or None where it is missing."""
    try:
        from attnprog.synth import generator
    except ImportError:
        return None
    return generator


def _evaluate_generated(programs: list[Program], sentences: list[Sentence], chunk: int = 1024):
    """Yield (program, values, failed, reason) chunk by chunk, so the copy stays small."""
    no_failures = np.zeros(len(sentences), dtype=bool)
    for start in range(0, len(programs), chunk):
        part = programs[start : start + chunk]
        values = np.asarray(_generator_module().evaluate_generated(part, sentences), dtype=np.float32)
        for program, row in zip(part, values, strict=True):
            yield program, row, no_failures, ""


def _evaluate_in_sandbox(programs, sentences, workers, timeout, memory_mb, progress) -> list:
    if not programs:
        return []
    from attnprog.synth.sandbox import uses_spacy

    box = shared_sandbox(workers, timeout, memory_mb, uses_spacy(programs))
    results = box.run(programs, sentences, progress=progress)
    return [(p, r.values, r.failed, r.reason) for p, r in zip(programs, results, strict=True)]


_shared: dict[tuple, object] = {}


def shared_sandbox(workers: int | None, timeout: float, memory_mb: float, spacy: bool):
    """The process-wide sandbox for these settings (one pool at a time, stopped at exit)."""
    from attnprog.synth.sandbox import Sandbox

    key = (workers, float(timeout), float(memory_mb), spacy)
    if key not in _shared:
        close_shared_sandbox()
        _shared[key] = Sandbox(workers, timeout, memory_mb, spacy=spacy)
    return _shared[key]


@atexit.register
def close_shared_sandbox() -> None:
    """Stop the shared sandbox's workers (a later evaluation starts new ones)."""
    for box in _shared.values():
        box.close()
    _shared.clear()
