"""LLM synthesis throughput against a local `transformers serve` (SmolLM2-135M-Instruct).

- requests, 1 in flight:  4 distinct short chat requests (48 reply tokens), one at a time
- requests, 3 in flight:  the same 4 with three threads (the server runs without
                          continuous batching, so this shows how much overlap buys)
- synthesis:              the whole loop for 2 heads (n=2 hypotheses, 2 attempts, no
                          refinement): requests, parsing and sandbox validation;
                          reports candidates validated and valid programs per minute
- validation only:        validate() on every candidate the synthesis run received, to
                          split the synthesis time between the server and the sandbox

The reply cache is off, so every request reaches the server. Numbers depend on the CPU the
server gets; see bench/RESULTS.md for what was measured where.

Run: pytest bench/bench_llm.py --benchmark-only -s
"""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="needs transformers[serving] (make setup installs it)")

from attnprog.synth.llm.client import ChatClient, LLMSettings  # noqa: E402
from attnprog.synth.llm.server import local_server  # noqa: E402

PROMPTS = [f"Write a Python function that returns the {k}th square number." for k in range(2, 6)]
figures: dict[str, dict] = {}


def keep(name: str, values: dict, benchmark) -> None:
    """Record a figure, and print it at once (a long run killed later still leaves it)."""
    figures[name] = values
    benchmark.extra_info.update(values)
    print(f"\n  {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in values.items()), flush=True)


@pytest.fixture(scope="module")
def server():
    from attnprog.engine.models import builtin_checkpoint

    with local_server(builtin_checkpoint("smollm2-135m")) as (base_url, model):
        yield base_url, model


def client(server, concurrency=1, max_tokens=48) -> ChatClient:
    base_url, model = server
    return ChatClient(LLMSettings(model=model, base_url=base_url, max_tokens=max_tokens,
                                  concurrency=concurrency, use_cache=False, timeout=3600.0))


def send_all(chat: ChatClient, workers: int) -> None:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda p: chat.complete([{"role": "user", "content": p}]), PROMPTS))


@pytest.mark.parametrize("in_flight", [1, 3])
def test_requests_per_second(benchmark, server, in_flight):
    chat = client(server, concurrency=in_flight)
    benchmark.pedantic(send_all, args=(chat, in_flight), rounds=1, iterations=1)
    seconds = benchmark.stats.stats.mean
    keep(f"requests, {in_flight} in flight", {
        "requests/s": len(PROMPTS) / seconds,
        "completion tokens/s": chat.usage.completion_tokens / seconds,
        "seconds": seconds, "retries": chat.usage.retries,
    }, benchmark)
    assert chat.usage.requests == len(PROMPTS)


@pytest.fixture(scope="module")
def synthesis(server):
    """One synthesis run for two heads of SmolLM2 on a few built-in texts."""
    from attnprog.engine.corpus import builtin_corpus
    from attnprog.engine.extract import extract_attention
    from attnprog.engine.models import load_model
    from attnprog.engine.synthesis import head_tasks
    from attnprog.kernels.iou import pair_iou
    from attnprog.synth.llm.synthesiser import Synthesiser, SynthesisOptions

    model, tokenizer = load_model("smollm2-135m")
    store = extract_attention(model, tokenizer, builtin_corpus().take(24), max_tokens=24, progress=False)
    tasks = head_tasks(store, [(0, 0), (3, 1)], n_texts=1)
    chat = client(server, concurrency=1, max_tokens=96)
    worker = Synthesiser(chat, SynthesisOptions(n=2, rounds=0, attempts=2, summary_tokens=250),
                         score=pair_iou)
    return worker, tasks


def test_synthesis_programs_validated_per_minute(benchmark, synthesis):
    worker, tasks = synthesis
    results = benchmark.pedantic(worker.synthesise, args=(tasks,), kwargs={"progress": False},
                                 rounds=1, iterations=1)
    seconds = benchmark.stats.stats.mean
    candidates = [c for r in results for c in r.candidates]
    valid = sum(len(r.programs) for r in results)
    keep("synthesis", {
        "requests/s": worker.client.usage.requests / seconds,
        "candidates validated/min": 60 * len(candidates) / seconds,
        "valid programs/min": 60 * valid / seconds,
        "seconds": seconds, "requests": worker.client.usage.requests,
        "candidates": len(candidates), "retries": worker.client.usage.retries,
    }, benchmark)
    synthesis_candidates.extend(candidates)
    assert worker.client.usage.requests >= len(tasks)


synthesis_candidates: list = []


def test_validation_only(benchmark):
    from attnprog.synth.program import Program
    from attnprog.synth.runtime.validate import validate

    programs = [Program(c.source or "x = 1\n") for c in synthesis_candidates if c.source]
    if not programs:
        pytest.skip("the synthesis run received no code to validate")

    def validate_all():
        return [validate(p) for p in programs]

    benchmark.pedantic(validate_all, rounds=1, iterations=1)
    seconds = benchmark.stats.stats.mean
    keep("validation only", {"candidates validated/min": 60 * len(programs) / seconds,
                             "seconds": seconds}, benchmark)


def test_report():
    print(f"\nLLM synthesis throughput ({time.strftime('%Y-%m-%d')}):")
    for name, values in figures.items():
        print(f"  {name:28s} " + ", ".join(f"{k} {v:.3g}" for k, v in values.items()))
    one, three = figures.get("requests, 1 in flight"), figures.get("requests, 3 in flight")
    if one and three:
        print(f"  3 in flight / 1 in flight: {three['requests/s'] / one['requests/s']:.2f}x")
