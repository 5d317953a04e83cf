"""Sum-min: the one reduction behind soft IoU, for P programs × H heads × S texts at once.

The paper's soft IoU of a program matrix Â and a head's attention A on one text is

    IoU = Σ_c min(A_c, Â_c) / Σ_c max(A_c, Â_c)          (c: the text's causal cells)

and since max(a, b) = a + b − min(a, b), the denominator is ΣA + ΣÂ − Σmin. So all we need
is the sum-min tensor plus two cheap row sums per text:

    M[p, h, s] = Σ_{c in text s} min(prog[p, c], attn[h, c])

Both inputs use the packed causal layout: row r of ``programs [programs, cells]`` or
``attention [heads, cells]`` holds the lower triangles of all S texts back to back, text s in
``offsets[s]:offsets[s+1]``.

The naive way. The authors loop in Python over (program, head, text) and call
``np.minimum(a, b).sum() / np.maximum(a, b).sum()`` on n × n matrices: per triple, four
full passes over 2·n² values, plus ~microseconds of interpreter overhead per call. With
P = 4096, H = 270, S = 300 texts of n = 64 that is 3.3e8 calls, about a month at the
~8 µs per triple measured on a 2-core machine. Broadcasting in torch removes the interpreter
but materialises ``min(prog[:, None, :], attn[None, :, :])``, a [programs, heads, cells]
temporary per text, written and read back from memory: each pair-cell costs 8 bytes of traffic for two
flops, so it runs at memory speed (~7e8 pair-cells/s on 2 CPU cores).

The shape of the fix. M is a GEMM with (min, +) in place of (×, +): for each text, the
[programs, cells] program block "times" the transposed [heads, cells] attention block. Tensor cores only
multiply, so we tile it like a CUDA-core GEMM in its outer-product form: one program
instance owns a BLOCK_P × BLOCK_H tile of M for one text, keeps the tile in registers in
fp32, and walks the text's cells one at a time. Both sides are stored cell-major, so a step
loads BLOCK_P contiguous program values and BLOCK_H contiguous attention values and does
BLOCK_P · BLOCK_H min+add pairs: with 64 × 64 tiles every loaded value feeds 32 pairs and
the kernel is bound by arithmetic, not memory. A sparse twin walks only each program's
non-zero cells (see "GPU path" below).

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
callers sanitise failed programs first. This module imports nothing from attnprog but
kernels.fallback. It is the one definition of soft IoU: the table form above is
:func:`soft_iou` (:func:`sum_min`, :func:`text_sums`, :func:`iou_from_sums`); one text is
:func:`pair_iou`, texts of cell-major tensors :func:`segment_iou` (through the L1 identity,
:func:`iou_from_l1`); the empty-union rule is :func:`iou_ratio`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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
    "DeviceLayout",
    "cell_major",
    "device_layout",
    "iou_from_l1",
    "iou_from_l1_grad",
    "iou_from_sums",
    "iou_ratio",
    "pair_iou",
    "resolve_impl",
    "segment_iou",
    "soft_iou",
    "sum_min",
    "sum_min_numba",
    "sum_min_torch",
    "sum_min_triton",
    "text_sums",
    "triton_unavailable",
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


# --- the definition, at the scale of one text -------------------------------------------------
#
# Everything below computes the same number; these small forms say what it is. The empty-union
# rule lives in iou_ratio alone: where Σ max(A, Â) is 0 (both matrices all zero) the IoU is 0,
# and so is a sum that is not a number (a failed program scores 0, never stops a run).

_TINY = 1e-30  # guards the division where the union is empty (that branch is discarded)


def iou_ratio(intersection: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """Σmin / Σmax from the two sums (any matching shapes): 0 where the union is not > 0 or a
    sum is NaN, clamped to [0, 1]. Differentiable; in place when no gradient is recorded."""
    iou = torch.where(union > 0, intersection / union.clamp_min(_TINY),
                      torch.zeros_like(intersection))
    if iou.requires_grad:
        return torch.nan_to_num(iou, nan=0.0).clamp(0.0, 1.0)
    return torch.nan_to_num_(iou, nan=0.0).clamp_(0.0, 1.0)


def pair_iou(predicted, attention) -> float:
    """Soft IoU of one text, the naive reference: Σ min(A, Â) / Σ max(A, Â) over causal cells.

    Reads ``predicted`` and ``attention`` (numpy or torch, any float dtype), both packed causal
    cells ``[cells]`` or both ``[query_pos, key_pos]`` matrices, whose cells above the diagonal are ignored.
    Sums in fp64 on the CPU; returns a float (0 where the union is empty, see :func:`iou_ratio`).
    """
    p, a = (torch.tensor(np.asarray(x, dtype=np.float64)) if not isinstance(x, torch.Tensor)
            else x.detach().cpu().double() for x in (predicted, attention))
    if p.shape != a.shape or p.ndim not in (1, 2) or (p.ndim == 2 and p.shape[0] != p.shape[1]):
        raise ValueError(f"expected two [cells] or two [n, n] arrays, got {tuple(p.shape)} and "
                         f"{tuple(a.shape)}")
    if p.ndim == 2:  # keep the causal cells (i >= j)
        causal = torch.ones(p.shape, dtype=torch.bool).tril()
        p, a = p[causal], a[causal]
    return float(iou_ratio(torch.minimum(p, a).sum(), torch.maximum(p, a).sum()))


def iou_from_l1(total: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """IoU from ``total`` = ΣA + ΣÂ and the L1 distance ``distance`` = Σ|A − Â| of each text.

    min(a, b) = (a + b − |a − b|) / 2 and max(a, b) = (a + b + |a − b|) / 2, so the IoU is
    (total − D) / (total + D), with the rule of :func:`iou_ratio`. The form a gradient uses:
    |a − b| has one kink where min has two branches.
    """
    return iou_ratio(total - distance, total + distance)


def iou_from_l1_grad(total: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """d IoU / d distance of :func:`iou_from_l1` at a fixed total: −2 total / (total + D)²,
    0 where the union is empty."""
    union = total + distance
    return torch.where(union > 0, -2.0 * total / union.clamp_min(_TINY) ** 2,
                       torch.zeros_like(union))


def segment_iou(predicted: torch.Tensor, attention: torch.Tensor, offsets) -> torch.Tensor:
    """Per-text IoU of cell-major tensors: ``predicted``, ``attention`` [cells] or
    [cells, heads] (cells along dim 0, text s in ``offsets[s]:offsets[s+1]``) -> [texts] or
    [texts, heads], differentiable.

    One pass of three segment sums (ΣÂ, ΣA, Σ|A − Â|) and :func:`iou_from_l1`; no loop over texts.
    """
    if predicted.shape != attention.shape:
        raise ValueError(f"shapes differ: {tuple(predicted.shape)} and {tuple(attention.shape)}")
    offsets = torch.as_tensor(offsets, dtype=torch.int64).cpu()
    if offsets.ndim != 1 or int(offsets[0]) != 0 or int(offsets[-1]) != predicted.shape[0]:
        raise ValueError(f"offsets must run from 0 to the {predicted.shape[0]} cells")
    n_texts = offsets.numel() - 1
    text_of_cell = torch.repeat_interleave(torch.arange(n_texts), offsets[1:] - offsets[:-1])
    text_of_cell = text_of_cell.to(predicted.device)

    def per_text(values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros((n_texts, *values.shape[1:]))
        return out.index_add(0, text_of_cell, values)

    total = per_text(predicted) + per_text(attention)
    return iou_from_l1(total, per_text((predicted - attention).abs()))


# --- torch reference: chunked broadcasting ----------------------------------------------------


# Elements of one broadcast temporary. On the CPU 1 M floats (4 MiB) stays in cache; 64 MiB
# temporaries ran 10x slower on the 2-core dev VM (fresh pages every chunk, out of cache).
# On CUDA big launches amortise the launch cost; 16 M is what the GPU figures used.
TORCH_CHUNK = {"cpu": 1 << 20, "cuda": 1 << 24}


def sum_min_torch(
    programs: torch.Tensor, attention: torch.Tensor, offsets, chunk_elements: int | None = None
) -> torch.Tensor:
    """Reference M [programs, heads, texts]: per text, min over a broadcast
    [program chunk, heads, cells of the text] block.

    Sums in fp32 (fp64 when an input is fp64, for tests). ``chunk_elements`` caps the
    temporary (default by device, :data:`TORCH_CHUNK`).
    """
    chunk_elements = chunk_elements or TORCH_CHUNK.get(programs.device.type, TORCH_CHUNK["cuda"])
    offsets = _check(programs, attention, offsets)
    n_programs, n_heads, n_texts = programs.shape[0], attention.shape[0], offsets.numel() - 1
    wide = torch.float64 in (programs.dtype, attention.dtype)
    acc_dtype = torch.float64 if wide else torch.float32
    out = torch.zeros(n_programs, n_heads, n_texts, dtype=acc_dtype, device=programs.device)
    for s in range(n_texts):
        start, end = int(offsets[s]), int(offsets[s + 1])
        if end == start or n_programs == 0 or n_heads == 0:
            continue
        attn = attention[:, start:end].to(acc_dtype)  # [heads, cells] of text s
        step = max(1, chunk_elements // (n_heads * (end - start)))
        for p0 in range(0, n_programs, step):
            prog = programs[p0 : p0 + step, start:end].to(acc_dtype)  # [program chunk, cells]
            out[p0 : p0 + step, :, s] = torch.minimum(prog[:, None, :], attn[None, :, :]).sum(-1)
    return out


# --- CPU path: numba, vectorised over heads ---------------------------------------------------

HEAD_TILE = 64  # heads per inner loop: 4 AVX-512 (8 AVX2) vectors, a constant LLVM unrolls
CPU_BLOCK_P = 16  # programs per work item: the [16, 64] slice of the accumulator is 4 KiB, in L1
CPU_SEGMENT = 1024  # cells gathered at a time, so long texts need only a bounded buffer

if numba is not None:

    @numba.njit(fastmath=True, cache=True)
    def _block_dense(prog, attn_t, start, end, p0, p1, acc):
        # acc [p1 - p0, padded heads] += sum-min of programs p0:p1 over cells start:end, every cell
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
        # prog [programs, cells] f32; attn_t [cells, padded heads] f32 (cell-major);
        # out [texts, programs, padded heads] f32
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
    """attention [heads, cells] -> fp32 [cells, padded heads] (cell-major) on the CPU, heads
    padded to whole HEAD_TILEs.

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
    """M [programs, heads, texts] on the CPU with numba (all cores); inputs of any float dtype, fp32 sums.

    ``attention_cell_major``: :func:`cell_major` of ``attention``, if already built.
    """
    if numba is None:
        raise ValueError("numba is not installed; use impl='torch'")
    offsets = _check(programs, attention, offsets)
    n_programs, n_heads = programs.shape[0], attention.shape[0]
    n_texts = offsets.numel() - 1
    if n_programs == 0 or n_heads == 0 or n_texts == 0:
        return torch.zeros(n_programs, n_heads, n_texts, dtype=torch.float32)
    prog = np.ascontiguousarray(programs.detach().cpu().float().numpy())  # [programs, cells]
    attn_t = cell_major(attention) if attention_cell_major is None else attention_cell_major
    if attn_t.shape[0] != attention.shape[1] or attn_t.shape[1] % HEAD_TILE:
        raise ValueError("attention_cell_major does not match attention; build it with cell_major")
    # [texts, programs, padded heads]
    out = np.empty((n_texts, n_programs, attn_t.shape[1]), dtype=np.float32)
    _sum_min_cells(prog, attn_t.numpy(), offsets.numpy(), out, int(block_p))
    return torch.from_numpy(out[:, :, :n_heads]).permute(1, 2, 0).contiguous()


