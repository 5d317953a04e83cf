"""Vectorised evaluation of DSL specs: primitives once per text, mixtures by a numba kernel.

A spec is ``{"terms": [{"prim", "args", "fallback", "weight"}, ...]}``; its program returns
``sum_t weight_t * rows(atom_t)`` (or the single atom), then gets the usual normalisation.
An *atom* is one primitive call with its fallback, row-normalised. Per text we compute each
atom once, packed in the causal layout ``[K, c_s]``; every program is then a weighted sum
of a few atom rows followed by row normalisation, which the kernel does in one pass.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from attnprog.layout import causal_offsets, tril_index
from attnprog.synth.generator import primitives as dsl

AtomKey = tuple  # (prim name, args as JSON, fallback name or None)


def atom_key(term: dict) -> AtomKey:
    """Hashable identity of a spec term's atom (its weight left out)."""
    return (term["prim"], json.dumps(term.get("args", {}), sort_keys=True), term.get("fallback"))


def compile_specs(specs: Sequence[dict]) -> tuple[list[AtomKey], np.ndarray, np.ndarray]:
    """Index the distinct atoms of ``specs``.

    Returns atom keys [K], term_atoms [P, T] int32 (-1 pads) and term_weights [P, T] float64.
    """
    index: dict[AtomKey, int] = {}
    n_terms = max((len(spec["terms"]) for spec in specs), default=1)
    term_atoms = np.full((len(specs), n_terms), -1, dtype=np.int32)
    term_weights = np.zeros((len(specs), n_terms), dtype=np.float64)
    for p, spec in enumerate(specs):
        for t, term in enumerate(spec["terms"]):
            term_atoms[p, t] = index.setdefault(atom_key(term), len(index))
            term_weights[p, t] = float(term.get("weight", 1.0))
    return list(index), term_atoms, term_weights


