"""Ray on one machine: ranking and sandboxed evaluation with 1 vs 2 local workers.

    python -m pytest bench/bench_distributed.py -s --benchmark-only

A local Ray cluster on the machine's 2 cores. Ranking: the heads sharded over 1 actor (1 core) or 2
actors (1 core each), against the single-process ``rank`` on 1 numba thread. Evaluation: the
LLM-style sandbox programs as 1 task or 2 tasks of 1 core each. Every variant is timed round
by round, interleaved, best round each; pytest-benchmark times the 2-worker run, and the
speed-up and scaling efficiency (speed-up / 2) go to extra_info and are printed with -s.
"""

import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from attnprog.engine.rank import rank
from attnprog.engine.store import AttentionStore
from attnprog.kernels.bench import make_bench_data
from attnprog.synth.features import Sentence
from attnprog.synth.program import Program
from attnprog.synth.runtime.outputs import ProgramOutputs

ray = pytest.importorskip("ray")

ROUNDS = 3
N_PROGRAMS, N_HEADS, N_TEXTS, N_TOKENS = 512, 1024, 16, 64  # 2 shards of 8 head tiles
CHUNK = 64  # programs per chunk: 8 chunks, so the driver streams while shards score


@pytest.fixture(scope="module")
def cluster():
    # 3 logical CPUs so the 1-actor and the 2-actor rankers both stay up; rounds are
    # interleaved, so at most 2 actors compute at a time, on the machine's 2 cores
    ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def best_of(runs: dict, rounds: int = ROUNDS) -> dict:
    """Interleaved rounds of every callable in ``runs``; the best wall time of each."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: min(ts) for name, ts in times.items()}


def report(benchmark, what: str, seconds: dict) -> None:
    speedup = seconds["1 worker"] / seconds["2 workers"]
    benchmark.extra_info.update({k.replace(" ", "_") + "_s": round(v, 3) for k, v in seconds.items()})
    benchmark.extra_info.update(speedup=round(speedup, 3), efficiency=round(speedup / 2, 3))
    print(f"\n{what}: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items())
          + f"; 2 vs 1 workers: speed-up {speedup:.2f}x, efficiency {100 * speedup / 2:.0f} %")


def bench_store(kind: str):
    data = make_bench_data(N_PROGRAMS, N_HEADS, N_TEXTS, N_TOKENS, kind)
    lengths = [N_TOKENS] * N_TEXTS
    store = AttentionStore(
        attn_packed=data.attention, offsets=data.offsets.cpu(),
        lengths=torch.tensor(lengths), ids_packed=torch.zeros(sum(lengths), dtype=torch.int64),
        texts=[""] * N_TEXTS, tokens=[["t"] * N_TOKENS] * N_TEXTS,
        spans=[[(0, 1)] * N_TOKENS] * N_TEXTS, splits=["selection"] * N_TEXTS,
        meta={"n_layers": 16, "n_heads": N_HEADS // 16},
    )
    outputs = ProgramOutputs(
        [Program(source=f"# {p}", name=f"p{p}") for p in range(N_PROGRAMS)],
        data.programs.numpy(), np.zeros((N_PROGRAMS, N_TEXTS), bool), data.offsets.numpy(),
    )
    return store, outputs


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_ranking_one_vs_two_shard_actors(benchmark, cluster, kind):
    import numba

    from attnprog.engine.distributed.rank import ShardedRanker

    store, outputs = bench_store(kind)
    one = ShardedRanker(store, shards=1, cpus_per_shard=1)
    two = ShardedRanker(store, shards=2, cpus_per_shard=1)
    expected = rank(store, outputs, split="selection", chunk_programs=CHUNK)
    for ranker in (one, two):  # actors up, numba compiled, result checked
        assert torch.equal(ranker.rank(store, outputs, chunk_programs=CHUNK).iou, expected.iou)
    threads = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(1)  # the single-process baseline on one core too, like each actor
    torch.set_num_threads(1)
    try:
        seconds = best_of({
            "local 1 thread": lambda: rank(store, outputs, chunk_programs=CHUNK),
            "1 worker": lambda: one.rank(store, outputs, chunk_programs=CHUNK),
            "2 workers": lambda: two.rank(store, outputs, chunk_programs=CHUNK),
        })
    finally:
        numba.set_num_threads(threads[0])
        torch.set_num_threads(threads[1])
    benchmark.pedantic(lambda: two.rank(store, outputs, chunk_programs=CHUNK), rounds=1,
                       iterations=1)
    # CPU seconds each actor spends on one ranking: the split of the work, which wall time on
    # a machine shared with other jobs does not show
    cpu = {}
    for name, ranker in (("1 worker", one), ("2 workers", two)):
        before = [i["cpu_s"] for i in ranker.info()]
        ranker.rank(store, outputs, chunk_programs=CHUNK)
        cpu[name] = max(i["cpu_s"] - b for i, b in zip(ranker.info(), before))
    cpu_speedup = cpu["1 worker"] / cpu["2 workers"]
    benchmark.extra_info.update(cpu_s_1=round(cpu["1 worker"], 3), cpu_s_2_max=round(cpu["2 workers"], 3),
                                cpu_speedup=round(cpu_speedup, 3))
    print(f"\nCPU seconds per actor: 1 worker {cpu['1 worker']:.2f} s, busiest of 2 workers "
          f"{cpu['2 workers']:.2f} s: speed-up {cpu_speedup:.2f}x, efficiency "
          f"{100 * cpu_speedup / 2:.0f} % on idle cores")
    one.close()
    two.close()
    pair_cells = N_PROGRAMS * N_HEADS * int(store.offsets[-1])
    benchmark.extra_info.update(pair_cells=pair_cells, programs=kind)
    report(benchmark, f"ranking {N_PROGRAMS} {kind} programs x {N_HEADS} heads x {N_TEXTS} texts "
           f"of {N_TOKENS} ({pair_cells:.2e} pair-cells)", seconds)


def test_evaluation_one_vs_two_tasks(benchmark, cluster):
    from attnprog.engine.distributed.evaluate import evaluate_on_ray

    sys.path.insert(0, str(Path(__file__).parent))
    from llm_style_programs import llm_style_programs

    rng = random.Random(0)
    words = "the cat sat on a mat , and then it ran off . She said : \" no ! \"".split()
    texts = [Sentence.from_text(" ".join(rng.choice(words) for _ in range(rng.randint(28, 62))),
                                bos="<s>") for _ in range(100)]
    programs = llm_style_programs()

    def run(tasks: int):
        return evaluate_on_ray(programs, texts, batch_programs=-(-len(programs) // tasks),
                               use_cache=False, progress=False)

    run(2)  # sandbox workers up in both Ray workers
    seconds = best_of({"1 worker": lambda: run(1), "2 workers": lambda: run(2)})
    benchmark.pedantic(lambda: run(2), rounds=1, iterations=1)
    benchmark.extra_info.update(calls=len(programs) * len(texts))
    report(benchmark, f"sandboxed evaluation of {len(programs)} programs x {len(texts)} texts",
           seconds)
