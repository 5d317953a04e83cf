"""Head replacement: a full SmolLM2-135M forward pass with 25 % of heads replaced, three ways.

- sdpa:            the unmodified model with SDPA attention (the bound: replacing heads should
                   cost at most ~1.15x this on a GPU)
- eager_overwrite: eager attention materialising every head's probabilities, the flagged heads
                   overwritten by Π before V (the authors' fixed method)
- attnprog:        the ``attnprog`` attention: the fused override kernel on CUDA, SDPA plus a
                   matmul for the flagged heads on CPU

Shapes: 4 x 128 tokens on CPU, 16 x 256 on a GPU. Π is built once outside the timed region
(its cost is reported as ``program_prep_s``). Ratios land in the attnprog row's extra_info.

Run: pytest bench/bench_override.py --benchmark-only
"""

import time

import numpy as np
import pytest
import torch

from attnprog.engine.models import load_model
from attnprog.engine.replace import make_batch, replace_heads

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
BATCH, TOKENS = (16, 256) if ON_GPU else (4, 128)
FRACTION = 0.25
ROUNDS = 10 if ON_GPU else 3
LATENCY: dict[str, float] = {}  # variant -> mean seconds, filled in parametrisation order


@pytest.fixture(scope="module")
def setup():
    dtype = torch.float16 if ON_GPU else torch.float32
    model, _ = load_model("smollm2-135m", device=DEVICE, dtype=dtype)
    config = model.config
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, size=(BATCH, TOKENS)).tolist()
    batch = make_batch(ids, device=DEVICE)
    all_heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    chosen = rng.choice(len(all_heads), size=round(FRACTION * len(all_heads)), replace=False)
    tri = np.tril(rng.random((BATCH, TOKENS, TOKENS), dtype=np.float32))
    program = torch.from_numpy(tri / tri.sum(-1, keepdims=True))  # one random Π, shared
    heads = {all_heads[i]: program for i in sorted(chosen)}
    return model, batch, heads


def _forward(model, batch):
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    if ON_GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("variant", ["sdpa", "eager_overwrite", "attnprog"])
def test_forward_with_quarter_of_heads_replaced(benchmark, setup, variant):
    model, batch, heads = setup
    benchmark.group = f"override forward {BATCH}x{TOKENS} {DEVICE}"
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if ON_GPU else "cpu",
                                batch=BATCH, tokens=TOKENS, replaced_heads=len(heads))
    if variant == "sdpa":
        previous = model.config._attn_implementation
        model.set_attn_implementation("sdpa")
        try:
            benchmark.pedantic(_forward, args=(model, batch), rounds=ROUNDS, warmup_rounds=1)
        finally:
            model.set_attn_implementation(previous)
    else:
        impl = "reference" if variant == "eager_overwrite" else "auto"
        with replace_heads(model, heads, impl=impl) as replacement:
            start = time.perf_counter()
            replacement.prepare(batch)
            benchmark.extra_info["program_prep_s"] = time.perf_counter() - start
            benchmark.pedantic(_forward, args=(model, batch), rounds=ROUNDS, warmup_rounds=1)
    LATENCY[variant] = benchmark.stats.stats.mean
    benchmark.extra_info["latency_s"] = LATENCY[variant]
    if variant == "attnprog" and {"sdpa", "eager_overwrite"} <= LATENCY.keys():
        benchmark.extra_info["ratio_vs_sdpa"] = LATENCY["attnprog"] / LATENCY["sdpa"]
        benchmark.extra_info["speedup_vs_eager_overwrite"] = (
            LATENCY["eager_overwrite"] / LATENCY["attnprog"]
        )
