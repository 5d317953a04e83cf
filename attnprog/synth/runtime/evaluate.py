"""Program outputs on a corpus: the one entry point the engine calls.

Cached outputs are reused; generator candidates go to the generator's vectorised
evaluator (recomputed each time: cheaper than reading them back); everything else runs in
the sandbox, and its outputs are cached. The sandbox's
workers stay up between calls (the engine evaluates batch after batch) and stop at exit.
"""

from __future__ import annotations

import ast
import atexit
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from attnprog.errors import CorpusError
from attnprog.layout import causal_offsets, text_cells
from attnprog.synth.features import Sentence, attach_syntax
from attnprog.synth.policy import check_source
from attnprog.synth.program import Program
from attnprog.synth.runtime.cache import OutputCache
from attnprog.synth.runtime.cache import corpus_hash as hash_corpus
from attnprog.synth.runtime.outputs import ProgramOutputs
from attnprog.synth.runtime.sandbox import is_paper_program


def evaluate_programs(
    programs: Sequence[Program],
    sentences: Sequence[Sentence],
    *,
    corpus_hash: str | None = None,
    tokenizer_id: str = "",
    cache_dir=None,
    workers: int | None = None,
    timeout: float = 5.0,
    progress: bool = True,
    memory_mb: float = 1024,
    use_cache: bool = True,
    stream: bool = False,
    tokenizer=None,
    helpers: dict[str, str] | None = None,
    check: bool = True,
    unsafe: bool = False,
    program_seconds: float | None = None,
) -> ProgramOutputs | StreamedOutputs:
    """Normalised outputs of every program on every text, packed like the AttentionStore.

    ``values`` is 0 and ``failed`` True where a program failed on a text; ``reasons``
    holds each program's first failure. ``corpus_hash`` defaults to a hash of the texts
    and token ids; ``tokenizer_id`` names the tokenizer in cache keys. With ``stream=True``
    generator outputs are computed only when their rows are read (:class:`StreamedOutputs`),
    so a pool of any size fits in memory. ``tokenizer``: the model's tokenizer, handed to
    paper-form programs; ``helpers``: {module name: source} programs may import;
    ``timeout``: seconds per call; ``program_seconds``: each program's time budget over all
    texts (default 60 s + 4 s per text). Programs that fail the
    static check (``check``) fail on every text with its reason and are not run. Each
    program's outputs are cached as soon as it finishes, so an interrupted call resumes.
    """
    programs, sentences = list(programs), list(sentences)
    corpus, syntax_mode = _prepare_texts(programs, sentences, corpus_hash)
    if tokenizer is not None:
        tokenizer_id = tokenizer_id or str(getattr(tokenizer, "name_or_path", ""))
    offsets = causal_offsets([s.n for s in sentences])
    unique = list({p.hash: p for p in programs}.values())  # identical programs run once
    _, others = _split_generated(unique)

    # sandboxed programs run now (or come from the cache); generator programs are recomputed
    # from their specs when read, which is faster than reading gigabytes back from disk
    reads_meaning = any("similarity" in p.source for p in others)  # hash n x n only then
    reads_syntax = syntax_mode and any(_reads_syntax(p) for p in others)  # hash the tags only then
    with_syntax = f"{syntax_mode}-{syntax_hash(sentences)}" if reads_syntax else ""
    sandboxed = _Sandboxed(OutputCache(cache_dir) if use_cache else None, corpus, tokenizer_id,
                           with_syntax, meaning_hash(sentences) if reads_meaning else "",
                           "model" if tokenizer is not None else "stand-in")
    todo = sandboxed.refuse_or_reuse(others, sentences, int(offsets[-1]), helpers, check)
    options = {"workers": workers, "timeout": timeout, "memory_mb": memory_mb,
               "tokenizer": tokenizer, "helpers": helpers, "unsafe": unsafe,
               "program_seconds": program_seconds}
    _evaluate_in_sandbox(todo, sentences, options, progress, sandboxed.keep)

    streamed = StreamedOutputs(programs, sentences, offsets, sandboxed.outputs, corpus)
    return streamed if stream else streamed.select(range(len(programs)))


def _prepare_texts(programs: list[Program], sentences: list[Sentence],
                   corpus_hash: str | None) -> tuple[str, str]:
    """(the corpus hash, how every text's POS tags were made: "causal", "full-text" or "" when
    some text has none); tags the texts (causally) if a program reads them."""
    if not sentences:
        raise CorpusError("no texts to evaluate programs on: give at least one tokenised text")
    corpus = corpus_hash or hash_corpus(sentences)
    if _needs_syntax(programs, sentences):
        attach_syntax(sentences)  # no-op without spaCy; such programs then see pos=None
    modes = {s.syntax_mode or "full-text" if s.has_syntax else "" for s in sentences}
    return corpus, modes.pop() if len(modes) == 1 else ""


