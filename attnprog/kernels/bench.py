"""Ranking benchmarks: sum-min throughput on user-sized shapes, against the slow ways.

A "pair-cell" is one (program, head, causal cell) triple: the unit of work of
M[p, h, s] = Σ_c min(prog[p, c], attn[h, c]). Every path is reported in pair-cells/s,
so the figures compare directly:

- kernel:  ``sum_min`` with impl "auto" (Triton on CUDA, numba on CPU), timed on the full shape;
- torch:   chunked broadcasting (``sum_min_torch``) on the same device, timed on a sample of
           programs at several chunk sizes (the best is reported; its cost is linear in P);
- numpy:   the authors' loop, ``np.minimum(a, b).sum() / np.maximum(a, b).sum()`` per
           (program, head, text) on n × n matrices, timed on a sample of triples; the rate
           counts the n(n+1)/2 causal cells of each triple.

The three are timed round by round, interleaved, and each reported by its best round (see
:func:`side_by_side`). On the CPU the table adds ``cpu-time/s``: the kernel's pair-cells per
CPU-second of the process times its thread count, what it would do on otherwise idle cores
(a figure for shared machines, not a wall-clock measurement).

Used by ``attnprog bench`` and by ``bench/bench_iou.py``.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from attnprog.kernels.iou import device_layout, resolve_impl, sum_min, sum_min_torch
from attnprog.layout import causal_offsets, tril_index, unpack

P_SIZES = (256, 1024, 4096)
H_SIZES = (144, 270, 704)  # GPT-2 (12 x 12), SmolLM2-135M (30 x 9), TinyLlama (22 x 32)
QUICK_SHAPES = ((256, 144), (1024, 270), (4096, 704))

# fp32 lanes per SM by compute capability (CUDA programming guide, arithmetic throughput):
# 64 on Volta/Turing and on GA100 (8.0), 128 on the other Ampere parts, Ada, Hopper and later.
FP32_LANES = {(7, 0): 64, (7, 2): 64, (7, 5): 64, (8, 0): 64}


@dataclass
class BenchData:
    programs: torch.Tensor  # [programs, cells] packed program outputs
    attention: torch.Tensor  # [heads, cells] packed attention
    offsets: torch.Tensor  # [texts + 1]
    n: int  # tokens per text
    layout: object = None  # the Triton path's device layout of the attention, built once

    @property
    def pair_cells(self) -> int:
        return self.programs.shape[0] * self.attention.shape[0] * self.programs.shape[1]


def make_bench_data(
    n_programs: int,
    n_heads: int,
    n_texts: int = 4,
    n: int = 64,
    programs_kind: str = "sparse",
    device="cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> BenchData:
    """Realistic inputs: softmax attention rows (a quarter of heads sharp) and program rows.

    programs_kind "sparse": 70 % one-hot rows (previous, first or a random earlier token),
    30 % mixtures of 2-4 positions, like generated programs. "dense": uniform causal rows
    plus noise, every cell non-zero (the worst case for the CPU path's zero skipping).
    """
    gen = torch.Generator().manual_seed(seed)
    rows, cols = (torch.from_numpy(x.copy()) for x in tril_index(n))
    causal = torch.ones(n, n, dtype=torch.bool).tril()

    # attention [heads, texts, query_pos, key_pos]: softmax of random logits; sharp heads use a
    # high temperature
    sharpness = torch.where(torch.rand(n_heads, generator=gen) < 0.25, 8.0, 1.5)
    logits = torch.randn(n_heads, n_texts, n, n, generator=gen) * sharpness[:, None, None, None]
    attn = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    attention = attn[:, :, rows, cols].reshape(n_heads, -1)

    if programs_kind == "dense":
        prog = (torch.rand(n_programs, n_texts, n, n, generator=gen) + 0.5) * causal
    elif programs_kind == "sparse":
        prog = torch.zeros(n_programs, n_texts, n, n)
        i = torch.arange(n)
        one_hot = torch.rand(n_programs, generator=gen) < 0.7
        for p in range(n_programs):
            if one_hot[p]:
                kind = p % 3
                j = (i - 1).clamp(min=0) if kind == 0 else torch.zeros_like(i)
                if kind == 2:
                    j = (torch.rand(n_texts, n, generator=gen) * (i + 1)).long()
                    prog[p, torch.arange(n_texts)[:, None], i, j] = 1.0
                    continue
                prog[p, :, i, j] = 1.0
            else:
                k = int(torch.randint(2, 5, (1,), generator=gen))
                j = (torch.rand(n_texts, n, k, generator=gen) * (i[:, None] + 1)).long()
                s_idx = torch.arange(n_texts)[:, None, None].expand_as(j)
                prog[p][s_idx, i[None, :, None].expand_as(j), j] = torch.rand(j.shape, generator=gen)
    else:
        raise ValueError(f"programs_kind must be 'sparse' or 'dense', got {programs_kind!r}")
    prog = prog / prog.sum(-1, keepdim=True).clamp_min(1e-12)
    programs = prog[:, :, rows, cols].reshape(n_programs, -1)
    offsets = torch.from_numpy(causal_offsets([n] * n_texts))
    return BenchData(programs.to(device, dtype), attention.to(device, dtype), offsets, n)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device="cpu", repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def kernel_seconds(data: BenchData, impl: str = "auto") -> float:
    """Seconds of one ``sum_min`` call on the whole shape (synchronised on CUDA).

    On the Triton path the attention's cell-major layout is built once per data set, as
    ranking builds it once per store; the programs' layout is built in every call.
    """
    device = data.programs.device
    if resolve_impl(impl, device) == "triton" and data.layout is None:
        data.layout = device_layout(data.attention, data.offsets)
    return time_call(lambda: sum_min(data.programs, data.attention, data.offsets, impl=impl,
                                     layout=data.layout), device, repeats=1, warmup=0)


# Temporaries the torch baseline tries (elements); its best is reported, so the ratios are
# against broadcasting tuned for the machine at hand, not against one arbitrary chunk size.
TORCH_CHUNKS = (1 << 18, 1 << 20, 1 << 22, 1 << 24)


def torch_rate(data: BenchData, sample_programs: int = 64) -> float:
    """Pair-cells/s of chunked torch broadcasting on the first ``sample_programs``, best chunk."""
    programs = data.programs[:sample_programs]
    best = 0.0
    for chunk in TORCH_CHUNKS:
        call = partial(sum_min_torch, programs, data.attention, data.offsets, chunk_elements=chunk)
        seconds = time_call(call, data.programs.device, repeats=1, warmup=1)
        best = max(best, programs.shape[0] * data.attention.shape[0] * data.programs.shape[1]
                   / seconds)
    return best


def numpy_loop_rate(data: BenchData, n_triples: int = 300, seed: int = 0) -> float:
    """Pair-cells/s of the authors' per-(program, head, text) numpy loop, on sampled triples.

    Matrices are unpacked to n x n first, as the authors hold them; only the loop is timed.
    """
    n = data.n
    rng = np.random.default_rng(seed)
    n_texts = data.offsets.numel() - 1
    programs = data.programs.float().cpu().numpy()  # one transfer, not one per triple
    attention = data.attention.float().cpu().numpy()
    mats = []
    for _ in range(n_triples):
        p, h = int(rng.integers(programs.shape[0])), int(rng.integers(attention.shape[0]))
        s = int(rng.integers(n_texts))
        start, end = int(data.offsets[s]), int(data.offsets[s + 1])
        mats.append((unpack(programs[p, start:end], n), unpack(attention[h, start:end], n)))
    start = time.perf_counter()
    for a, b in mats:
        np.minimum(a, b).sum() / np.maximum(a, b).sum()
    seconds = time.perf_counter() - start
    return n_triples * n * (n + 1) // 2 / seconds


def side_by_side(data: BenchData, impl: str = "auto", rounds: int = 3,
                 sample_programs: int = 32, n_triples: int = 300) -> dict:
    """Best-of-``rounds`` pair-cells/s of kernel, torch and numpy loop, interleaved per round.

    Interleaving means load from other processes hits the three alike, so the ratios hold
    up on a shared machine even when the absolute rates wobble.
    """
    kernel_seconds(data, impl)  # warm-up: numba loads its cache, Triton compiles
    kernel, kernel_cpu, broadcast, numpy_loop = 0.0, 0.0, 0.0, 0.0
    for _ in range(rounds):
        cpu_start = time.process_time()
        kernel = max(kernel, data.pair_cells / kernel_seconds(data, impl))
        cpu_seconds = time.process_time() - cpu_start
        kernel_cpu = max(kernel_cpu, data.pair_cells / max(cpu_seconds, 1e-9))
        broadcast = max(broadcast, torch_rate(data, sample_programs))
        numpy_loop = max(numpy_loop, numpy_loop_rate(data, n_triples))
    return {"kernel": kernel, "torch": broadcast, "numpy_loop": numpy_loop,
            "x_torch": kernel / broadcast, "x_numpy": kernel / numpy_loop,
            "kernel_cpu_time": kernel_cpu * _numba_threads() if impl == "numba" else None}


def _numba_threads() -> int:
    """Threads the CPU path runs on: CPU-time rate x threads = rate on otherwise idle cores."""
    import numba

    return numba.get_num_threads()


def sm_clock_hz(device) -> tuple[float | None, str]:
    """(maximum SM clock in Hz, where it was read) of a CUDA device, or (None, "")."""
    index = torch.device(device).index or 0
    try:  # NVML, as nvidia-smi reads it
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM) * 1e6, "NVML"
    except Exception:  # noqa: BLE001 - NVML missing or refused: try the next source
        pass
    try:
        text = subprocess.run(
            ["nvidia-smi", f"--id={index}", "--query-gpu=clocks.max.sm",
             "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10,
        ).stdout
        return float(text.split()[0]) * 1e6, "nvidia-smi"
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        pass
    rate = getattr(torch.cuda.get_device_properties(device), "clock_rate", None)  # kHz, some builds
    return (rate * 1e3, "torch") if rate else (None, "")


def hardware_bound(device) -> tuple[float | None, str]:
    """(fp32 pair-cells/s bound, how it was obtained) for a CUDA device; (None, "") on CPU.

    min and add are two fp32 instructions per pair-cell, so the bound is
    SMs x fp32 lanes per SM x maximum SM clock / 2, all read from the device.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None, ""
    props = torch.cuda.get_device_properties(device)
    lanes = FP32_LANES.get((props.major, props.minor), 128)
    clock, source = sm_clock_hz(device)
    if clock is None:
        clock, source = 1.5e9, "assumed, not readable"
    note = (f"{props.multi_processor_count} SMs x {lanes} fp32 lanes x {clock / 1e9:.2f} GHz "
            f"({source}) / 2")
    return props.multi_processor_count * lanes * clock / 2, note


def run_rank_bench(
    device=None,
    shapes=None,
    kinds=("sparse", "dense"),
    n_texts: int | None = None,
    n: int = 64,
    dtype: torch.dtype = torch.float32,
    quick: bool = True,
    verbose: bool = True,
) -> list[dict]:
    """Time the kernel, torch broadcasting and the numpy loop side by side; one row per case.

    device: "cuda" / "cpu" / None (CUDA when present). quick: three shapes on the diagonal of
    P x H instead of all nine.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if shapes is None:
        shapes = QUICK_SHAPES if quick else [(p, h) for p in P_SIZES for h in H_SIZES]
    if n_texts is None:
        n_texts = 32 if device.type == "cuda" else 4
    impl = resolve_impl("auto", device)
    bound, bound_note = hardware_bound(device)
    results = []
    dtype_name = str(dtype).replace("torch.", "")
    if verbose:
        print(_title(_device_name(device), impl, dtype_name, n_texts, n)
              + (f"; bound {bound:.2e} ({bound_note})" if bound else ""))
        print(HEADER, flush=True)
    for n_programs, n_heads in shapes:
        for kind in kinds:
            data = make_bench_data(n_programs, n_heads, n_texts, n, kind, device, dtype)
            rates = side_by_side(data, impl, rounds=2 if quick else 3,
                                 sample_programs=256 if device.type == "cuda" else 32)
            row = {
                "device": _device_name(device), "impl": impl, "dtype": dtype_name,
                "P": n_programs, "H": n_heads, "S": n_texts, "n": n, "programs": kind, **rates,
                "of_bound": None if bound is None else rates["kernel"] / bound, "bound_note": bound_note,
            }
            results.append(row)
            if verbose:
                print(format_row(row), flush=True)
            del data
    return results


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()}"


def _title(device_name: str, impl: str, dtype_name: str, n_texts: int, n: int) -> str:
    return (f"sum-min throughput in pair-cells/s on {device_name} ({impl}, {dtype_name}), "
            f"{n_texts} texts of n = {n}")


HEADER = (f"{'P':>5} {'H':>4} {'programs':>8} {'kernel/s':>9} {'torch/s':>9} {'numpy/s':>9} "
          f"{'x torch':>8} {'x numpy':>8} {'of bound':>8} {'cpu-time/s':>10}")


def format_row(row: dict) -> str:
    of_bound = "-" if row["of_bound"] is None else f"{row['of_bound']:.0%}"
    cpu_time = "-" if row.get("kernel_cpu_time") is None else f"{row['kernel_cpu_time']:.2e}"
    return (f"{row['P']:>5} {row['H']:>4} {row['programs']:>8} {row['kernel']:>9.2e} "
            f"{row['torch']:>9.2e} {row['numpy_loop']:>9.2e} {row['x_torch']:>8.1f} "
            f"{row['x_numpy']:>8.1f} {of_bound:>8} {cpu_time:>10}")


def format_results(rows: list[dict]) -> str:
    """A plain-text table of pair-cells/s and ratios."""
    if not rows:
        return "no results"
    first = rows[0]
    head = _title(first["device"], first["impl"], first["dtype"], first["S"], first["n"])
    return "\n".join([head, HEADER] + [format_row(r) for r in rows])


# --- head replacement: the override kernel per layer ------------------------------------------

OVERRIDE_SHAPES = (  # (batch, query heads, KV heads, tokens, head size)
    (16, 9, 3, 256, 64),  # SmolLM2-135M, the GPU target batch
    (4, 32, 8, 1024, 64),  # Llama-3.2-1B
    (1, 32, 8, 4096, 64),
    (4, 16, 4, 1024, 128),
    (16, 16, 4, 256, 128),
)


def _layer_seconds(fn, device) -> float:
    """Median GPU seconds of ``fn`` (CUDA events via triton.testing.do_bench, launches queued
    ahead as in a forward pass, so Python launch overhead is not counted); on the CPU, wall
    seconds."""
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    return time_call(fn, device, repeats=5, warmup=1)


def run_override_bench(device=None, dtype: torch.dtype = torch.float16, shapes=OVERRIDE_SHAPES,
                       fraction: float = 0.25, verbose: bool = True) -> list[dict]:
    """One attention layer four ways, in microseconds: SDPA (FlashAttention on GPU), the fused
    override kernel with no head and with ``fraction`` of heads flagged, and eager attention
    with the flagged heads' probabilities overwritten (the authors' method). GPU time per
    layer, see :func:`_layer_seconds`."""
    from attnprog.kernels.override import override_attention

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    if verbose:
        print(f"override attention per layer on {_device_name(device)} ({str(dtype)[6:]}), "
              f"{fraction:.0%} of heads flagged; microseconds")
        print(f"{'B':>3} {'H':>3} {'KV':>3} {'n':>5} {'D':>4} {'sdpa':>8} {'fused 0%':>9} "
              f"{'fused':>8} {'eager':>9} {'0%/sdpa':>8} {'flag/sdpa':>9} {'eager/flag':>10}")
    gen = torch.Generator().manual_seed(0)
    for batch, heads, kv_heads, n, dim in shapes:
        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(device, dtype)

        # q, k, v: [batch, query_pos / key_pos, heads, head_dim] storage seen as
        # [batch, heads, query_pos / key_pos, head_dim], as Hugging Face hands it over
        q = rand(batch, n, heads, dim).transpose(1, 2)
        k, v = rand(batch, n, kv_heads, dim).transpose(1, 2), rand(batch, n, kv_heads, dim).transpose(1, 2)
        flags = torch.zeros(heads, dtype=torch.bool)
        flags[torch.randperm(heads, generator=gen)[: max(1, round(fraction * heads))]] = True
        probs = torch.rand(batch, int(flags.sum()), n, n, generator=gen).tril()
        probs = (probs / probs.sum(-1, keepdim=True)).to(device, dtype)
        sdpa_call = partial(torch.nn.functional.scaled_dot_product_attention, q, k, v,
                            is_causal=True, enable_gqa=True)
        sdpa = _layer_seconds(sdpa_call, device)
        plain = _layer_seconds(partial(override_attention, q, k, v), device)
        fused = _layer_seconds(partial(override_attention, q, k, v, flags, probs), device)
        eager = _layer_seconds(partial(override_attention, q, k, v, flags, probs,
                                       impl="reference"), device)
        row = {"device": _device_name(device), "dtype": str(dtype)[6:], "B": batch, "H": heads,
               "KV": kv_heads, "n": n, "D": dim, "sdpa_us": sdpa * 1e6, "fused_0_us": plain * 1e6,
               "fused_us": fused * 1e6, "eager_us": eager * 1e6, "fraction": fraction}
        rows.append(row)
        if verbose:
            print(f"{batch:>3} {heads:>3} {kv_heads:>3} {n:>5} {dim:>4} {sdpa * 1e6:>8.1f} "
                  f"{plain * 1e6:>9.1f} {fused * 1e6:>8.1f} {eager * 1e6:>9.1f} "
                  f"{plain / sdpa:>8.2f} {fused / sdpa:>9.2f} {eager / fused:>10.1f}", flush=True)
    return rows