def atom_matrices(sentence, keys: Sequence[AtomKey]) -> np.ndarray:
    """Each atom on one text, fallback applied and rows normalised; packed [K, n(n+1)/2]."""
    n = sentence.n
    rows_idx, cols_idx = tril_index(n)
    cache: dict[tuple, np.ndarray] = {}

    def call(prim: str, args_json: str) -> np.ndarray:
        if (prim, args_json) not in cache:
            matrix = dsl.PRIMITIVES[prim].fn(sentence, **json.loads(args_json))
            cache[(prim, args_json)] = np.asarray(matrix, dtype=np.float64)
        return cache[(prim, args_json)].copy()  # with_fallback writes in place

    atoms = np.empty((len(keys), n * (n + 1) // 2), dtype=np.float64)
    for k, (prim, args_json, fallback) in enumerate(keys):
        matrix = call(prim, args_json)
        if fallback is not None:
            fb_prim, fb_args = dsl.FALLBACKS[fallback]
            matrix = dsl.with_fallback(matrix, call(fb_prim, json.dumps(fb_args, sort_keys=True)))
        atoms[k] = dsl.rows(matrix)[rows_idx, cols_idx]
    return atoms


class AtomCache:
    """Atoms kept across calls, per (text, atom), up to ``budget_bytes``.

    Ranking mixes many chunks of programs on the same texts and the chunks share most of
    their atoms (the default pool's 5,000 programs use 212), so each is computed once.
    """

    def __init__(self, budget_bytes: int = 1 << 30):
        self.budget_bytes, self.used_bytes = budget_bytes, 0
        self.rows: dict[tuple[int, AtomKey], np.ndarray] = {}  # (id(sentence), key) -> [c_s]
        self.sentences: dict[int, object] = {}  # keeps each sentence alive, so its id stays its own

    def atoms(self, sentence, keys: Sequence[AtomKey]) -> np.ndarray:
        """As :func:`atom_matrices`, computing only the atoms not cached yet."""
        text = id(sentence)
        missing = [key for key in keys if (text, key) not in self.rows]
        fresh = dict(zip(missing, atom_matrices(sentence, missing))) if missing else {}
        for key, row in fresh.items():
            if self.used_bytes + row.nbytes <= self.budget_bytes:
                self.sentences.setdefault(text, sentence)
                self.rows[(text, key)] = row.copy()  # not a view that keeps the whole block
                self.used_bytes += row.nbytes
        atoms = np.empty((len(keys), sentence.n * (sentence.n + 1) // 2), dtype=np.float64)
        for k, key in enumerate(keys):
            atoms[k] = fresh[key] if key in fresh else self.rows[(text, key)]
        return atoms


def evaluate_specs(specs: Sequence[dict], sentences: Sequence,
                   cache: AtomCache | None = None) -> np.ndarray:
    """Normalised outputs of ``specs`` on ``sentences``, packed: [P, C] float32.

    ``cache``: atoms kept from earlier calls on the same sentences (and filled by this one).
    """
    keys, term_atoms, term_weights = compile_specs(specs)
    offsets = causal_offsets([s.n for s in sentences])
    out = np.empty((len(specs), int(offsets[-1])), dtype=np.float32)
    if not len(specs) or not len(sentences):
        return out
    from attnprog.synth.generator.mix_kernel import mix_rows  # numba: imported only when needed

    for s, sentence in enumerate(sentences):
        atoms = cache.atoms(sentence, keys) if cache else atom_matrices(sentence, keys)  # [K, c_s]
        mix_rows(atoms, term_atoms, term_weights, sentence.n, out, int(offsets[s]))
    return out


# --- torch path: atoms once per corpus, programs mixed on a device (e.g. the GPU) -------------


_WORKER_JOB: tuple = ()  # (table, offsets, sentences, keys), set in each forked worker


def _take_job(*job) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job


def _fill_text(s: int) -> None:
    table, offsets, sentences, keys = _WORKER_JOB
    table[:, offsets[s] : offsets[s + 1]] = atom_matrices(sentences[s], keys)


def atom_table(sentences: Sequence, keys: Sequence[AtomKey], workers: int = 1) -> np.ndarray:
    """Every atom on every text, packed: [K, C] float64 (text s in its causal-offset slice).

    ``workers`` > 1 computes texts in that many forked processes (the primitives are numpy
    on small matrices, bound by the interpreter, so threads would not help). They write into
    one shared anonymous mapping: nothing is pickled back (the table can be gigabytes).
    """
    offsets = causal_offsets([s.n for s in sentences])
    shape = (len(keys), int(offsets[-1]))
    if workers <= 1 or len(sentences) <= 1:
        table = np.empty(shape, dtype=np.float64)
        for s, sentence in enumerate(sentences):
            table[:, offsets[s] : offsets[s + 1]] = atom_matrices(sentence, keys)
        return table
    import mmap
    import multiprocessing

    shared = mmap.mmap(-1, max(1, 8 * shape[0] * shape[1]))  # MAP_SHARED | MAP_ANONYMOUS
    table = np.frombuffer(shared, dtype=np.float64, count=shape[0] * shape[1]).reshape(shape)
    job = (table, offsets, list(sentences), list(keys))  # forked, so inherited, not pickled
    with multiprocessing.get_context("fork").Pool(min(workers, len(sentences)),
                                                  initializer=_take_job, initargs=job) as pool:
        pool.map(_fill_text, range(len(sentences)),
                 chunksize=max(1, len(sentences) // (4 * workers)))
    return table


class TorchMixer:
    """Generator outputs computed with torch on ``device``: same values as
    :func:`evaluate_specs` (to 1e-6), for many program chunks against one corpus.

    The atom table [K, C] is built once (numpy, ``workers`` processes) and kept on the device
    in float64; each call mixes a chunk's atoms and normalises the rows there.
    """

    def __init__(self, specs: Sequence[dict], sentences: Sequence, device, workers: int = 1):
        import torch  # synth never imports torch at module level

        keys, term_atoms, term_weights = compile_specs(specs)
        self.specs_index = {json.dumps(spec, sort_keys=True): i for i, spec in enumerate(specs)}
        self.device = torch.device(device)
        self.atoms = torch.from_numpy(atom_table(sentences, keys, workers)).to(self.device)
        self.term_atoms = torch.from_numpy(term_atoms).long().to(self.device)  # [P, T], -1 pads
        self.term_weights = torch.from_numpy(term_weights).to(self.device)  # [P, T] float64
        lengths = [s.n for s in sentences]
        row_of_cell, first_of_row = [], []
        row0 = 0
        for n in lengths:  # a causal row i of a text holds cells [i(i+1)/2, (i+1)(i+2)/2)
            rows, cols = tril_index(n)
            row_of_cell.append(rows + row0)
            first_of_row.append(cols == 0)
            row0 += n
        self.n_rows = row0
        self.row_of_cell = torch.from_numpy(np.concatenate(row_of_cell)).long().to(self.device)
        self.first_col = torch.from_numpy(np.concatenate(first_of_row)).to(self.device)

    def rows(self, spec_indices) -> torch.Tensor:  # noqa: F821 - torch is imported lazily
        """Normalised outputs [len(spec_indices), C] float32 of the given specs, on the device."""
        import torch

        index = torch.as_tensor(spec_indices, dtype=torch.long, device=self.device)
        atoms, weights = self.term_atoms[index], self.term_weights[index]  # [Pc, T]
        mixed = torch.zeros(len(index), self.atoms.shape[1], dtype=torch.float64,
                            device=self.device)
        for t in range(atoms.shape[1]):
            used = atoms[:, t] >= 0
            term = self.atoms[atoms[:, t].clamp(min=0)] * torch.where(used, weights[:, t], 0.0)[:, None]
            mixed += term
        totals = torch.zeros(len(index), self.n_rows, dtype=torch.float64, device=self.device)
        totals.index_add_(1, self.row_of_cell, mixed)
        totals = totals[:, self.row_of_cell]  # each cell's row total
        # an empty row becomes one-hot on token 0, as normalise() does
        out = torch.where(totals > 0, mixed / torch.where(totals > 0, totals, 1.0),
                          self.first_col.to(torch.float64))
        return out.float()
