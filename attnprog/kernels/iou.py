"""Sum-min: the one reduction behind soft IoU, for P programs × H heads × S texts at once.

The paper's soft IoU of a program matrix Â and a head's attention A on one text is

    IoU = Σ_c min(A_c, Â_c) / Σ_c max(A_c, Â_c)          (c: the text's causal cells)

and since max(a, b) = a + b − min(a, b), the denominator is ΣA + ΣÂ − Σmin. So all we need
is the sum-min tensor plus two cheap row sums per text:

    M[p, h, s] = Σ_{c in text s} min(prog[p, c], attn[h, c])

Both inputs use the packed causal layout: row r of ``programs [P, C]`` or ``attention [H, C]``
holds the lower triangles of all S texts back to back, text s in ``offsets[s]:offsets[s+1]``.

The naive way. The authors loop in Python over (program, head, text) and call
``np.minimum(a, b).sum() / np.maximum(a, b).sum()`` on n × n matrices: per triple, four
full passes over 2·n² values, plus ~microseconds of interpreter overhead per call. With
P = 4096, H = 270, S = 300 texts of n = 64 that is 3.3e8 calls, about a month at the
~8 µs per triple measured on a 2-core machine. Broadcasting in torch removes the interpreter
but materialises ``min(prog[:, None, :], attn[None, :, :])``, a [P, H, n_s] temporary per
text, written and read back from memory: each pair-cell costs 8 bytes of traffic for two
flops, so it runs at memory speed (~7e8 pair-cells/s on 2 CPU cores).

The shape of the fix. M is a GEMM with (min, +) in place of (×, +): for each text, the
[P, n_s] program block "times" the transposed [H, n_s] attention block. Tensor cores only
multiply, so we tile it like a CUDA-core GEMM: one program instance owns a
BLOCK_P × BLOCK_H tile of M for one text, keeps the tile in registers in fp32, and walks
the text's cells BLOCK_C at a time. Each step loads (BLOCK_P + BLOCK_H) · BLOCK_C values
and does BLOCK_P · BLOCK_H · BLOCK_C min+add pairs, so with 64 × 64 tiles every loaded
value feeds 32 pairs and the kernel is bound by arithmetic, not memory.

The hardware bound (H100 SXM). min and add are two separate fp32 instructions (there is
no fused min-add). An SM issues 128 fp32 lane-operations per clock, so at the 1.98 GHz
boost clock 132 SMs do 132 · 128 · 1.98e9 = 3.35e13 lane-ops/s, i.e. 1.67e13 pair-cells/s
(~1.7e13) at two instructions per pair. The same figure comes out if FMNMX issues on the
64-lane/clock ALU pipe while the adds go to the FMA pipe: 132 · 64 · 1.98e9 = 1.67e13.
fp16/bf16 inputs halve the bytes but not the instruction count (we accumulate in fp32).

The CPU path is the same reduction in numba, parallel over (text, program block) work
items and vectorised over heads: for each cell it broadcasts one program value against a
64-head slice of the cell-major attention and updates a [block_p, 64] accumulator that
stays in L1. Program matrices are mostly zeros (one-hot rows, a few tokens per row), and
min(0, a) = 0 for a ≥ 0, so zero program cells are skipped outright.

Inputs must be finite and non-negative (attention and normalised program outputs are);
callers sanitise failed programs first. This module imports nothing from attnprog.
Entry points: :func:`sum_min`, :func:`text_sums`, :func:`iou_from_sums`, :func:`soft_iou`.
"""

from __future__ import annotations

import numpy as np
import torch

from attnprog.kernels.fallback import TritonFallback

try:  # numba is the CPU path; without it CPU tensors use the torch reference
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None

try:  # Triton is optional: CPU-only installs use numba or torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None

__all__ = [
    "IMPLS",
    "cell_major",
    "iou_from_sums",
    "resolve_impl",
    "soft_iou",
    "sum_min",
    "sum_min_numba",
    "sum_min_torch",
    "sum_min_triton",
    "text_sums",
]

IMPLS = ("auto", "triton", "numba", "torch")


# --- checks shared by every path --------------------------------------------------------------


