"""Program outputs on a corpus: the one entry point the engine calls.

Cached outputs are reused; generator candidates go to the generator's vectorised
evaluator (recomputed each time: cheaper than reading them back); everything else runs in
the sandbox, and its outputs are cached. The sandbox's
workers stay up between calls (the engine evaluates batch after batch) and stop at exit.
"""

from __future__ import annotations

import atexit
from collections.abc import Sequence

import numpy as np

from attnprog.errors import CorpusError
from attnprog.layout import causal_offsets
from attnprog.synth.features import Sentence, attach_syntax
from attnprog.synth.program import Program
from attnprog.synth.runtime.cache import OutputCache
from attnprog.synth.runtime.cache import corpus_hash as hash_corpus
from attnprog.synth.runtime.outputs import ProgramOutputs


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
    stream: bool = False,
) -> ProgramOutputs | StreamedOutputs:
    """Normalised outputs of every program on every text, packed like the AttentionStore.

    ``values`` is 0 and ``failed`` True where a program failed on a text; ``reasons``
    holds each program's first failure. ``corpus_hash`` defaults to a hash of the texts
    and token ids; ``tokenizer_id`` names the tokenizer in cache keys. With ``stream=True``
    generator outputs are computed only when their rows are read (:class:`StreamedOutputs`),
    so a pool of any size fits in memory.
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
    unique = list({p.hash: p for p in programs}.values())  # identical programs run once
    _, others = _split_generated(unique)

    # sandboxed programs run now (or come from the cache); generator programs are recomputed
    # from their specs when read, which is faster than reading gigabytes back from disk
    cache = OutputCache(cache_dir) if use_cache else None
    sandboxed, todo = {}, []
    n_cells = int(offsets[-1])
    for program in others:
        hit = cache.get(program.hash, corpus, tokenizer_id, n_cells, len(sentences)) if cache else None
        if hit is None:
            todo.append(program)
        else:
            sandboxed[program.hash] = (hit.values, hit.failed, hit.reason)
    for program, values, failed, reason in _evaluate_in_sandbox(todo, sentences, workers, timeout,
                                                                memory_mb, progress):
        sandboxed[program.hash] = (values, failed, reason)
        if cache is not None:
            cache.put(program.hash, corpus, tokenizer_id, values, failed, reason)

    streamed = StreamedOutputs(programs, sentences, offsets, sandboxed, corpus)
    return streamed if stream else streamed.select(range(len(programs)))


class StreamedOutputs:
    """Program outputs whose generator rows are computed when read, chunk by chunk.

    Has the interface ranking uses: ``programs``, ``n_programs``, ``offsets``, ``failed [P, S]``,
    ``reasons``, ``corpus_hash``, ``rows(start, stop)`` and ``select(indices)``.
    """

    def __init__(self, programs, sentences, offsets, sandboxed: dict, corpus_hash: str):
        self.programs, self.sentences, self.offsets = programs, sentences, offsets
        self.corpus_hash = corpus_hash
        self._sandboxed = sandboxed  # program hash -> (values [C], failed [S], reason)
        self.failed = np.zeros((len(programs), len(sentences)), dtype=bool)
        self.reasons = [""] * len(programs)
        for row, program in enumerate(programs):
            if program.hash in sandboxed:
                _, self.failed[row], self.reasons[row] = sandboxed[program.hash]

    @property
    def n_programs(self) -> int:
        return len(self.programs)

    def rows(self, start: int, stop: int, chunk: int = 1024) -> np.ndarray:
        """Values of programs ``start:stop``: [stop - start, C] float32."""
        return self._values(range(start, min(stop, self.n_programs)), chunk)

    def select(self, indices) -> ProgramOutputs:
        """Dense :class:`ProgramOutputs` of the programs at ``indices``."""
        indices = [int(i) for i in indices]
        return ProgramOutputs(
            programs=[self.programs[i] for i in indices],
            values=self._values(indices),
            failed=self.failed[indices],
            offsets=self.offsets,
            reasons=[self.reasons[i] for i in indices],
            corpus_hash=self.corpus_hash,
        )

    def _values(self, indices, chunk: int = 1024) -> np.ndarray:
        values = np.empty((len(indices), int(self.offsets[-1])), dtype=np.float32)
        generated = []  # (position in values, program)
        for position, index in enumerate(indices):
            program = self.programs[index]
            if program.hash in self._sandboxed:
                values[position] = self._sandboxed[program.hash][0]
            else:
                generated.append((position, program))
        for start in range(0, len(generated), chunk):  # bounded copies of generator output
            part = generated[start : start + chunk]
            mixed = _generator_module().evaluate_generated([p for _, p in part], self.sentences)
            values[[position for position, _ in part]] = mixed
        return values


def _needs_syntax(programs: list[Program], sentences: list[Sentence]) -> bool:
    missing = any(not s.has_syntax for s in sentences)
    return missing and any(".pos" in p.source or "dep_head" in p.source for p in programs)


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
        from attnprog.synth.generator import specs as generator
    except ImportError:
        return None
    return generator


def _evaluate_in_sandbox(programs, sentences, workers, timeout, memory_mb, progress) -> list:
    if not programs:
        return []
    from attnprog.synth.runtime.sandbox import uses_spacy

    box = shared_sandbox(workers, timeout, memory_mb, uses_spacy(programs))
    results = box.run(programs, sentences, progress=progress)
    return [(p, r.values, r.failed, r.reason) for p, r in zip(programs, results, strict=True)]


_shared: dict[tuple, object] = {}


def shared_sandbox(workers: int | None, timeout: float, memory_mb: float, spacy: bool):
    """The process-wide sandbox for these settings (one pool at a time, stopped at exit)."""
    from attnprog.synth.runtime.sandbox import Sandbox

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