@dataclass
class _Sandboxed:
    """Outputs of the programs the sandbox runs, {hash: (values, failed, reason)}, read from
    and written to the cache (when there is one)."""

    cache: OutputCache | None
    corpus: str
    tokenizer_id: str
    with_syntax: str  # syntax_mode and syntax_hash ("" without syntax or no program reading it)
    meaning: str = ""  # meaning_hash of the texts' token similarities
    paper_tokenizer: str = ""  # what paper-form programs are handed: "model" or "stand-in"
    outputs: dict = field(default_factory=dict)

    def refuse_or_reuse(self, programs, sentences, n_cells: int, helpers, check: bool) -> list[Program]:
        """Record the programs the static check refuses or the cache holds; return the rest."""
        todo = []
        for program in programs:
            problem = check_source(program, extra_imports=list(helpers or {})) if check else ""
            if problem:  # refused before running: fails everywhere, with the check's reason
                self.outputs[program.hash] = (np.zeros(n_cells, np.float32),
                                              np.ones(len(sentences), bool), f"refused: {problem}")
                continue
            key = self._key(program)
            hit = (self.cache.get(program.hash, self.corpus, key, n_cells, len(sentences))
                   if self.cache else None)
            if hit is None:
                todo.append(program)
            else:
                self.outputs[program.hash] = (hit.values, hit.failed, hit.reason)
        return todo

    def keep(self, program: Program, values, failed, reason) -> None:
        self.outputs[program.hash] = (values, failed, reason)
        if self.cache is not None:  # written as each program finishes: an interrupted run keeps it
            self.cache.put(program.hash, self.corpus, self._key(program), values, failed, reason)

    def _key(self, program: Program) -> str:
        return _cache_key(program, self.tokenizer_id, self.with_syntax, self.meaning,
                          self.paper_tokenizer)


class StreamedOutputs:
    """Program outputs whose generator rows are computed when read, chunk by chunk.

    Has the interface ranking uses: ``programs``, ``n_programs``, ``offsets``,
    ``failed [programs, texts]``, ``reasons``, ``corpus_hash``, ``rows(start, stop)`` and
    ``select(indices)``.
    """

    def __init__(self, programs, sentences, offsets, sandboxed: dict, corpus_hash: str):
        self.programs, self.sentences, self.offsets = programs, sentences, offsets
        self.corpus_hash = corpus_hash
        self._sandboxed = sandboxed  # program hash -> (values [cells], failed [texts], reason)
        self.failed = np.zeros((len(programs), len(sentences)), dtype=bool)
        self.reasons = [""] * len(programs)
        self._atoms = None  # the generator's AtomCache, made on first use
        for row, program in enumerate(programs):
            if program.hash in sandboxed:
                _, self.failed[row], self.reasons[row] = sandboxed[program.hash]

    @property
    def n_programs(self) -> int:
        return len(self.programs)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_atoms"] = None  # a cache of up to 1 GiB never travels (e.g. to a Ray worker)
        return state

    def rows(self, start: int, stop: int, texts=None, chunk: int = 1024) -> np.ndarray:
        """Values of programs ``start:stop``: [stop - start, cells] float32; with ``texts``,
        only those texts' cells (generator rows are then computed on those texts only)."""
        return self.rows_at(range(start, min(stop, self.n_programs)), texts, chunk)

    def select(self, indices) -> ProgramOutputs:
        """Dense :class:`ProgramOutputs` of the programs at ``indices``."""
        indices = [int(i) for i in indices]
        return ProgramOutputs(
            programs=[self.programs[i] for i in indices],
            values=self.rows_at(indices),
            failed=self.failed[indices],
            offsets=self.offsets,
            reasons=[self.reasons[i] for i in indices],
            corpus_hash=self.corpus_hash,
        )

    def rows_at(self, indices, texts=None, chunk: int = 1024) -> np.ndarray:
        """Values of the programs at ``indices``: [len(indices), cells] float32 (``texts``: as in
        :meth:`rows`)."""
        cells = None if texts is None else text_cells(self.offsets, texts)
        sentences = self.sentences if texts is None else [self.sentences[s] for s in texts]
        values = np.empty((len(indices), int(self.offsets[-1]) if cells is None else len(cells)),
                          dtype=np.float32)
        generated = []  # (position in values, program)
        for position, index in enumerate(indices):
            program = self.programs[index]
            if program.hash in self._sandboxed:
                stored = self._sandboxed[program.hash][0]
                values[position] = stored if cells is None else stored[cells]
            else:
                generated.append((position, program))
        if generated and self._atoms is None:
            from attnprog.synth.generator.mixing import AtomCache

            self._atoms = AtomCache()
        for start in range(0, len(generated), chunk):  # bounded copies of generator output
            part = generated[start : start + chunk]
            mixed = _generator_module().evaluate_generated([p for _, p in part], sentences,
                                                           self._atoms)
            values[[position for position, _ in part]] = mixed
        return values