def _check(programs: torch.Tensor, attention: torch.Tensor, offsets) -> torch.Tensor:
    """Validate shapes; return offsets as an int64 CPU tensor."""
    if programs.ndim != 2 or attention.ndim != 2:
        raise ValueError(
            f"programs and attention must be 2-D [rows, cells], got {tuple(programs.shape)} "
            f"and {tuple(attention.shape)}"
        )
    offsets = torch.as_tensor(offsets, dtype=torch.int64).cpu()
    if offsets.ndim != 1 or offsets.numel() < 1 or int(offsets[0]) != 0:
        raise ValueError("offsets must be a 1-D [S + 1] sequence starting at 0")
    n_cells = int(offsets[-1])
    if programs.shape[1] != n_cells or attention.shape[1] != n_cells:
        raise ValueError(
            f"offsets end at {n_cells} cells but programs have {programs.shape[1]} and "
            f"attention {attention.shape[1]}"
        )
    if bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("offsets must be non-decreasing")
    return offsets


# --- torch reference: chunked broadcasting ----------------------------------------------------


def sum_min_torch(
    programs: torch.Tensor, attention: torch.Tensor, offsets, chunk_elements: int = 1 << 24
) -> torch.Tensor:
    """Reference M [P, H, S]: per text, min over a broadcast [p_chunk, H, n_s] block.

    Sums in fp32 (fp64 when an input is fp64, for tests). ``chunk_elements`` caps the
    temporary (default 16 M floats = 64 MiB).
    """
    offsets = _check(programs, attention, offsets)
    n_programs, n_heads, n_texts = programs.shape[0], attention.shape[0], offsets.numel() - 1
    wide = torch.float64 in (programs.dtype, attention.dtype)
    acc_dtype = torch.float64 if wide else torch.float32
    out = torch.zeros(n_programs, n_heads, n_texts, dtype=acc_dtype, device=programs.device)
    for s in range(n_texts):
        start, end = int(offsets[s]), int(offsets[s + 1])
        if end == start or n_programs == 0 or n_heads == 0:
            continue
        attn = attention[:, start:end].to(acc_dtype)  # [H, n_s]
        step = max(1, chunk_elements // (n_heads * (end - start)))
        for p0 in range(0, n_programs, step):
            prog = programs[p0 : p0 + step, start:end].to(acc_dtype)  # [p, n_s]
            out[p0 : p0 + step, :, s] = torch.minimum(prog[:, None, :], attn[None, :, :]).sum(-1)
    return out


# --- CPU path: numba, vectorised over heads ---------------------------------------------------

HEAD_TILE = 64  # heads per inner loop: 4 AVX-512 (8 AVX2) vectors, a constant LLVM unrolls
CPU_BLOCK_P = 16  # programs per work item: the [16, 64] slice of the accumulator is 4 KiB, in L1
CPU_SEGMENT = 1024  # cells gathered at a time, so long texts need only a bounded buffer

if numba is not None:

    @numba.njit(fastmath=True, cache=True)
    def _block_dense(prog, attn_t, start, end, p0, p1, acc):
        # acc [p1 - p0, H_pad] += sum-min of programs p0:p1 over cells start:end, every cell
        tile_acc = np.empty((p1 - p0, HEAD_TILE), np.float32)
        for tile in range(attn_t.shape[1] // HEAD_TILE):
            # One 64-head slice at a time: a contiguous [block_p, 64] tile stays in L1.
            h0 = tile * HEAD_TILE
            tile_acc[:] = 0.0
            for c in range(start, end):
                for p in range(p1 - p0):
                    v = prog[p0 + p, c]
                    if v != 0.0:
                        for h in range(HEAD_TILE):  # unit stride: vectorised min + add
                            tile_acc[p, h] += min(v, attn_t[c, h0 + h])
            acc[:, h0 : h0 + HEAD_TILE] += tile_acc

    @numba.njit(fastmath=True, cache=True)
    def _block_sparse(prog, attn_t, start, end, p0, p1, acc):
        # As _block_dense, but first gathers the non-zero program cells, CPU_SEGMENT cells at
        # a time (a bounded buffer for long texts), so the head loops run only where there is work.
        nz_cell = np.empty((p1 - p0) * CPU_SEGMENT, np.int64)
        nz_prog = np.empty((p1 - p0) * CPU_SEGMENT, np.int64)
        nz_val = np.empty((p1 - p0) * CPU_SEGMENT, np.float32)
        tile_acc = np.empty((p1 - p0, HEAD_TILE), np.float32)
        for seg0 in range(start, end, CPU_SEGMENT):
            count = 0
            for c in range(seg0, min(end, seg0 + CPU_SEGMENT)):
                for p in range(p1 - p0):
                    v = prog[p0 + p, c]
                    if v != 0.0:
                        nz_cell[count] = c
                        nz_prog[count] = p
                        nz_val[count] = v
                        count += 1
            for tile in range(attn_t.shape[1] // HEAD_TILE):
                h0 = tile * HEAD_TILE
                tile_acc[:] = 0.0
                for k in range(count):
                    c, p, v = nz_cell[k], nz_prog[k], nz_val[k]
                    for h in range(HEAD_TILE):
                        tile_acc[p, h] += min(v, attn_t[c, h0 + h])
                acc[:, h0 : h0 + HEAD_TILE] += tile_acc

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _sum_min_cells(prog, attn_t, offsets, out, block_p):
        # prog [P, C] f32; attn_t [C, H_pad] f32 (cell-major); out [S, P, H_pad] f32
        n_programs = prog.shape[0]
        n_texts = offsets.shape[0] - 1
        n_blocks = (n_programs + block_p - 1) // block_p
        for item in numba.prange(n_texts * n_blocks):  # work item: (text, program block)
            s = item // n_blocks
            p0 = (item % n_blocks) * block_p
            p1 = min(n_programs, p0 + block_p)
            start, end = offsets[s], offsets[s + 1]
            acc = np.zeros((p1 - p0, attn_t.shape[1]), np.float32)
            # min(0, a) = 0 and most program cells are 0 (one-hot rows): a sparse block
            # gathers its non-zero cells first, a dense one walks every cell.
            n_nonzero = 0
            for p in range(p0, p1):
                for c in range(start, end):
                    n_nonzero += prog[p, c] != 0.0
            if 4 * n_nonzero > (end - start) * (p1 - p0):
                _block_dense(prog, attn_t, start, end, p0, p1, acc)
            else:
                _block_sparse(prog, attn_t, start, end, p0, p1, acc)
            out[s, p0:p1, :] = acc


def cell_major(attention: torch.Tensor) -> torch.Tensor:
    """attention [H, C] -> fp32 [C, H_pad] on the CPU, heads padded to whole HEAD_TILEs.

    The numba path's layout: one cell's heads are contiguous, so its inner loop is a
    unit-stride vector op. Build it once and pass it to :func:`sum_min_numba` when scoring
    many program chunks against the same attention.
    """
    n_heads, n_cells = attention.shape
    n_pad = -(-n_heads // HEAD_TILE) * HEAD_TILE
    attn_t = torch.zeros(n_cells, n_pad, dtype=torch.float32)  # padding heads stay 0
    attn_t[:, :n_heads] = attention.detach().cpu().float().T
    return attn_t


def sum_min_numba(
    programs: torch.Tensor,
    attention: torch.Tensor,
    offsets,
    block_p: int = CPU_BLOCK_P,
    attention_cell_major: torch.Tensor | None = None,
) -> torch.Tensor:
    """M [P, H, S] on the CPU with numba (all cores); inputs of any float dtype, fp32 sums.

    ``attention_cell_major``: :func:`cell_major` of ``attention``, if already built.
    """
    if numba is None:
        raise ValueError("numba is not installed; use impl='torch'")
    offsets = _check(programs, attention, offsets)
    n_programs, n_heads = programs.shape[0], attention.shape[0]
    n_texts = offsets.numel() - 1
    if n_programs == 0 or n_heads == 0 or n_texts == 0:
        return torch.zeros(n_programs, n_heads, n_texts, dtype=torch.float32)
    prog = np.ascontiguousarray(programs.detach().cpu().float().numpy())  # [P, C]
    attn_t = cell_major(attention) if attention_cell_major is None else attention_cell_major
    if attn_t.shape[0] != attention.shape[1] or attn_t.shape[1] % HEAD_TILE:
        raise ValueError("attention_cell_major does not match attention; build it with cell_major")
    out = np.empty((n_texts, n_programs, attn_t.shape[1]), dtype=np.float32)  # [S, P, H_pad]
    _sum_min_cells(prog, attn_t.numpy(), offsets.numpy(), out, int(block_p))
    return torch.from_numpy(out[:, :, :n_heads]).permute(1, 2, 0).contiguous()


# --- GPU path: the Triton kernel --------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _sum_min_kernel(
        prog_ptr,  # [P, C] any float dtype
        attn_ptr,  # [H, C]
        offsets_ptr,  # [S + 1] int64
        out_ptr,  # [P, H, S] fp32
        n_programs,
        n_heads,
        n_tiles_p,
        n_tiles_h,
        stride_prog,
        stride_attn,
        stride_out_p,
        stride_out_h,
        BLOCK_P: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # One instance = one BLOCK_P x BLOCK_H tile of M for one text. The 1-D grid is
        # ordered head tile fastest, then program tile, then text: neighbouring instances
        # share a text, so its attention and the current program tile stay in L2.
        pid = tl.program_id(0)
        tile_h = pid % n_tiles_h
        tile_p = (pid // n_tiles_h) % n_tiles_p
        text = pid // (n_tiles_h * n_tiles_p)

        start = tl.load(offsets_ptr + text)  # int64: packed corpora pass 2^31 cells
        end = tl.load(offsets_ptr + text + 1)

        offs_p = tile_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_h = tile_h * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_p = offs_p < n_programs
        mask_h = offs_h < n_heads
        prog_rows = prog_ptr + offs_p.to(tl.int64)[:, None] * stride_prog  # [BP, 1]
        attn_rows = attn_ptr + offs_h.to(tl.int64)[:, None] * stride_attn  # [BH, 1]

        acc = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
        for c0 in range(start, end, BLOCK_C):
            cells = c0 + tl.arange(0, BLOCK_C)
            mask_c = cells < end
            # Out-of-range rows and cells load as 0: min(0, a) = 0 adds nothing.
            prog = tl.load(
                prog_rows + cells[None, :], mask=mask_p[:, None] & mask_c[None, :], other=0.0
            ).to(tl.float32)  # [BP, BC]
            attn = tl.load(
                attn_rows + cells[None, :], mask=mask_h[:, None] & mask_c[None, :], other=0.0
            ).to(tl.float32)  # [BH, BC]
            # The "GEMM" step with min in place of multiply: [BP, 1, BC] vs [1, BH, BC].
            acc += tl.sum(tl.minimum(prog[:, None, :], attn[None, :, :]), axis=2)

        out = (
            out_ptr
            + offs_p.to(tl.int64)[:, None] * stride_out_p
            + offs_h.to(tl.int64)[None, :] * stride_out_h
            + text
        )
        tl.store(out, acc, mask=mask_p[:, None] & mask_h[None, :])


def _interpreted() -> bool:
    """Whether the kernel was built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_sum_min_kernel, InterpretedFunction)


def _pick_tiles(n_programs: int, n_heads: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_H, BLOCK_C, num_warps) for a launch.

    64 x 64 fp32 accumulators over 4 warps are 32 registers a thread; BLOCK_C bounds the
    [BP, BH, BC] min temporary (64 x 64 x 4 / 128 threads = 128 values a thread). Small P or H
    shrink the tile so few lanes are masked off. Untuned heuristics: `attnprog bench` times
    them on the GPU at hand.
    """
    block_p = min(64, max(16, triton.next_power_of_2(n_programs)))
    block_h = min(64, max(16, triton.next_power_of_2(n_heads)))
    block_c = 8 if dtype in (torch.float16, torch.bfloat16) and block_p * block_h <= 2048 else 4
    num_warps = 4 if block_p * block_h <= 4096 else 8
    return block_p, block_h, block_c, num_warps


def sum_min_triton(
    programs: torch.Tensor,
    attention: torch.Tensor,
    offsets,
    block_p: int | None = None,
    block_h: int | None = None,
    block_c: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """M [P, H, S] fp32 with the Triton kernel; CPU tensors run in Triton's interpreter.

    Tile sizes default to :func:`_pick_tiles`; pass them to test masking or to tune.
    """
    if triton is None:
        raise ValueError("Triton is not installed; use impl='numba' or impl='torch'")
    offsets = _check(programs, attention, offsets)
    n_programs, n_heads, n_texts = programs.shape[0], attention.shape[0], offsets.numel() - 1
    device = programs.device
    if attention.device != device:
        raise ValueError(f"programs on {device} but attention on {attention.device}")
    if device.type != "cuda" and not _interpreted():
        raise ValueError(
            "the Triton kernel needs CUDA tensors; to run it on the CPU set TRITON_INTERPRET=1 "
            "before triton is first imported"
        )
    out = torch.zeros(n_programs, n_heads, n_texts, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    picked = _pick_tiles(n_programs, n_heads, programs.dtype)
    block_p, block_h, block_c, num_warps = (
        given or default for given, default in zip((block_p, block_h, block_c, num_warps), picked)
    )
    programs = programs if programs.stride(1) == 1 else programs.contiguous()
    attention = attention if attention.stride(1) == 1 else attention.contiguous()
    n_tiles_p, n_tiles_h = triton.cdiv(n_programs, block_p), triton.cdiv(n_heads, block_h)
    grid = (n_tiles_h * n_tiles_p * n_texts,)  # 1-D: CUDA caps grid axes 1 and 2 at 65535
    _sum_min_kernel[grid](
        programs,
        attention,
        offsets.to(device),
        out,
        n_programs,
        n_heads,
        n_tiles_p,
        n_tiles_h,
        programs.stride(0),
        attention.stride(0),
        out.stride(0),
        out.stride(1),
        BLOCK_P=block_p,
        BLOCK_H=block_h,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out


# --- dispatch and the IoU itself --------------------------------------------------------------


def resolve_impl(impl: str, device: torch.device) -> str:
    """The path "auto" means on ``device``: Triton on CUDA, numba (or torch) on the CPU."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if torch.device(device).type == "cuda" and triton is not None:
        return "torch" if TRITON_FALLBACK.failed else "triton"
    return "numba" if numba is not None else "torch"


# after the Triton kernel, chosen by "auto", fails on this GPU, "auto" takes the torch path
TRITON_FALLBACK = TritonFallback("sum-min")


def sum_min(
    programs: torch.Tensor, attention: torch.Tensor, offsets, impl: str = "auto"
) -> torch.Tensor:
    """M[p, h, s] = Σ_{c in text s} min(programs[p, c], attention[h, c]), fp32 [P, H, S].

    programs [P, C], attention [H, C]: fp16/bf16/fp32, finite, non-negative, same device.
    impl: "auto" (Triton on CUDA, numba on CPU), or force "triton", "numba" or "torch".
    """
    chosen = resolve_impl(impl, programs.device)
    if chosen == "triton" and impl == "auto":
        try:
            return sum_min_triton(programs, attention, offsets)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - any compile/launch failure falls back, loudly
            TRITON_FALLBACK.record(err)
            return sum_min_torch(programs, attention, offsets)
    impl = chosen
    if impl == "triton":
        return sum_min_triton(programs, attention, offsets)
    if impl == "numba":
        return sum_min_numba(programs, attention, offsets).to(programs.device)
    return sum_min_torch(programs, attention, offsets)


def text_sums(values: torch.Tensor, offsets) -> torch.Tensor:
    """Σ over each text's cells of every row: values [R, C] -> [R, S] fp32."""
    offsets = torch.as_tensor(offsets, dtype=torch.int64).cpu()
    n_texts = offsets.numel() - 1
    if values.shape[1] != int(offsets[-1]):
        raise ValueError(f"offsets end at {int(offsets[-1])} cells, values have {values.shape[1]}")
    text_of_cell = torch.repeat_interleave(torch.arange(n_texts), offsets[1:] - offsets[:-1])
    out = torch.zeros(values.shape[0], n_texts, dtype=torch.float32, device=values.device)
    return out.index_add_(1, text_of_cell.to(values.device), values.float())


def iou_from_sums(
    sum_min: torch.Tensor, prog_sums: torch.Tensor, attn_sums: torch.Tensor
) -> torch.Tensor:
    """IoU [P, H, S] = M / (ΣÂ + ΣA − M); 0 where the union is empty, clamped to [0, 1].

    sum_min [P, H, S], prog_sums [P, S], attn_sums [H, S].
    """
    union = prog_sums[:, None, :] + attn_sums[None, :, :] - sum_min
    iou = torch.where(union > 0, sum_min / union.clamp_min(1e-30), torch.zeros_like(sum_min))
    return torch.nan_to_num_(iou, nan=0.0).clamp_(0.0, 1.0)


def soft_iou(
    programs: torch.Tensor, attention: torch.Tensor, offsets, impl: str = "auto"
) -> torch.Tensor:
    """Soft IoU [P, H, S] of every program against every head on every text."""
    m = sum_min(programs, attention, offsets, impl=impl)
    return iou_from_sums(m, text_sums(programs, offsets), text_sums(attention, offsets))
