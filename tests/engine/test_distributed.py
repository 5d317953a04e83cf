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
from attnprog.layout import causal_offsets, pack
from attnprog.synth.program import Program
from attnprog.synth.runtime.outputs import ProgramOutputs
from tests.engine.planted import store_of

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
    return store_of(random_rows(rng, N_LAYERS * N_HEADS), LENGTHS, SPLITS, N_LAYERS,
                    meta={"model_id": "random"})


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


# --- evaluation ----------------------------------------------------------------------------

FIRST = "import numpy as np\ndef program(s):\n    out = np.zeros((s.n, s.n))\n" \
        "    out[:, 0] = 1\n    return out\n"
DIAGONAL = "import numpy as np\ndef program(s):\n    return np.eye(s.n)\n"
# reads far outside its array: the sandbox process dies with SIGSEGV (passes the static check)
CRASHES = ("import numpy as np\ndef program(s):\n"
           "    wild = np.lib.stride_tricks.as_strided(np.zeros(1), shape=(1 << 20,), strides=(1 << 30,))\n"
           "    return np.full((s.n, s.n), wild.sum())\n")
RAISES = "def program(s):\n    raise ValueError('no')\n"
POISON = "def program(s):\n    return None  # poison\n"


def evaluation_pool():
    from attnprog.synth.generator.specs import generate

    handwritten = [Program(FIRST), Program(CRASHES), Program(DIAGONAL), Program(RAISES)]
    return handwritten + generate(n_min=6)  # generator programs stay on the driver


def test_evaluation_as_ray_tasks_marks_a_crashing_program_failed_and_finishes(cluster, tmp_path):
    from attnprog.engine.distributed.evaluate import evaluate_on_ray
    from attnprog.synth.features import probe_sentences
    from attnprog.synth.runtime.evaluate import close_shared_sandbox, evaluate_programs

    programs, texts = evaluation_pool(), probe_sentences()
    remote = evaluate_on_ray(programs, texts, batch_programs=2, cache_dir=tmp_path / "ray",
                             progress=False)
    local = evaluate_programs(programs, texts, cache_dir=tmp_path / "local", workers=1,
                              progress=False)
    close_shared_sandbox()
    assert remote.failed[1].all() and "SIGSEGV" in remote.reasons[1]
    assert remote.failed[3].all() and "ValueError" in remote.reasons[3]
    assert not remote.failed[[0, 2, 4]].any()
    np.testing.assert_array_equal(remote.failed, local.failed)
    np.testing.assert_array_equal(remote.values, local.values)
    assert remote.reasons == local.reasons


def test_a_program_that_kills_its_ray_worker_is_marked_failed_and_the_rest_finish(cluster):
    """A Ray worker that dies under a batch: the batch is halved until the culprit is alone."""
    from attnprog.engine.distributed.evaluate import LOST_WORKER, evaluate_batch, evaluate_on_ray
    from attnprog.synth.features import probe_sentences

    @ray.remote
    def dies_on_poison(programs, sentences, options):
        if any("poison" in p.source for p in programs):
            os._exit(1)  # the Ray worker process itself, not a sandbox worker
        return evaluate_batch(programs, sentences, options)

    programs = [Program(FIRST), Program(POISON), Program(DIAGONAL), Program(RAISES)]
    out = evaluate_on_ray(programs, probe_sentences(), batch_programs=4, use_cache=False,
                          progress=False, _task=dies_on_poison)
    assert out.failed[1].all() and out.reasons[1] == LOST_WORKER
    assert not out.failed[[0, 2]].any() and out.failed[3].all()
    assert out.values[0].any() and not out.values[1].any()


# --- the sweep -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(cluster):
    """tiny-gpt2's attention on 12 built-in stories, golden programs ranked against it."""
    from attnprog.engine.corpus import builtin_corpus
    from attnprog.engine.extract import extract_attention
    from attnprog.engine.models import load_model
    from attnprog.synth.generator.golden import golden_programs
    from attnprog.synth.runtime.evaluate import evaluate_programs

    model, tokenizer = load_model("tiny-gpt2")
    store = extract_attention(model, tokenizer, builtin_corpus().take(12), batch_size=4,
                              max_tokens=32)
    outputs = evaluate_programs(golden_programs(), store.sentences(), use_cache=False,
                                progress=False)
    return model, tokenizer, store, outputs, rank(store, outputs, split=None)


@pytest.mark.slow
def test_sweep_fractions_as_ray_tasks_give_the_single_process_rows(tiny_run):
    from attnprog.engine.distributed.sweep import sweep_on_ray
    from attnprog.engine.sweep import perplexity_sweep

    model, tokenizer, store, outputs, table = tiny_run
    options = dict(fractions=[0.0, 0.25, 0.5], split=None, outputs=outputs, batch_size=4)
    single = perplexity_sweep(model, store, table, tokenizer=tokenizer, progress=False, **options)
    spread = sweep_on_ray("tiny-gpt2", store, table, device="cpu", **options)
    assert [row.fraction for row in spread.rows] == [0.0, 0.25, 0.5]
    assert spread.base_perplexity == pytest.approx(single.base_perplexity, rel=1e-5)
    for ours, theirs in zip(spread.rows, single.rows):
        assert ours.n_heads == theirs.n_heads
        for condition, value in theirs.perplexity.items():
            assert ours.perplexity[condition] == pytest.approx(value, rel=1e-5)


# --- without --ray, nothing changes ----------------------------------------------------------


def test_without_ray_the_cli_and_pipeline_never_import_ray(store, outputs, tmp_path):
    store.save(tmp_path / "store.safetensors")
    outputs.save(tmp_path / "outputs.safetensors")
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from attnprog.cli import app\n"
        f"result = CliRunner().invoke(app, ['rank', '--store', {str(tmp_path / 'store.safetensors')!r},"
        f" '--outputs', {str(tmp_path / 'outputs.safetensors')!r}, '--out', "
        f"{str(tmp_path / 'table.safetensors')!r}])\n"
        "assert result.exit_code == 0, result.output\n"
        "import attnprog.engine.run.pipeline\n"
        "print('ray imported:', 'ray' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ray imported: False" in done.stdout


def test_head_slices_cover_every_head_once_cut_at_whole_tiles():
    from attnprog.engine.distributed.rank import head_slices

    assert head_slices(5120, 16) == [(320 * i, 320 * (i + 1)) for i in range(16)]
    assert head_slices(144, 2) == [(0, 128), (128, 144)]  # not 72 + 72: both would pad to 128
    assert head_slices(12, 5) == [(0, 3), (3, 6), (6, 8), (8, 10), (10, 12)]  # < 1 tile each


# --- reaching a cluster -------------------------------------------------------------------------


def test_a_ray_client_address_without_ray_client_installed_says_how_to_install_it(monkeypatch):
    from attnprog.engine.distributed.cluster import connect
    from attnprog.errors import ClusterError

    monkeypatch.setitem(sys.modules, "grpc", None)  # `pip install ray` without [client]
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ClusterError, match=r"Ray Client, which is not installed: `pip install 'ray\[client"):
        connect("ray://127.0.0.1:1")


def test_an_ipv6_address_in_brackets_is_tried_without_them(monkeypatch):
    import socket

    from attnprog.engine.distributed.cluster import _check_reachable
    from attnprog.errors import ClusterError

    tried = []

    def refuse(address, timeout):
        tried.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(ClusterError, match=r"no Ray cluster answers at \[::1\]:6379 \(Connection refused\)"):
        _check_reachable("[::1]:6379")
    assert tried == [("::1", 6379)]
