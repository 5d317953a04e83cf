# ruff: noqa: B023, E501  (lambdas are timed at once, inside their loop; long report lines)
"""Tile sweeps for the GPU kernels, run on a lent GPU: sum-min (dense and sparse) and override.

    python bench/tune_gpu.py [iou|sparse|override ...]

Prints one line per (shape, configuration): rate, registers, spills. Not a test; the chosen
configurations are written into attnprog/kernels/*.py by hand and recorded in bench/RESULTS.md.
"""

import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from attnprog.kernels import iou
from attnprog.kernels.bench import hardware_bound, make_bench_data
from attnprog.kernels.override import override_attention_triton

SHAPES = ((256, 144), (1024, 270), (4096, 704))
DENSE = [  # (BLOCK_P, BLOCK_H, UNROLL, num_warps, splits of each text's cells; 0: automatic)
    (64, 64, 4, 2, 1), (64, 64, 4, 2, 0), (128, 32, 4, 2, 0), (128, 64, 4, 4, 0),
    (64, 32, 4, 1, 0),
]


def tune_dense(bound):
    for n_programs, n_heads in SHAPES:
        data = make_bench_data(n_programs, n_heads, 32, 64, "dense", "cuda")
        ref = iou.sum_min_torch(data.programs[:64].double(), data.attention.double(), data.offsets)
        layout = iou.device_layout(data.attention, data.offsets)
        for bp, bh, unroll, warps, splits in DENSE:
            p_pad = -(-n_programs // bp) * bp
            prog_t = iou.programs_cell_major(data.programs, layout, p_pad)
            mask = torch.ones(p_pad // bp, 32, dtype=torch.bool)
            items = iou._items(mask, "cuda")
            n_tiles_h = -(-n_heads // bh)
            splits = splits or iou._n_splits(items[0].numel() * n_tiles_h, 2080, "cuda")
            out = torch.zeros((n_programs, n_heads, 32), device="cuda")
            try:
                kernel = iou._launch_dense(prog_t, layout, items, out, bp, bh, unroll, warps, splits)
                err = (out[:64].double() - ref).abs().max().item() / ref.abs().max().item()
                ms = do_bench(lambda: iou._launch_dense(prog_t, layout, items, out, bp, bh, unroll,
                                                        warps, splits), warmup=25, rep=150,
                              return_mode="median")
            except Exception as e:  # noqa: BLE001
                print(f"dense P={n_programs} H={n_heads} {bp}x{bh} u{unroll} w{warps} splits={splits}: "
                      f"FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rate = data.pair_cells / (ms * 1e-3)
            print(f"dense P={n_programs:5d} H={n_heads:4d} {bp:3d}x{bh:3d} u{unroll} w{warps} "
                  f"splits={splits}: {ms:8.3f} ms {rate:.3e}/s {rate / bound:6.1%} regs "
                  f"{kernel.n_regs} spills {kernel.n_spills} relerr {err:.1e}", flush=True)
        full = do_bench(lambda: iou.sum_min_triton(data.programs, data.attention, data.offsets,
                                                   layout=layout, mode="dense"),
                        warmup=25, rep=150, return_mode="median")
        torch_ms = do_bench(lambda: iou.sum_min_torch(data.programs[:256], data.attention,
                                                      data.offsets), warmup=5, rep=100,
                            return_mode="median")
        torch_rate = min(256, n_programs) * n_heads * data.programs.shape[1] / (torch_ms * 1e-3)
        print(f"dense P={n_programs} H={n_heads} sum_min_triton end to end {full:.3f} ms "
              f"{data.pair_cells / (full * 1e-3):.3e}/s; torch {torch_rate:.3e}/s", flush=True)


def tune_sparse(bound):
    for n_programs, n_heads in SHAPES:
        data = make_bench_data(n_programs, n_heads, 32, 64, "sparse", "cuda")
        layout = iou.device_layout(data.attention, data.offsets)
        ref = iou.sum_min_torch(data.programs.double(), data.attention.double(), data.offsets)
        bp = iou._pick_tiles(n_programs, n_heads)[0]
        p_pad = -(-n_programs // bp) * bp
        counts = iou._row_nonzeros(data.programs, layout)
        order = torch.argsort(counts.sum(1), stable=True)
        for sort in (False, True):
            programs = data.programs[order] if sort else data.programs
            plan = iou._sparse_plan(programs, layout, bp, p_pad, "sparse")
            items = iou._items(plan.sparse, "cuda")
            widths = plan.width.float().mean().item()
            bh, warps = iou._sparse_tiles(bp, n_heads)
            out = torch.zeros((n_programs, n_heads, 32), device="cuda")
            kernel = iou._launch_sparse(plan, layout, items, out, bp, bh, warps)
            ms = do_bench(lambda: iou._launch_sparse(plan, layout, items, out, bp, bh, warps),
                          warmup=25, rep=150, return_mode="median")
            rate = data.pair_cells / (ms * 1e-3)
            print(f"sparse kernel P={n_programs:5d} H={n_heads:4d} bp{bp} bh{bh} w{warps} sorted={sort} "
                  f"mean width {widths:.0f}/2080: {ms:8.3f} ms equiv {rate:.3e}/s {rate / bound:6.1%} "
                  f"regs {kernel.n_regs}", flush=True)
        for mode in ("auto", "dense", "sparse"):
            got = iou.sum_min_triton(data.programs, data.attention, data.offsets, layout=layout,
                                     mode=mode)
            err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
            ms = do_bench(lambda: iou.sum_min_triton(data.programs, data.attention, data.offsets,
                                                     layout=layout, mode=mode),
                          warmup=5, rep=150, return_mode="median")
            rate = data.pair_cells / (ms * 1e-3)
            print(f"sparse-data P={n_programs} H={n_heads} sum_min_triton mode={mode} end to end "
                  f"{ms:.3f} ms {rate:.3e}/s {rate / bound:6.1%} relerr {err:.1e}", flush=True)


OVERRIDE_SHAPES = (  # (B, H, H_kv, n, D)
    (16, 9, 3, 256, 64), (4, 32, 8, 1024, 64), (1, 32, 8, 4096, 64), (4, 16, 4, 1024, 128),
    (1, 16, 4, 4096, 128), (16, 16, 4, 256, 128),
)
OVERRIDE_TILES = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3),
                  (128, 32, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 8, 4),
                  (128, 64, 4, 4), (64, 64, 4, 4)]


def tune_override():
    for dtype in (torch.float16, torch.bfloat16):
        for batch, heads, kv_heads, n, dim in OVERRIDE_SHAPES:
            q = torch.randn(batch, n, heads, dim, device="cuda", dtype=dtype).transpose(1, 2)
            k = torch.randn(batch, n, kv_heads, dim, device="cuda", dtype=dtype).transpose(1, 2)
            v = torch.randn(batch, n, kv_heads, dim, device="cuda", dtype=dtype).transpose(1, 2)
            sdpa = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                   enable_gqa=True),
                            warmup=25, rep=150, return_mode="median")
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            line = f"override {str(dtype)[6:]} B{batch} H{heads}/{kv_heads} n{n} D{dim} sdpa {sdpa * 1e3:7.1f} us:"
            for bm, bn, warps, stages in OVERRIDE_TILES:
                try:
                    got = override_attention_triton(q, k, v, None, None, block_m=bm, block_n=bn,
                                                    _num_warps=warps, _num_stages=stages)
                    err = (got.float() - ref.float()).abs().max().item()
                    ms = do_bench(lambda: override_attention_triton(
                        q, k, v, None, None, block_m=bm, block_n=bn, _num_warps=warps,
                        _num_stages=stages), warmup=25, rep=150, return_mode="median")
                    line += f" {bm}x{bn}w{warps}s{stages}={ms / sdpa:.2f}x(e{err:.0e})"
                except Exception as e:  # noqa: BLE001
                    line += f" {bm}x{bn}w{warps}s{stages}=FAIL({type(e).__name__})"
            print(line, flush=True)


def time_rank_stage(store_path: str, pool_path: str) -> None:
    """The rank stage of `attnprog run --device cuda` (rank on selection, winners on held-out)
    for the generator pool on SmolLM2-shaped attention: 270 heads (6 real heads tiled)."""
    import dataclasses
    import time

    from attnprog.engine import rank as rank_mod
    from attnprog.engine.pool import rank_table
    from attnprog.engine.store import AttentionStore
    from attnprog.synth.generator.specs import is_generated
    from attnprog.synth.program import load_pool
    from attnprog.synth.runtime.evaluate import StreamedOutputs

    small = AttentionStore.load(store_path)
    meta = dict(small.meta, n_layers=30, n_heads=9)
    store = dataclasses.replace(small, attn_packed=small.attn_packed.repeat(45, 1).cuda(), meta=meta)
    pool = [p for p in load_pool(pool_path) if is_generated(p)]
    for attempt in range(2):
        outputs = StreamedOutputs(pool, store.sentences(), store.offsets.numpy(), {}, "bench")
        torch.cuda.synchronize()
        start = time.perf_counter()
        rank_mod._device_rows(outputs, torch.device("cuda"))
        atoms = time.perf_counter() - start
        table = rank_table(store, outputs)
        torch.cuda.synchronize()
        total = time.perf_counter() - start
        print(f"rank stage run {attempt}: {len(pool)} programs x {store.n_rows} heads x "
              f"{store.n_texts} texts ({store.n_cells} cells): {total:.2f} s end to end, of "
              f"which {atoms:.2f} s atoms (CPU, {min(16, __import__('os').cpu_count())} processes)"
              f"; heldout mean {table.heldout_iou.mean():.4f}", flush=True)
    check = list(range(0, len(pool), 17))
    numpy_rows = outputs.select(check)  # the numpy path, on the CPU
    gpu = rank_mod.rank(store, rank_mod._Subset(outputs, check), split="selection", per_text=True)
    cpu = rank_mod.rank(store, numpy_rows, split="selection", per_text=True)
    rows_gpu = rank_mod._device_rows(outputs, torch.device("cuda")).rows(check).cpu().numpy()
    print(f"rows: torch vs numpy max |diff| {abs(rows_gpu - numpy_rows.values).max():.2e}; "
          f"per-text IoU max |diff| {(gpu.per_text - cpu.per_text).abs().max():.2e}", flush=True)


if __name__ == "__main__":
    what = sys.argv[1:] or ["iou", "sparse", "override", "rank"]
    bound, note = hardware_bound("cuda")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; "
          f"bound {bound:.3e} pair-cells/s ({note})", flush=True)
    if "iou" in what:
        tune_dense(bound)
    if "sparse" in what:
        tune_sparse(bound)
    if "override" in what:
        tune_override()
    if "rank" in what:
        time_rank_stage("bench_data/store.safetensors", "bench_data/pool.jsonl")
