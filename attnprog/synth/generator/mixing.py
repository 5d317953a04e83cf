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


def evaluate_specs(specs: Sequence[dict], sentences: Sequence) -> np.ndarray:
    """Normalised outputs of ``specs`` on ``sentences``, packed: [P, C] float32."""
    keys, term_atoms, term_weights = compile_specs(specs)
    offsets = causal_offsets([s.n for s in sentences])
    out = np.empty((len(specs), int(offsets[-1])), dtype=np.float32)
    if not len(specs) or not len(sentences):
        return out
    from attnprog.synth.generator.mix_kernel import mix_rows  # numba: imported only when needed

    for s, sentence in enumerate(sentences):
        atoms = atom_matrices(sentence, keys)  # [K, c_s]
        mix_rows(atoms, term_atoms, term_weights, sentence.n, out, int(offsets[s]))
    return out
