"""Generator throughput: program-text matrices per second at n = 64, vectorised vs executed.

- vectorised: :func:`evaluate_generated` on 5,000 generator programs x 20 texts (100,000
  normalised 64 x 64 matrices, packed), primitives once per text, mixing in numba
- executed:   the same programs' emitted sources run one by one in-process, then normalised
  and packed (a 40-program sample over the 20 texts, extrapolated per matrix)

The target (issue 3) is >= 1,000,000 matrices per minute on the 2-core CI machine.

Run: pytest bench/bench_generator.py --benchmark-only
"""

import random
import time

import numpy as np
import pytest

from attnprog.layout import pack
from attnprog.synth.features import Sentence
from attnprog.synth.generator.probes import PROBE_TEXTS, tokenise
from attnprog.synth.generator.specs import evaluate_generated, generate
from attnprog.synth.program import normalise

N_TOKENS = 64
N_TEXTS = 20
N_PROGRAMS = 5000
EXECUTED_SAMPLE = 40


@pytest.fixture(scope="module")
def programs():
    return generate(N_PROGRAMS)


@pytest.fixture(scope="module")
def texts() -> list[Sentence]:
    """Twenty 64-token windows over the probe prose, tokenised by the toy tokeniser."""
    whole = tokenise(" ".join(PROBE_TEXTS * 2), {})
    windows = []
    for start in range(0, N_TEXTS * 7, 7):
        span = slice(start, start + N_TOKENS)
        windows.append(
            Sentence(
                text=whole.text,
                ids=whole.ids[span],
                tokens=whole.tokens[span],
                offsets=whole.offsets[span],
                pos=whole.pos[span],
            )
        )
    assert all(s.n == N_TOKENS for s in windows)
    return windows


def run_sources(programs, texts) -> np.ndarray:
    """The executed baseline: exec each source once, call it on every text, normalise, pack."""
    rows = []
    for program in programs:
        namespace: dict = {}
        exec(compile(program.source, "<generated>", "exec"), namespace)
        function = namespace[program.name]
        rows.append(np.concatenate([pack(normalise(function(s))) for s in texts]))
    return np.stack(rows).astype(np.float32)


def test_generator_matrices_per_second(benchmark, programs, texts):
    evaluate_generated(programs[:8], texts[:2])  # compile (or load) the numba kernel first
    outputs = benchmark.pedantic(evaluate_generated, args=(programs, texts), rounds=3, iterations=1)
    matrices = len(programs) * len(texts)
    vectorised_s = benchmark.stats.stats.mean / matrices
    best_s = benchmark.stats.stats.min / matrices

    sample = random.Random(0).sample(range(len(programs)), EXECUTED_SAMPLE)
    start = time.perf_counter()
    executed = run_sources([programs[i] for i in sample], texts)
    executed_s = (time.perf_counter() - start) / (EXECUTED_SAMPLE * len(texts))
    assert np.abs(executed - outputs[sample]).max() <= 1e-6

    benchmark.extra_info.update(
        {
            "programs": len(programs),
            "texts": len(texts),
            "tokens_per_text": N_TOKENS,
            "matrices_per_s": round(1 / vectorised_s),
            "matrices_per_min": round(60 / vectorised_s),
            "best_round_matrices_per_min": round(60 / best_s),
            "executed_matrices_per_s": round(1 / executed_s),
            "speedup_vs_executed": round(executed_s / vectorised_s, 1),
        }
    )
