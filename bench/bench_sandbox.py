"""Sandbox throughput: program-text calls per second for simple LLM-style programs.

- serial:        the programs run in this process, one text at a time (no isolation)
- one IPC/text:  the sandbox with batches of one text (a pipe round trip per call)
- batched:       the sandbox as shipped (one round trip per program x batch of texts)
- batched_spacy: the sandbox on twenty paper-form programs that load spaCy and parse their
                 sentence on every call (each text is parsed once per worker; programs get
                 the cached parse)

20 programs (bench/llm_style_programs.py) x 200 texts of 30-64 tokens = 4,000 calls per
round, on a warm pool of one worker per core. Targets: >= 2,000 sandboxed calls per second
on 2 cores (issue 3); the spaCy set within 2x of the spaCy-free set (issue 10). Outputs of
every path are checked equal to in-process execution.

Run: pytest bench/bench_sandbox.py --benchmark-only
"""

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from attnprog.synth.features import Sentence
from attnprog.synth.runtime.execute import run_trusted
from attnprog.synth.runtime.sandbox import Sandbox

sys.path.insert(0, str(Path(__file__).parent))
from llm_style_programs import llm_style_programs, spacy_style_programs  # noqa: E402

N_TEXTS = 200
WORDS = (
    "the cat sat on a mat . John gave Mary a drink , and she said \" thanks \" ! "
    "Then they left the store ? When Paris is big , the city sleeps ."
).split()
ROUNDS = 3
seconds_per_round: dict[str, float] = {}


@pytest.fixture(scope="module")
def texts() -> list[Sentence]:
    rng = random.Random(0)
    return [
        Sentence.from_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(28, 62))),
                           bos="<s>")
        for _ in range(N_TEXTS)
    ]


@pytest.fixture(scope="module")
def programs():
    return llm_style_programs()


@pytest.fixture(scope="module")
def expected(programs, texts):
    return run_trusted(programs, texts)


@pytest.fixture(scope="module")
def box(programs, texts):
    with Sandbox(progress=False) as sandbox:
        sandbox.run(programs[:2], texts[:8])  # workers up and warm
        yield sandbox


@pytest.fixture(scope="module")
def spacy_programs():
    pytest.importorskip("spacy")
    return spacy_style_programs()


@pytest.fixture(scope="module")
def spacy_expected(spacy_programs, texts):
    """In-process results; here ``spacy.load("en_core_web_sm")`` loads the installed pipeline."""
    import spacy

    from attnprog.synth.features import _PIPELINE_NAMES

    original, loaded = spacy.load, {}

    def load(name, *args, **kwargs):
        if "nlp" not in loaded:
            for candidate in (name, *_PIPELINE_NAMES):
                try:
                    loaded["nlp"] = original(candidate)
                    break
                except OSError:
                    continue
        return loaded["nlp"]

    spacy.load = load
    try:
        return run_trusted(spacy_programs, texts)
    finally:
        spacy.load = original


@pytest.fixture(scope="module")
def spacy_box(spacy_programs, texts):
    with Sandbox(progress=False, spacy=True) as sandbox:
        sandbox.run(spacy_programs[:2], texts[:8])  # workers up and warm
        yield sandbox


def record(benchmark, path: str, programs, texts) -> None:
    calls = len(programs) * len(texts)
    mean = benchmark.stats.stats.mean
    seconds_per_round[path] = mean
    benchmark.extra_info.update(
        calls=calls, calls_per_s=round(calls / mean), cores=os.cpu_count(), texts=len(texts),
        mean_tokens=round(float(np.mean([s.n for s in texts])), 1),
    )
    for other, other_mean in seconds_per_round.items():
        if other != path:
            benchmark.extra_info[f"speedup_vs_{other}"] = round(other_mean / mean, 2)


def same(results, expected) -> bool:
    return all(
        np.array_equal(a.values, b.values) and np.array_equal(a.failed, b.failed)
        for a, b in zip(results, expected, strict=True)
    )


def test_serial_in_process(benchmark, programs, texts, expected):
    results = benchmark.pedantic(run_trusted, args=(programs, texts), rounds=ROUNDS)
    assert same(results, expected)
    record(benchmark, "serial", programs, texts)


def test_sandbox_one_ipc_per_text(benchmark, box, programs, texts, expected):
    box.batch_size = 1
    try:
        results = benchmark.pedantic(box.run, args=(programs, texts), rounds=ROUNDS)
    finally:
        box.batch_size = None
    assert same(results, expected)
    record(benchmark, "one_ipc_per_text", programs, texts)


def test_sandbox_batched(benchmark, box, programs, texts, expected):
    results = benchmark.pedantic(box.run, args=(programs, texts), rounds=ROUNDS)
    assert same(results, expected)
    record(benchmark, "batched", programs, texts)


def test_sandbox_batched_spacy(benchmark, spacy_box, spacy_programs, texts, spacy_expected):
    spacy_box.run(spacy_programs[:1], texts)  # this corpus parsed once, before timing
    results = benchmark.pedantic(spacy_box.run, args=(spacy_programs, texts), rounds=ROUNDS)
    assert same(results, spacy_expected)
    record(benchmark, "batched_spacy", spacy_programs, texts)
