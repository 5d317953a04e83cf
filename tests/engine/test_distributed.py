"""attnprog on a real local Ray cluster (2 CPUs on loopback): results equal one machine's.

Ranking sharded over heads gives the single-process IoU table bit for bit, also when a shard
actor is killed mid-run; sandboxed evaluation as Ray tasks marks crashing programs failed and
finishes; the sweep's fractions as tasks give the single-process rows.
"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from attnprog.engine.rank import rank, rank_with_heldout
from attnprog.engine.store import AttentionStore
from attnprog.layout import causal_offsets, pack
from attnprog.synth.program import Program
from attnprog.synth.runtime.outputs import ProgramOutputs

ray = pytest.importorskip("ray")

LENGTHS = [5, 9, 3, 12, 7, 10, 4, 8, 6, 11]
SPLITS = ["selection"] * 6 + ["heldout"] * 4
N_LAYERS, N_HEADS = 3, 4


@pytest.fixture(scope="module")
def cluster():
    """A real Ray cluster on this machine: 2 CPUs, no dashboard; shut down after the module."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def random_rows(rng, n_rows):
    """Row-normalised causal matrices, packed: [n_rows, C] float32."""
    rows = []
    for _ in range(n_rows):
        texts = []
        for n in LENGTHS:
            m = np.tril(rng.random((n, n)) ** 4)  # peaked, like attention
            texts.append(pack(m / m.sum(1, keepdims=True)))
        rows.append(np.concatenate(texts))
    return np.stack(rows).astype(np.float32)


@pytest.fixture(scope="module")
def store():
    rng = np.random.default_rng(0)
    return AttentionStore(
        attn_packed=torch.from_numpy(random_rows(rng, N_LAYERS * N_HEADS)),
        offsets=torch.from_numpy(causal_offsets(LENGTHS)),
        lengths=torch.tensor(LENGTHS, dtype=torch.int64),
        ids_packed=torch.zeros(sum(LENGTHS), dtype=torch.int64),
        texts=[f"text {s}" for s in range(len(LENGTHS))],
        tokens=[["t"] * n for n in LENGTHS],
        spans=[[(0, 1)] * n for n in LENGTHS],
        splits=list(SPLITS),
        meta={"n_layers": N_LAYERS, "n_heads": N_HEADS, "model_id": "random"},
    )


@pytest.fixture(scope="module")
def outputs():
    """40 random programs; a few failed on some texts, one wrote NaN."""
    rng = np.random.default_rng(1)
    values = random_rows(rng, 40)
    failed = rng.random((40, len(LENGTHS))) < 0.05
    values[3, 7] = np.nan
    programs = [Program(source=f"# {i}", name=f"p{i}", family="random") for i in range(40)]
    return ProgramOutputs(programs, values, failed, causal_offsets(LENGTHS))


def assert_tables_equal(distributed, single):
    assert distributed.iou.dtype == single.iou.dtype == torch.float32
    assert torch.equal(distributed.iou, single.iou)
    for name in ("per_text", "heldout_iou"):
        a, b = getattr(distributed, name), getattr(single, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    assert distributed.text_indices == single.text_indices


# --- ranking -------------------------------------------------------------------------------


def test_sharded_ranking_equals_single_process(cluster, store, outputs):
    from attnprog.engine.distributed.rank import rank_on_ray

    single = rank(store, outputs, split="selection", per_text=True, chunk_programs=7)
    sharded = rank_on_ray(store, outputs, split="selection", shards=2, per_text=True,
                          chunk_programs=7)
    assert sharded.meta["ray"]["shards"] == 2
    assert_tables_equal(sharded, single)


def test_sharded_ranking_with_heldout_equals_single_process(cluster, store, outputs):
    from attnprog.engine.distributed.rank import rank_on_ray

    single = rank_with_heldout(store, outputs)
    sharded = rank_on_ray(store, outputs, heldout_split="heldout", shards=2)
    assert_tables_equal(sharded, single)


def test_killing_a_shard_actor_mid_run_still_gives_the_full_equal_table(cluster, store, outputs):
    from attnprog.engine.distributed.rank import ShardedRanker

    single = rank(store, outputs, split="selection", chunk_programs=4)  # 10 chunks
    killed = []

    def kill_shard_0(finished, ranker):
        if finished == 2 and not killed:  # chunks 3 and 4 are in flight now
            pid = ranker.info()[0]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    with ShardedRanker(store, shards=2, cpus_per_shard=1) as ranker:
        table = ranker.rank(store, outputs, split="selection", chunk_programs=4,
                            on_chunk=kill_shard_0)
        new_pid = ranker.info()[0]["pid"]
    assert killed and new_pid != killed[0]
    assert table.meta["ray"]["actors_replaced"] == 1
    assert_tables_equal(table, single)
