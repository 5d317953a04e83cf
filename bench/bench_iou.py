"""Sum-min (IoU ranking) throughput: kernel vs torch broadcasting vs the authors' numpy loop.

    python -m pytest bench/bench_iou.py -s                       # 3 shapes x 2 sparsities
    ATTNPROG_BENCH_FULL=1 python -m pytest bench/bench_iou.py -s  # all 9 shapes P x H

pytest-benchmark times the kernel (``sum_min``, impl "auto": Triton on CUDA, numba on CPU)
on the full shape. The rates and ratios come from ``side_by_side`` in the same test: kernel,
torch broadcasting (on the first 32 programs, 256 on GPU: its cost is linear in P) and the
authors' numpy loop (300 random (program, head, text) triples on n x n matrices), timed
round by round, interleaved, best round each, in pair-cells/s. They go to extra_info (see
--benchmark-json) and are printed with -s.
"""

import os

import pytest
import torch

from attnprog.kernels.bench import (
    H_SIZES,
    HEADER,
    P_SIZES,
    QUICK_SHAPES,
    format_row,
    hardware_bound,
    make_bench_data,
    side_by_side,
)
from attnprog.kernels.iou import resolve_impl, sum_min

DEVICE = os.environ.get("ATTNPROG_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.startswith("cuda")
FULL = os.environ.get("ATTNPROG_BENCH_FULL") == "1" or ON_GPU
SHAPES = [(p, h) for p in P_SIZES for h in H_SIZES] if FULL else list(QUICK_SHAPES)
N_TEXTS = 32 if ON_GPU else 4  # texts of n = 64 tokens: 2080 causal cells each
DTYPE = getattr(torch, os.environ.get("ATTNPROG_BENCH_DTYPE", "float32"))


def setup_module():
    print(f"\ndevice {DEVICE}, {N_TEXTS} texts of n = 64, {DTYPE}\n{HEADER}")


@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("n_programs,n_heads", SHAPES)
def test_sum_min(benchmark, n_programs, n_heads, kind):
    data = make_bench_data(n_programs, n_heads, N_TEXTS, 64, kind, DEVICE, DTYPE)
    impl = resolve_impl("auto", DEVICE)

    def run():
        sum_min(data.programs, data.attention, data.offsets, impl=impl)
        if ON_GPU:
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    rates = side_by_side(data, impl, rounds=3, sample_programs=256 if ON_GPU else 32)
    bound, _ = hardware_bound(DEVICE)
    row = {"P": n_programs, "H": n_heads, "programs": kind, **rates,
           "of_bound": None if bound is None else rates["kernel"] / bound}
    benchmark.extra_info.update(row, impl=impl, device=DEVICE)
    print(format_row(row))
