"""Hand-built stores whose heads are noisy copies of known patterns, for ranking and library tests,
and random program matrices for head-replacement tests."""

import numpy as np
import torch

from attnprog.engine.store import AttentionStore
from attnprog.layout import causal_offsets, pack
from attnprog.synth.program import Program
from attnprog.synth.runtime.outputs import ProgramOutputs


def first_token(n):
    m = np.zeros((n, n))
    m[:, 0] = 1.0
    return m


def previous_token(n):
    m = np.eye(n, k=-1)
    m[0, 0] = 1.0
    return m


def self_token(n):
    return np.eye(n)


def uniform(n):
    m = np.tril(np.ones((n, n)))
    return m / m.sum(1, keepdims=True)


def packed(fn, lengths):
    """``fn`` on every text length, packed like a store row: float32 [cells]."""
    return np.concatenate([pack(fn(n)) for n in lengths]).astype(np.float32)


def planted_store(planted, patterns, lengths, splits, signal, n_layers=1, seed=0, meta=None):
    """Head row r is ``signal * patterns[planted[r]] + (1 - signal) * noise`` (rows sum to 1)."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in planted:
        texts = []
        for n in lengths:
            noise = np.tril(rng.random((n, n)))
            noise /= noise.sum(1, keepdims=True)
            texts.append(pack(signal * patterns[index](n) + (1 - signal) * noise))
        rows.append(np.concatenate(texts))
    return store_of(np.stack(rows), lengths, splits, n_layers, meta)


def store_of(attn_rows, lengths, splits, n_layers=1, meta=None):
    """A store holding packed attention ``attn_rows`` [L*H, C] over texts of ``lengths``."""
    return AttentionStore(
        attn_packed=torch.from_numpy(np.asarray(attn_rows, dtype=np.float32)),
        offsets=torch.from_numpy(causal_offsets(lengths)),
        lengths=torch.tensor(lengths, dtype=torch.int64),
        ids_packed=torch.zeros(sum(lengths), dtype=torch.int64),
        texts=[f"text {s}" for s in range(len(lengths))],
        tokens=[["t"] * n for n in lengths],
        spans=[[(0, 1)] * n for n in lengths],
        splits=list(splits),
        meta={"n_layers": n_layers, "n_heads": len(attn_rows) // n_layers, **(meta or {})},
    )


def pattern_outputs(patterns, lengths, source=lambda fn: ""):
    """One program per pattern, its outputs the pattern itself on every text."""
    programs = [Program(source=source(fn), name=fn.__name__, family=fn.__name__) for fn in patterns]
    return ProgramOutputs(programs=programs,
                          values=np.stack([packed(fn, lengths) for fn in patterns]),
                          failed=np.zeros((len(patterns), len(lengths)), dtype=bool),
                          offsets=causal_offsets(lengths))


def random_program_matrices(batch, seed):
    """Row-normalised causal matrices per text, zero outside each text's block:
    [batch, query_pos, key_pos] float32."""
    rng = np.random.default_rng(seed)
    dense = np.zeros((batch.size, batch.width, batch.width), dtype=np.float32)
    for b, n in enumerate(batch.lengths):
        block = np.tril(rng.random((n, n)).astype(np.float32))
        dense[b, :n, :n] = block / block.sum(axis=1, keepdims=True)
    return torch.from_numpy(dense)