def _needs_syntax(programs: list[Program], sentences: list[Sentence]) -> bool:
    missing = any(not s.has_syntax for s in sentences)
    return missing and any(_reads_syntax(p) for p in programs)


_SYNTAX_ATTRIBUTES = ("pos", "dep_head", "dependents", "has_pos", "head_index", "dependent_matrix")


def _reads_syntax(program: Program) -> bool:
    """Whether the code (not a comment) reads a syntax attribute (``.pos``, ``.dep_head``, the
    fitted features' ``has_pos``...) of something."""
    if not any(name in program.source for name in _SYNTAX_ATTRIBUTES):
        return False
    try:
        tree = ast.parse(program.source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return any(isinstance(node, ast.Attribute) and node.attr in _SYNTAX_ATTRIBUTES
               for node in ast.walk(tree))


_PAPER_TEXT_VERSION = 2  # 2: a truncated text is handed over cut after its last token


def _cache_key(program: Program, tokenizer_id: str, with_syntax: str, meaning: str = "",
               paper_tokenizer: str = "") -> str:
    """Outputs on the same texts are cached apart for programs that read POS tags made another
    way or by another tagger (``with_syntax``: mode and syntax_hash), for programs that read
    token meaning from different embeddings (or the probes' stand-in), and for paper-form
    programs handed the model's tokenizer or the stand-in (``paper_tokenizer``)."""
    key = tokenizer_id
    if with_syntax and _reads_syntax(program):
        key += f"+syntax-{with_syntax}"
    if meaning and "similarity" in program.source:  # reads s.embedding_similarity & co.
        key += f"+meaning-{meaning}"
    if paper_tokenizer and is_paper_program(program):
        key += f"+paper-{paper_tokenizer}-v{_PAPER_TEXT_VERSION}"
    return key


def syntax_hash(sentences: Sequence[Sentence]) -> str:
    """A hash of the texts' POS tags and arcs (8 hex): a new spaCy, pipeline or tagging rule
    that changes them changes it."""
    digest = hashlib.sha256()
    for s in sentences:
        digest.update(json.dumps([s.pos, s.dep_head, s.dependents]).encode() + b"\n")
    return digest.hexdigest()[:8]


def meaning_hash(sentences: Sequence[Sentence]) -> str:
    """A hash of the texts' token similarities (8 hex), "" when none carries them."""
    if all(s.token_similarity is None for s in sentences):
        return ""
    digest = hashlib.sha256()
    for s in sentences:
        similarity = b"" if s.token_similarity is None else np.ascontiguousarray(
            s.token_similarity, dtype=np.float32).tobytes()
        digest.update(len(similarity).to_bytes(8, "little") + similarity)
    return digest.hexdigest()[:8]


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


def _evaluate_in_sandbox(programs, sentences, options: dict, progress, keep) -> None:
    if not programs:
        return
    box = shared_sandbox(**options)

    def finished(index: int, result) -> None:
        keep(programs[index], result.values, result.failed, result.reason)

    box.run(programs, sentences, progress=progress, on_result=finished)


_shared: dict[tuple, object] = {}


def shared_sandbox(workers: int | None = None, timeout: float = 5.0, memory_mb: float = 1024,
                   tokenizer=None, helpers=None, unsafe: bool = False,
                   program_seconds: float | None = None):
    """The process-wide sandbox for these settings (one pool at a time, stopped at exit)."""
    from attnprog.synth.runtime.sandbox import Sandbox

    key = (workers, float(timeout), float(memory_mb), id(tokenizer),
           tuple(sorted((helpers or {}).items())), unsafe, program_seconds)
    if key not in _shared:
        close_shared_sandbox()
        _shared[key] = Sandbox(workers, timeout, memory_mb, tokenizer=tokenizer,
                               helpers=helpers, unsafe=unsafe, program_seconds=program_seconds)
    return _shared[key]


@atexit.register
def close_shared_sandbox() -> None:
    """Stop the shared sandbox's workers (a later evaluation starts new ones)."""
    for box in _shared.values():
        box.close()
    _shared.clear()