# --- GPU path: Triton kernels over a cell-major layout ----------------------------------------
#
# The layout. Both sides are transposed to cell-major, [cells, programs] and [cells, heads], and
# each text's cells are padded with zeros to a multiple of CELL_MULTIPLE (min(p, 0) = 0, so
# padding adds nothing).
# One step of the dense kernel then reads one cell: BLOCK_P contiguous program values and
# BLOCK_H contiguous attention values, and updates the [BLOCK_P, BLOCK_H] accumulator with an
# outer "product" (min, then add): two instructions per pair and no mask in the inner loop.
# The attention side is built once per store (:func:`device_layout`) and stays on the device;
# each program chunk is transposed once per call.
#
# The sparse path. Program matrices put their mass on a few cells per row (one-hot rows,
# mixtures of 2-4 tokens). For a block of BLOCK_P programs on one text whose rows have at most
# W non-zero cells, the sparse kernel walks W steps instead of the text's C_s cells: step k
# gathers, for each program, the attention row of its k-th non-zero cell (an ELLPACK layout:
# [W, BLOCK_P] cell indices and values). "auto" picks per (program block, text):
# sparse when SPARSE_COST * W < C_s, once there are SPARSE_MIN_HEADS heads to share the
# planning; programs are sorted by their non-zero count first, so one-hot rows share blocks.

