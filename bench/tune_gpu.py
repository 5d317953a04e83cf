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

from attnprog.engine.bench import hardware_bound, make_bench_data
from attnprog.kernels import iou
from attnprog.kernels.override import override_attention_triton

SHAPES = ((256, 144), (1024, 270), (4096, 704))
DENSE = [  # (BLOCK_P, BLOCK_H, UNROLL, num_warps, TILE3D)
    (128, 64, 4, 4, False), (128, 64, 8, 4, False), (64, 64, 4, 4, False),
    (128, 128, 4, 8, False), (128, 128, 4, 4, False), (64, 128, 4, 4, False),
    (256, 64, 4, 8, False), (128, 32, 4, 4, False), (256, 32, 4, 4, False),
    (128, 64, 4, 8, False), (64, 64, 4, 2, False), (256, 128, 4, 8, False),
    (128, 64, 8, 4, True), (64, 64, 8, 4, True), (128, 128, 8, 8, True), (128, 64, 4, 4, True),
]


def tune_dense(bound):
    for n_programs, n_heads in SHAPES:
        data = make_bench_data(n_programs, n_heads, 32, 64, "dense", "cuda")
        ref = iou.sum_min_torch(data.programs[:64].double(), data.attention.double(), data.offsets)
        layout = iou.device_layout(data.attention, data.offsets)
        for bp, bh, unroll, warps, tile3d in DENSE:
            p_pad = -(-n_programs // bp) * bp
            prog_t = iou.programs_cell_major(data.programs, layout, p_pad)
            mask = torch.ones(p_pad // bp, 32, dtype=torch.bool)
            items = iou._items(mask, "cuda")
            out = torch.full((n_programs, n_heads, 32), float("nan"), device="cuda")
            try:
                kernel = iou._launch_dense(prog_t, layout, items, out, bp, bh, unroll, warps, tile3d)
                err = (out[:64].double() - ref).abs().max().item() / ref.abs().max().item()
                ms = do_bench(lambda: iou._launch_dense(prog_t, layout, items, out, bp, bh, unroll,
                                                        warps, tile3d), warmup=25, rep=150,
                              return_mode="median")
            except Exception as e:  # noqa: BLE001
                print(f"dense P={n_programs} H={n_heads} {bp}x{bh} u{unroll} w{warps} 3d={tile3d}: "
                      f"FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rate = data.pair_cells / (ms * 1e-3)
            print(f"dense P={n_programs:5d} H={n_heads:4d} {bp:3d}x{bh:3d} u{unroll} w{warps} "
                  f"3d={int(tile3d)}: {ms:8.3f} ms {rate:.3e}/s {rate / bound:6.1%} regs "
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
        ref = iou.sum_min_torch(data.programs[:64].double(), data.attention.double(), data.offsets)
        for bp in (64, 128):
            p_pad = -(-n_programs // bp) * bp
            plan_ms = do_bench(lambda: iou._sparse_plan(data.programs, layout, bp, p_pad, "sparse"),
                               warmup=3, rep=50, return_mode="median")
            plan = iou._sparse_plan(data.programs, layout, bp, p_pad, "sparse")
            items = iou._items(plan.sparse, "cuda")
            widths = plan.width.float().mean().item()
            for bh, warps in ((32, 2), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8)):
                out = torch.full((n_programs, n_heads, 32), float("nan"), device="cuda")
                kernel = iou._launch_sparse(plan, layout, items, out, bp, bh, warps)
                err = (out[:64].double() - ref).abs().max().item() / ref.abs().max().item()
                ms = do_bench(lambda: iou._launch_sparse(plan, layout, items, out, bp, bh, warps),
                              warmup=25, rep=150, return_mode="median")
                rate = data.pair_cells / (ms * 1e-3)
                print(f"sparse P={n_programs:5d} H={n_heads:4d} bp{bp} bh{bh} w{warps} mean width "
                      f"{widths:.0f}/2080: {ms:8.3f} ms equiv {rate:.3e}/s {rate / bound:6.1%} "
                      f"regs {kernel.n_regs} relerr {err:.1e}; plan {plan_ms:.3f} ms", flush=True)
        for mode in ("auto", "dense"):
            ms = do_bench(lambda: iou.sum_min_triton(data.programs, data.attention, data.offsets,
                                                     layout=layout, mode=mode),
                          warmup=5, rep=150, return_mode="median")
            print(f"sparse-data P={n_programs} H={n_heads} sum_min_triton mode={mode} end to end "
                  f"{ms:.3f} ms {data.pair_cells / (ms * 1e-3):.3e}/s", flush=True)


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


if __name__ == "__main__":
    what = sys.argv[1:] or ["iou", "sparse", "override"]
    bound, note = hardware_bound("cuda")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; "
          f"bound {bound:.3e} pair-cells/s ({note})", flush=True)
    if "iou" in what:
        tune_dense(bound)
    if "sparse" in what:
        tune_sparse(bound)
    if "override" in what:
        tune_override()
