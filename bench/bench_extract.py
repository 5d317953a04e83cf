"""Extraction throughput on SmolLM2-135M (CPU): tokens per second, batched vs one text at a time.

Run: pytest bench/bench_extract.py --benchmark-only
"""

import pytest

from attnprog.engine.corpus import builtin_corpus
from attnprog.engine.extract import extract_attention
from attnprog.engine.models import load_model


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def texts():
    return builtin_corpus().take(16)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_extract_tokens_per_second(benchmark, smollm2, texts, batch_size):
    model, tokenizer = smollm2
    store = benchmark.pedantic(
        extract_attention, args=(model, tokenizer, texts),
        kwargs={"batch_size": batch_size, "progress": False}, rounds=2, iterations=1,
    )
    tokens = int(store.lengths.sum())
    benchmark.extra_info["tokens"] = tokens
    benchmark.extra_info["tokens_per_s"] = tokens / benchmark.stats.stats.mean