CELL_MULTIPLE = 8  # cells per text are padded to this: UNROLL must divide it
HEAD_MULTIPLE = 128  # heads are padded to this: every BLOCK_H <= 128 tiles them without a mask
SPARSE_COST = 3.0  # one gathered step costs about this many dense steps (tuned on an H100)
# Planning the sparse path (counting, sorting, gathering the non-zeros) makes a few passes over
# the P x C programs, which costs about as much as the dense kernel's P x H x C work at ~250
# heads (H100, bench/RESULTS.md): "auto" plans only from this many heads on.
SPARSE_MIN_HEADS = 256
MODES = ("auto", "dense", "sparse")


@dataclass
class DeviceLayout:
    """The attention side of the sum-min, cell-major and padded, where the kernels read it.

    attention_t [padded cells, padded heads] fp32: row = padded cell, heads contiguous (padding
                is 0)
    cell_index  [cells] int64: packed cell -> its row in the padded layout
    text_of_cell [cells] int64: packed cell -> its text
    offsets, offsets_pad [texts + 1] int64 on the CPU; offsets_pad_device the same on the device
    """

    attention_t: torch.Tensor
    cell_index: torch.Tensor
    text_of_cell: torch.Tensor
    offsets: torch.Tensor
    offsets_pad: torch.Tensor
    offsets_pad_device: torch.Tensor
    n_heads: int

    @property
    def n_texts(self) -> int:
        return self.offsets.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.attention_t.device


def device_layout(attention: torch.Tensor, offsets) -> DeviceLayout:
    """Build the cell-major padded layout of ``attention [heads, cells]`` on its device (once per
    store)."""
    offsets = torch.as_tensor(offsets, dtype=torch.int64).cpu()
    _check(attention[:0], attention, offsets)
    device = attention.device
    lengths = offsets[1:] - offsets[:-1]
    padded = (lengths + CELL_MULTIPLE - 1) // CELL_MULTIPLE * CELL_MULTIPLE
    offsets_pad = torch.zeros_like(offsets)
    offsets_pad[1:] = torch.cumsum(padded, 0)
    n_cells, n_texts = int(offsets[-1]), offsets.numel() - 1
    text_of_cell = torch.repeat_interleave(torch.arange(n_texts), lengths)
    cell_index = torch.arange(n_cells) + (offsets_pad[:-1] - offsets[:-1])[text_of_cell]
    n_heads = attention.shape[0]
    h_pad = max(HEAD_MULTIPLE, -(-n_heads // HEAD_MULTIPLE) * HEAD_MULTIPLE)
    attention_t = torch.zeros(int(offsets_pad[-1]), h_pad, dtype=torch.float32, device=device)
    cell_index, text_of_cell = cell_index.to(device), text_of_cell.to(device)
    attention_t[cell_index, :n_heads] = attention.detach().T.float()
    return DeviceLayout(attention_t, cell_index, text_of_cell, offsets, offsets_pad,
                        offsets_pad.to(device), n_heads)


def programs_cell_major(programs: torch.Tensor, layout: DeviceLayout, p_pad: int) -> torch.Tensor:
    """programs [programs, cells] -> fp32 [padded cells, p_pad] (cell-major) in ``layout``'s
    padded cells (padding is 0)."""
    out = torch.zeros(layout.attention_t.shape[0], p_pad, dtype=torch.float32,
                      device=layout.device)
    # a contiguous transpose first: a scatter that reads the strided view is several times slower
    transposed = programs.detach().float().T.contiguous()  # [cells, programs]
    out[:, : programs.shape[0]].index_copy_(0, layout.cell_index, transposed)
    return out


if triton is not None:

    @triton.jit
    def _sum_min_dense_kernel(
        prog_t_ptr,  # [padded cells, padded programs] fp32, cell-major
        attn_t_ptr,  # [padded cells, padded heads] fp32, cell-major
        offsets_ptr,  # [texts + 1] int64, padded offsets
        item_text_ptr,  # [items] int32: the text of each work item
        item_tile_ptr,  # [items] int32: its program tile
        out_ptr,  # [programs, heads, texts] fp32, zeros when SPLIT
        n_programs,
        n_heads,
        n_tiles_h,
        n_splits,
        split_cells,  # cells per split, a multiple of UNROLL
        stride_prog,
        stride_attn,
        stride_out_p,
        stride_out_h,
        BLOCK_P: tl.constexpr,
        BLOCK_H: tl.constexpr,
        UNROLL: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
        # One instance = one BLOCK_P x BLOCK_H tile of M for one (text, program tile) item and
        # one split of the text's cells (splits add into M atomically: more instances in
        # flight for small P x H, shorter fp32 sums for long texts). Head tiles are fastest
        # in the grid, then splits, so neighbours share the item's program columns in L2.
        pid = tl.program_id(0)
        tile_h = pid % n_tiles_h
        split = (pid // n_tiles_h) % n_splits
        item = pid // (n_tiles_h * n_splits)
        text = tl.load(item_text_ptr + item)
        tile_p = tl.load(item_tile_ptr + item)
        start = tl.load(offsets_ptr + text)  # int64: packed corpora pass 2^31 cells
        end = tl.load(offsets_ptr + text + 1)
        start = start + split * split_cells
        end = tl.minimum(end, start + split_cells)

        offs_p = tile_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_h = tile_h * BLOCK_H + tl.arange(0, BLOCK_H)
        prog = prog_t_ptr + start * stride_prog + offs_p  # [BP] pointers into one cell's row
        attn = attn_t_ptr + start * stride_attn + offs_h  # [BH]
        acc = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
        for _ in range(start, end, UNROLL):  # texts are padded to whole UNROLLs: no mask
            for u in tl.static_range(UNROLL):
                p = tl.load(prog + u * stride_prog)
                a = tl.load(attn + u * stride_attn)
                acc += tl.minimum(p[:, None], a[None, :])  # outer product, min for multiply
            prog += UNROLL * stride_prog
            attn += UNROLL * stride_attn

        out = (out_ptr + offs_p.to(tl.int64)[:, None] * stride_out_p
               + offs_h.to(tl.int64)[None, :] * stride_out_h + text)
        if SPLIT:  # a split past the end of a short text has nothing to add
            rows = tl.where(start < end, n_programs, 0)
            mask = (offs_p < rows)[:, None] & (offs_h < n_heads)[None, :]
            tl.atomic_add(out, acc, mask=mask, sem="relaxed")
        else:
            tl.store(out, acc, mask=(offs_p < n_programs)[:, None] & (offs_h < n_heads)[None, :])

    @triton.jit
    def _sum_min_sparse_kernel(
        cell_ptr,  # [W_total, padded programs] int64: padded cell of each program's k-th non-zero
        value_ptr,  # [W_total, padded programs] fp32: its value (0 pads a short row)
        ell_offsets_ptr,  # [texts] int64: where each text's W_s steps start
        width_ptr,  # [program tiles, texts] int32: steps each (program tile, text) needs
        item_text_ptr,
        item_tile_ptr,
        attn_t_ptr,  # [padded cells, padded heads] fp32, cell-major
        out_ptr,  # [programs, heads, texts] fp32
        n_programs,
        n_heads,
        n_tiles_h,
        n_texts,
        stride_ell,
        stride_attn,
        stride_out_p,
        stride_out_h,
        BLOCK_P: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        pid = tl.program_id(0)
        tile_h = pid % n_tiles_h
        item = pid // n_tiles_h
        text = tl.load(item_text_ptr + item)
        tile_p = tl.load(item_tile_ptr + item)
        base = tl.load(ell_offsets_ptr + text)
        width = tl.load(width_ptr + tile_p * n_texts + text)

        offs_p = tile_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_h = tile_h * BLOCK_H + tl.arange(0, BLOCK_H)
        cells = cell_ptr + base * stride_ell + offs_p
        values = value_ptr + base * stride_ell + offs_p
        acc = tl.zeros((BLOCK_P, BLOCK_H), dtype=tl.float32)
        for _ in range(0, width):
            cell = tl.load(cells)  # [BP] the k-th non-zero cell of each program
            value = tl.load(values)
            # gather: each program's cell row, BLOCK_H contiguous heads (coalesced)
            attn = tl.load(attn_t_ptr + cell[:, None] * stride_attn + offs_h[None, :])
            acc += tl.minimum(value[:, None], attn)
            cells += stride_ell
            values += stride_ell

        out = (out_ptr + offs_p.to(tl.int64)[:, None] * stride_out_p
               + offs_h.to(tl.int64)[None, :] * stride_out_h + text)
        tl.store(out, acc, mask=(offs_p < n_programs)[:, None] & (offs_h < n_heads)[None, :])


def _interpreted() -> bool:
    """Whether the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_sum_min_dense_kernel, InterpretedFunction)


def _pick_tiles(n_programs: int, n_heads: int) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_H, UNROLL, num_warps) of the dense kernel for a launch.

    Swept on an H100 (bench/tune_gpu.py, bench/RESULTS.md): 64 accumulators a thread over
    2 warps ran fastest (64 x 64 tiles: 46 % of the bound, against 40 % for 128 x 64 over
    4 warps), since small instances fit more per SM to hide load latency. BLOCK_H is 32 or
    64, whichever pads the heads less (144 heads: 160, not 192). Small P or H shrink the tile.
    """
    block_h = 64 if -(-n_heads // 64) * 64 <= -(-n_heads // 32) * 32 else 32
    block_h = min(block_h, max(16, triton.next_power_of_2(n_heads)))
    block_p = min(4096 // block_h, max(16, triton.next_power_of_2(n_programs)))
    return block_p, block_h, 4, 2


def _n_splits(n_instances: int, longest: int, device) -> int:
    """Splits of each text's cells: enough instances for ~16 per SM, and fp32 sums of at
    most MAX_SPLIT_CELLS cells, but no split shorter than MIN_SPLIT_CELLS."""
    if torch.device(device).type != "cuda":
        return 1
    sms = _sm_count(torch.device(device).index or 0)
    wanted = max(-(-16 * sms // max(n_instances, 1)), -(-longest // MAX_SPLIT_CELLS))
    return max(1, min(wanted, longest // MIN_SPLIT_CELLS))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


MIN_SPLIT_CELLS = 256
MAX_SPLIT_CELLS = 16384


def _sparse_tiles(block_p: int, n_heads: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps) of the sparse kernel, given the shared BLOCK_P: 32 heads over 2
    warps was the fastest swept (bench/RESULTS.md)."""
    return min(32, max(16, triton.next_power_of_2(n_heads))), 2


@dataclass
class _SparsePlan:
    sparse: torch.Tensor  # [program tiles, texts] bool (CPU): which blocks take the sparse kernel
    width: torch.Tensor  # [program tiles, texts] int32 on the device
    cells: torch.Tensor | None = None  # [W_total, padded programs] int64
    values: torch.Tensor | None = None  # [W_total, padded programs] fp32
    ell_offsets: torch.Tensor | None = None  # [texts] int64 on the device


def _row_nonzeros(programs: torch.Tensor, layout: DeviceLayout, rows: int = 1024) -> torch.Tensor:
    """[programs, texts] fp32: non-zero cells of each program row on each text (exact below 2^24)."""
    counts = torch.zeros(programs.shape[0], layout.n_texts, device=layout.device)
    for r0 in range(0, programs.shape[0], rows):  # bounded temporaries
        nonzero = (programs[r0 : r0 + rows] != 0).float()
        counts[r0 : r0 + rows].index_add_(1, layout.text_of_cell, nonzero)
    return counts


def _sparse_plan(programs: torch.Tensor, layout: DeviceLayout, block_p: int, p_pad: int,
                 mode: str, counts: torch.Tensor | None = None) -> _SparsePlan:
    """Which (program tile, text) blocks are sparse, and their ELLPACK layout."""
    n_programs, n_texts = programs.shape[0], layout.n_texts
    n_tiles_p = p_pad // block_p
    device = layout.device
    if mode == "dense":  # no need to count non-zeros
        return _SparsePlan(torch.zeros(n_tiles_p, n_texts, dtype=torch.bool),
                           torch.zeros(n_tiles_p, n_texts, dtype=torch.int32, device=device))
    padded = torch.zeros(p_pad, n_texts, device=device)
    padded[:n_programs] = _row_nonzeros(programs, layout) if counts is None else counts
    width = padded.view(n_tiles_p, block_p, n_texts).amax(1)  # [program tiles, texts]: steps per block
    padded_lengths = (layout.offsets_pad[1:] - layout.offsets_pad[:-1]).to(device)
    if mode == "sparse":
        sparse = torch.ones(n_tiles_p, n_texts, dtype=torch.bool, device=device)
    else:
        sparse = SPARSE_COST * width < padded_lengths[None, :]
    width = torch.where(sparse, width, torch.zeros_like(width)).to(torch.int32)
    plan = _SparsePlan(sparse.cpu(), width)
    if not bool(plan.sparse.any()):
        return plan
    # ELLPACK: text s owns rows ell_offsets[s] : ell_offsets[s] + W_s (W_s: widest sparse block)
    text_width = width.amax(0).long()  # [texts]
    ell_offsets = torch.cumsum(text_width, 0) - text_width
    total = int(text_width.sum())
    cells = torch.zeros(total, p_pad, dtype=torch.int64, device=device)
    values = torch.zeros(total, p_pad, dtype=torch.float32, device=device)
    tile_of_row = torch.arange(n_programs, device=device) // block_p
    for r0 in range(0, n_programs, 1024):  # bounded temporaries
        part = programs[r0 : r0 + 1024]
        in_sparse_block = sparse[tile_of_row[r0 : r0 + 1024]][:, layout.text_of_cell]
        row, cell = ((part != 0) & in_sparse_block).nonzero(as_tuple=True)  # row-major order
        text = layout.text_of_cell[cell]
        key = row * n_texts + text  # non-decreasing: cells of a row are in text order
        rank = torch.arange(key.numel(), device=device) - torch.searchsorted(key, key)
        step = ell_offsets[text] + rank
        cells[step, row + r0] = layout.cell_index[cell]
        values[step, row + r0] = part[row, cell].float()
    plan.cells, plan.values, plan.ell_offsets = cells, values, ell_offsets
    return plan


def _items(mask: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(text, program tile) int32 device tensors of the True entries of ``mask [program tiles, texts]``,
    text-major, so instances that run together share a text's attention in L2."""
    tile, text = mask.T.nonzero(as_tuple=True)[::-1]
    return text.to(device, torch.int32), tile.to(device, torch.int32)


def sum_min_triton(
    programs: torch.Tensor,
    attention: torch.Tensor,
    offsets,
    block_p: int | None = None,
    block_h: int | None = None,
    num_warps: int | None = None,
    *,
    unroll: int | None = None,
    splits: int | None = None,
    mode: str = "auto",
    layout: DeviceLayout | None = None,
) -> torch.Tensor:
    """M [programs, heads, texts] fp32 with the Triton kernels. CPU tensors run in Triton's interpreter
    (TRITON_INTERPRET=1), else on the GPU, copied there and back.

    ``mode``: "auto" (sparse kernel for sparse program blocks, dense for the rest), "dense"
    or "sparse". ``splits``: parts of each text's cells for the dense kernel (default: enough
    to fill the GPU). ``layout``: :func:`device_layout` of ``attention``, if already built. Tile
    sizes default to :func:`_pick_tiles`; pass them to test masking or to tune.
    """
    if triton is None:
        raise ValueError("Triton is not installed; use impl='numba' or impl='torch'")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    offsets = _check(programs, attention, offsets)
    n_programs, n_heads, n_texts = programs.shape[0], attention.shape[0], offsets.numel() - 1
    device = programs.device
    if attention.device != device:
        raise ValueError(f"programs on {device} but attention on {attention.device}")
    if device.type != "cuda" and not _interpreted():
        if torch.cuda.is_available():  # forced onto the Triton path: run it on the GPU
            return sum_min_triton(programs.cuda(), attention.cuda(), offsets, block_p, block_h,
                                  num_warps, unroll=unroll, splits=splits, mode=mode).to(device)
        raise ValueError(
            "the Triton kernel needs a CUDA GPU; to run it on the CPU set TRITON_INTERPRET=1 "
            "before triton is first imported"
        )
    out = torch.zeros(n_programs, n_heads, n_texts, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    if layout is None:
        layout = device_layout(attention, offsets)
    elif layout.n_heads != n_heads or not torch.equal(layout.offsets, offsets):
        raise ValueError("layout was built for other attention; build it with device_layout")
    picked = _pick_tiles(n_programs, n_heads)
    block_p, block_h, unroll, num_warps = (
        given or default for given, default in zip((block_p, block_h, unroll, num_warps), picked)
    )
    if CELL_MULTIPLE % unroll or HEAD_MULTIPLE % block_h:
        raise ValueError(f"unroll must divide {CELL_MULTIPLE} and block_h {HEAD_MULTIPLE}")
    p_pad = -(-n_programs // block_p) * block_p
    order = None
    if mode == "auto" and n_heads < SPARSE_MIN_HEADS:
        mode = "dense"  # the sparse plan's passes over P x C would cost more than they save
    if mode != "dense":
        # Sort programs by their number of non-zero cells so one-hot rows share blocks with
        # one-hot rows: a block's sparse steps are its widest row's non-zeros.
        counts = _row_nonzeros(programs, layout)
        order = torch.argsort(counts.sum(1), stable=True)
        programs, counts = programs[order], counts[order]
    plan = _sparse_plan(programs, layout, block_p, p_pad, mode,
                        counts=None if order is None else counts)
    dense = ~plan.sparse
    if bool(dense.any()):
        prog_t = programs_cell_major(programs, layout, p_pad)
        items = _items(dense, device)
        n_tiles_h = triton.cdiv(n_heads, block_h)
        longest = int((layout.offsets_pad[1:] - layout.offsets_pad[:-1]).max())
        n_splits = splits or _n_splits(items[0].numel() * n_tiles_h, longest, device)
        _launch_dense(prog_t, layout, items, out, block_p, block_h, unroll, num_warps, n_splits)
    if bool(plan.sparse.any()):
        sparse_h, sparse_warps = _sparse_tiles(block_p, n_heads)
        _launch_sparse(plan, layout, _items(plan.sparse, device), out, block_p, sparse_h,
                       sparse_warps)
    if order is not None:
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        out = unsorted
    return out


def _launch_dense(prog_t, layout, items, out, block_p, block_h, unroll, num_warps, n_splits=1):
    """Run the dense kernel on ``items`` (text, program tile), each text's cells in
    ``n_splits`` parts (``out`` must then be zeros); returns the compiled kernel."""
    item_text, item_tile = items
    n_tiles_h = triton.cdiv(out.shape[1], block_h)
    longest = int((layout.offsets_pad[1:] - layout.offsets_pad[:-1]).max())
    split_cells = -(-longest // (n_splits * unroll)) * unroll
    return _sum_min_dense_kernel[(item_text.numel() * n_splits * n_tiles_h,)](
        prog_t, layout.attention_t, layout.offsets_pad_device, item_text, item_tile, out,
        out.shape[0], out.shape[1], n_tiles_h, n_splits, split_cells,
        prog_t.stride(0), layout.attention_t.stride(0), out.stride(0), out.stride(1),
        BLOCK_P=block_p, BLOCK_H=block_h, UNROLL=unroll, SPLIT=n_splits > 1,
        num_warps=num_warps,
    )


def _launch_sparse(plan, layout, items, out, block_p, block_h, num_warps):
    """Run the sparse kernel on ``items`` (text, program tile); returns the compiled kernel."""
    item_text, item_tile = items
    n_tiles_h = triton.cdiv(out.shape[1], block_h)
    return _sum_min_sparse_kernel[(item_text.numel() * n_tiles_h,)](
        plan.cells, plan.values, plan.ell_offsets, plan.width, item_text, item_tile,
        layout.attention_t, out, out.shape[0], out.shape[1], n_tiles_h, layout.n_texts,
        plan.cells.stride(0), layout.attention_t.stride(0), out.stride(0), out.stride(1),
        BLOCK_P=block_p, BLOCK_H=block_h, num_warps=num_warps,
    )


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


def triton_unavailable(device) -> str:
    """Why ``impl="triton"`` cannot run for tensors on ``device`` ("" when it can): checked
    before an evaluation, not once its outputs are scored."""
    if triton is None:
        return "Triton is not installed"
    if torch.device(device).type != "cuda" and not torch.cuda.is_available() and not _interpreted():
        return ("the Triton kernel needs a CUDA GPU and this machine has none (TRITON_INTERPRET=1 "
                "runs it in Triton's slow interpreter)")
    return ""


# after the Triton kernel, chosen by "auto", fails on this GPU, "auto" takes the torch path
TRITON_FALLBACK = TritonFallback("sum-min")


def sum_min(
    programs: torch.Tensor,
    attention: torch.Tensor,
    offsets,
    impl: str = "auto",
    layout: DeviceLayout | None = None,
) -> torch.Tensor:
    """M[p, h, s] = Σ_{c in text s} min(programs[p, c], attention[h, c]), fp32
    [programs, heads, texts].

    programs [programs, cells], attention [heads, cells]: fp16/bf16/fp32, finite, non-negative, same device.
    impl: "auto" (Triton on CUDA, numba on CPU), or force "triton", "numba" or "torch".
    layout: the Triton path's :func:`device_layout` of ``attention``, when scoring many chunks.
    """
    chosen = resolve_impl(impl, programs.device)
    if chosen == "triton" and impl == "auto":
        try:
            return sum_min_triton(programs, attention, offsets, layout=layout)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - any compile/launch failure falls back, loudly
            TRITON_FALLBACK.record(err)
            return sum_min_torch(programs, attention, offsets)
    impl = chosen
    if impl == "triton":
        return sum_min_triton(programs, attention, offsets, layout=layout)
    if impl == "numba":
        return sum_min_numba(programs, attention, offsets).to(programs.device)
    return sum_min_torch(programs, attention, offsets)


def text_sums(values: torch.Tensor, offsets) -> torch.Tensor:
    """Σ over each text's cells of every row: values [rows, cells] -> [rows, texts] fp32."""
    offsets = torch.as_tensor(offsets, dtype=torch.int64).cpu()
    n_texts = offsets.numel() - 1
    if values.shape[1] != int(offsets[-1]):
        raise ValueError(f"offsets end at {int(offsets[-1])} cells, values have {values.shape[1]}")
    if values.device.type == "cpu":  # one contiguous pass per row (index_add_ is ~6x slower)
        out = np.zeros((values.shape[0], n_texts), dtype=np.float32)
        nonempty = (offsets[1:] > offsets[:-1]).numpy()  # reduceat reads an empty text wrongly
        if nonempty.any() and values.shape[0]:
            starts = offsets[:-1].numpy()[nonempty]
            with np.errstate(over="ignore", invalid="ignore"):  # inf / nan sums are the answer
                out[:, nonempty] = np.add.reduceat(values.detach().float().numpy(), starts,
                                                   axis=1)
        return torch.from_numpy(out)
    text_of_cell = torch.repeat_interleave(torch.arange(n_texts), offsets[1:] - offsets[:-1])
    out = torch.zeros(values.shape[0], n_texts, dtype=torch.float32, device=values.device)
    return out.index_add_(1, text_of_cell.to(values.device), values.float())


def iou_from_sums(
    sum_min: torch.Tensor, prog_sums: torch.Tensor, attn_sums: torch.Tensor
) -> torch.Tensor:
    """IoU [programs, heads, texts] = M / (ΣÂ + ΣA − M), with the rule of :func:`iou_ratio`.

    sum_min [programs, heads, texts], prog_sums [programs, texts], attn_sums [heads, texts].
    """
    return iou_ratio(sum_min, prog_sums[:, None, :] + attn_sums[None, :, :] - sum_min)


def soft_iou(
    programs: torch.Tensor, attention: torch.Tensor, offsets, impl: str = "auto"
) -> torch.Tensor:
    """Soft IoU [programs, heads, texts] of every program against every head on every text."""
    m = sum_min(programs, attention, offsets, impl=impl)
    return iou_from_sums(m, text_sums(programs, offsets), text_sums(attention, offsets))
