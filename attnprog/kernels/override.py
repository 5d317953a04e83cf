"""Causal attention where chosen heads use a supplied matrix instead of softmax(QKᵀ).

Head replacement swaps a head's attention probabilities for a program's matrix Π
*before* they multiply the values, per head:

    normal head h:   O_h = softmax(Q_h K_gᵀ · scale + mask) V_g      (g = h // groups, GQA)
    flagged head h:  O_h = (Π_h ⊙ visible) V_g

where ``visible[i, j]`` is the causal mask (j <= i + n_kv - n_q), the key padding mask and,
for a sliding-window layer of window w, j > i + n_kv - n_q - w. Entries of Π outside
``visible`` are ignored, so right padding, the upper triangle and keys past the window never
leak into the output. What decoder architectures add to the softmax is honoured by every path:
logit softcapping (Gemma 2: scores -> cap · tanh(scores / cap) before the mask) and learned
sink logits (GPT-OSS: one extra logit per head in the denominator, whose value is dropped).

The naive way (the torch reference below, and what "eager attention with the flagged heads
overwritten" does) materialises every head's n × n probabilities. Per layer, with B texts,
H query heads, head size D and n tokens, it moves

    Q, K, V, O                4 · B·H·n·D  elements (K, V once per KV head with GQA)
    scores, probs             ~5 · B·H·n²  elements (matmul write, mask add, softmax read
                                           and write, matmul read) — the dominant term

The fused kernel keeps a BLOCK_M × BLOCK_N tile of scores in registers and folds it into
the output with the online softmax (running max m, running sum l), so normal heads never
write n × n anything: 4 · B·H·n·D elements plus K/V re-reads that mostly hit L2. A flagged
head reads only the causal half of its Π tiles: B·n²/2 elements, the unavoidable cost of a
dense program matrix. Both kinds of head run in the same launch, one per layer.

Compute: 4 · B·H·n²·D / 2 flops for normal heads (QKᵀ and PV, causal half), half that for
flagged ones (PV only). At the GPU target shape (16 × 256 tokens, SmolLM2: 9 heads of 64)
attention is a few percent of a forward pass; the MLPs and projections dominate, which is
why the bound the benchmark compares against is the whole model with SDPA attention: a
replaced forward should cost at most ~1.15× that, the extra being Π's bytes.

This module imports nothing from attnprog. Entry point: :func:`override_attention`.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from attnprog.kernels.fallback import TritonFallback

try:  # Triton is optional: CPU-only installs use the torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None

__all__ = [
    "override_attention",
    "override_attention_reference",
    "override_attention_torch",
    "override_attention_triton",
    "visible_mask",
]


# --- shared helpers ---------------------------------------------------------------------------


def visible_mask(
    batch: int, n_q: int, n_kv: int, key_valid: torch.Tensor | None, device,
    window: int | None = None,
) -> torch.Tensor:
    """[B, 1, n_q, n_kv] bool: causal (queries are the last n_q positions), not padding, and
    within the last ``window`` positions (the query's own included) when a window is given."""
    rows = torch.arange(n_q, device=device)[:, None] + (n_kv - n_q)
    cols = torch.arange(n_kv, device=device)[None, :]
    causal = cols <= rows
    if window is not None:
        causal = causal & (cols > rows - window)  # transformers' sliding_window_overlay
    causal = causal[None, None]  # [1, 1, n_q, n_kv]
    if key_valid is None:
        return causal.expand(batch, 1, n_q, n_kv)
    return causal & key_valid.to(torch.bool)[:, None, None, :]


def _flagged_heads(flags: torch.Tensor | None, n_heads: int) -> torch.Tensor:
    """Indices of flagged heads, ascending (the order of ``program_probs``' head axis)."""
    if flags is None:
        return torch.empty(0, dtype=torch.long)
    flags = torch.as_tensor(flags, dtype=torch.bool).reshape(-1)
    if flags.numel() != n_heads:
        raise ValueError(f"flags has {flags.numel()} entries for {n_heads} query heads")
    return flags.nonzero().reshape(-1).cpu()


def _check_shapes(q, k, v, heads, program_probs, key_valid, sinks=None, window=None) -> None:
    batch, n_heads, n_q, head_dim = q.shape
    _, n_kv_heads, n_kv, _ = k.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[-1] != head_dim:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv_heads} KV heads evenly")
    if n_q > n_kv:
        raise ValueError(f"{n_q} queries but only {n_kv} keys")
    if len(heads):
        expected = (batch, len(heads), n_q, n_kv)
        if program_probs is None or tuple(program_probs.shape) != expected:
            got = None if program_probs is None else tuple(program_probs.shape)
            raise ValueError(
                f"program_probs must be [B, flagged heads, n_q, n_kv] = {expected}, got {got}"
            )
    if key_valid is not None and tuple(key_valid.shape) != (batch, n_kv):
        raise ValueError(
            f"key_valid must be [B, n_kv] = {(batch, n_kv)}, got {tuple(key_valid.shape)}"
        )
    if sinks is not None and sinks.numel() != n_heads:
        raise ValueError(f"sinks must hold one logit per query head ({n_heads}), got {sinks.numel()}")
    if window is not None and window < 1:
        raise ValueError(f"a sliding window must hold at least one key, got {window}")


def _softmax(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Row softmax of [B, H, n_q, n_kv] scores; with ``sinks`` [H], each head's sink logit joins
    the denominator and its probability is dropped (GPT-OSS). A row with nothing visible -> 0."""
    if sinks is None:
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)
    sink = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]


# --- 1. the torch reference: materialise everything -------------------------------------------


def override_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    flags: torch.Tensor | None,
    program_probs: torch.Tensor | None,
    *,
    key_valid: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager attention in float32 with the flagged heads' probabilities overwritten by Π.

    ``attn_mask`` (bool, True = visible, or additive float; [B, 1|H, n_q, n_kv]) replaces the
    causal + ``key_valid`` + ``window`` mask when given. Returns [B, H, n_q, D] in q's dtype.
    """
    batch, n_heads, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    heads = _flagged_heads(flags, n_heads)
    _check_shapes(q, k, v, heads, program_probs, key_valid, sinks, window)
    groups = n_heads // k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale

    k_full = k.float().repeat_interleave(groups, dim=1)  # [B, H, n_kv, D]
    v_full = v.float().repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k_full.transpose(-1, -2)) * scale  # [B, H, n_q, n_kv]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attn_mask is None:
        visible = visible_mask(batch, n_q, n_kv, key_valid, q.device, window)
        scores = scores.masked_fill(~visible, float("-inf"))
    elif attn_mask.dtype == torch.bool:
        visible = attn_mask
        scores = scores.masked_fill(~visible, float("-inf"))
    else:
        visible = attn_mask > torch.finfo(attn_mask.dtype).min / 2
        scores = scores + attn_mask.float()
    probs = _softmax(scores, sinks)
    if len(heads):
        heads = heads.to(q.device)
        overwrite = program_probs.float() * visible.expand(batch, n_heads, n_q, n_kv)[:, heads]
        probs[:, heads] = overwrite
    return torch.matmul(probs, v_full).to(q.dtype)


# --- 2. the CPU path: SDPA for every head, a matmul for the flagged ones ----------------------


def override_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    flags: torch.Tensor | None,
    program_probs: torch.Tensor | None,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch SDPA for all heads, then Π·V written over the flagged heads. [B, H, n_q, D].

    SDPA has no logit cap and no sink logits: with either, the reference path runs instead.
    """
    if softcap is not None or sinks is not None:
        return override_attention_reference(
            q, k, v, flags, program_probs, key_valid=key_valid, scale=scale, window=window,
            softcap=softcap, sinks=sinks,
        )  # fmt: skip
    batch, n_heads, n_q, _ = q.shape
    n_kv = k.shape[2]
    heads = _flagged_heads(flags, n_heads)
    _check_shapes(q, k, v, heads, program_probs, key_valid, window=window)
    groups = n_heads // k.shape[1]

    # is_causal aligns the triangle top-left, so it is only right when n_q == n_kv
    plain_causal = key_valid is None and n_q == n_kv and window is None
    # one new query with a KV cache sees every key: no mask to build (a decoding step)
    sees_all = key_valid is None and n_q == 1 and window is None
    visible = (None if plain_causal or sees_all
               else visible_mask(batch, n_q, n_kv, key_valid, q.device, window))
    empty = None
    if window is not None and key_valid is not None:
        # a padded query past its text's last window sees no key; some SDPA backends give NaN
        # there, which the next layer would spread (0 · NaN) though it masks that key: let such
        # a row see every key, then zero it
        empty = ~visible.any(dim=-1, keepdim=True)  # [B, 1, n_q, 1]
        visible = visible | empty
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=visible, is_causal=plain_causal, scale=scale, enable_gqa=groups > 1
    )
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    if len(heads):
        # flagged heads were computed by SDPA too and are overwritten: simpler than gathering
        # the normal heads, and on CPU the attention is a small part of the forward pass
        heads = heads.to(q.device)
        probs = program_probs.to(v.dtype)  # [B, F, n_q, n_kv]
        if not sees_all:
            probs = probs.tril(diagonal=n_kv - n_q)
        if window is not None:  # keys j > i + n_kv - n_q - window only
            probs = probs.triu(diagonal=n_kv - n_q - window + 1)
        if key_valid is not None:
            probs = probs * key_valid.to(v.dtype)[:, None, None, :]
        out[:, heads] = torch.matmul(probs, v[:, heads // groups])
    return out


# --- 3. the Triton kernel ---------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _softmax_tiles(
        acc, m_i, l_i, q, k_base, v_base, key_valid_row,
        stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, d_ok,
        lo, hi, n_kv, q_offset, scale_log2, window, softcap_log2,
        CAUSAL_MASK: tl.constexpr, HAS_KEY_VALID: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # Online softmax over key tiles lo:hi (lo, hi multiples of BLOCK_N but hi maybe n_kv).
        # A sliding window needs the mask on every tile: callers pass CAUSAL_MASK with it.
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)  # [N] key columns
            if CAUSAL_MASK:
                n_ok = offs_n < n_kv
                k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [N, D]
                v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [N, D]
            else:  # every key of the tile exists and is causally visible
                k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                            mask=d_ok[None, :], other=0.0)
                v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                            mask=d_ok[None, :], other=0.0)
            if DOT_IN_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            # scores in log2 units so exp2 (one instruction) replaces exp
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [M, N]
            if HAS_SOFTCAP:
                # cap · tanh(s / cap) in log2 units; tanh(x) = 2 / (1 + e^(-2x)) - 1, as the
                # interpreter has no tanh (exp2 overflowing to inf still gives -1)
                x = s / softcap_log2
                s = softcap_log2 * (2.0 / (1.0 + tl.math.exp2(x * -2.8853900817779268)) - 1.0)
            if CAUSAL_MASK:
                visible = (offs_n[None, :] <= offs_m[:, None] + q_offset) & (offs_n < n_kv)[None, :]
                if HAS_WINDOW:
                    visible = visible & (offs_n[None, :] > offs_m[:, None] + q_offset - window)
                if HAS_KEY_VALID:
                    key_ok = tl.load(key_valid_row + offs_n, mask=offs_n < n_kv, other=0)
                    visible = visible & (key_ok != 0)[None, :]
                s = tl.where(visible, s, float("-inf"))
            elif HAS_KEY_VALID:
                key_ok = tl.load(key_valid_row + offs_n)
                s = tl.where((key_ok != 0)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row with nothing visible yet keeps m = -inf; shift by 0 there, not by -inf
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_shift)  # rescales what was summed under the old max
            p = tl.math.exp2(s - m_shift[:, None])  # [M, N]
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _override_attention_kernel(
        Q, K, V, Out, PI, SLOT, KEY_VALID, SINKS,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_pb, stride_pf, stride_pm, stride_pn,
        stride_valid_b,
        n_heads, n_q, n_kv, groups, scale_log2, window, softcap_log2,
        HEAD_DIM: tl.constexpr,
        HAS_KEY_VALID: tl.constexpr,
        HAS_WINDOW: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        HAS_SINKS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # one program = BLOCK_M queries of one (text, head); grid = (B * H, query tiles), the
        # last query tiles (the most keys under the causal mask) first, so the tail is short
        batch_head = tl.program_id(0)
        tile_m = tl.num_programs(1) - 1 - tl.program_id(1)
        b = batch_head // n_heads
        h = batch_head % n_heads
        kv_h = h // groups  # GQA: `groups` query heads share one KV head
        q_offset = n_kv - n_q  # queries are the last n_q positions (0 without a cache)

        offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [M] query rows
        offs_d = tl.arange(0, BLOCK_D)  # [D] (padded up to a power of two >= 16)
        d_ok = offs_d < HEAD_DIM  # constexpr: folds away when HEAD_DIM == BLOCK_D
        q_ptrs = Q + b * stride_qb + h * stride_qh
        q_ptrs += offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=(offs_m < n_q)[:, None] & d_ok[None, :], other=0.0)  # [M, D]
        if DOT_IN_FP32:
            q = q.to(tl.float32)

        k_base = K + b * stride_kb + kv_h * stride_kh
        v_base = V + b * stride_vb + kv_h * stride_vh
        # causal: no query in this tile sees a key past its last row
        hi = tl.minimum(n_kv, (tile_m + 1) * BLOCK_M + q_offset)
        lo = 0
        if HAS_WINDOW:  # nor one before its first row's window
            lo = tl.maximum(tile_m * BLOCK_M + q_offset - window + 1, 0) // BLOCK_N * BLOCK_N
        slot = tl.load(SLOT + h)  # -1: softmax head; else index into Π's head axis
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        if slot < 0:
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp
            # Key tiles wholly below the tile's first query row need no causal mask (as in
            # FlashAttention): only the last few, on the diagonal, pay for masking. A window
            # masks every tile, so then they all take the masked loop.
            full_end = tl.minimum(n_kv, tile_m * BLOCK_M + q_offset + 1) // BLOCK_N * BLOCK_N
            if HAS_WINDOW:
                full_end = lo
            acc, m_i, l_i = _softmax_tiles(
                acc, m_i, l_i, q, k_base, v_base, KEY_VALID + b * stride_valid_b,
                stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, d_ok,
                lo, full_end, n_kv, q_offset, scale_log2, window, softcap_log2,
                False, HAS_KEY_VALID, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, DOT_IN_FP32,
                BLOCK_N)
            acc, m_i, l_i = _softmax_tiles(
                acc, m_i, l_i, q, k_base, v_base, KEY_VALID + b * stride_valid_b,
                stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, d_ok,
                full_end, hi, n_kv, q_offset, scale_log2, window, softcap_log2,
                True, HAS_KEY_VALID, HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, DOT_IN_FP32,
                BLOCK_N)
            if HAS_SINKS:
                # the head's sink logit joins the denominator only (GPT-OSS); fold it in like
                # one more key whose value is zero
                sink = tl.load(SINKS + h).to(tl.float32) * 1.4426950408889634
                m_new = tl.maximum(m_i, sink)
                alpha = tl.math.exp2(m_i - m_new)
                acc = acc * alpha[:, None]
                l_i = l_i * alpha + tl.math.exp2(sink - m_new)
            acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no visible key -> output 0
        else:
            pi_base = PI + b * stride_pb + slot * stride_pf
            for start_n in range(lo, hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                n_ok = offs_n < n_kv
                v = tl.load(
                    v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0,
                )  # [N, D]
                if DOT_IN_FP32:
                    v = v.to(tl.float32)
                visible = (offs_n[None, :] <= offs_m[:, None] + q_offset) & n_ok[None, :]
                visible = visible & (offs_m < n_q)[:, None]
                if HAS_WINDOW:
                    visible = visible & (offs_n[None, :] > offs_m[:, None] + q_offset - window)
                if HAS_KEY_VALID:
                    key_ok = tl.load(KEY_VALID + b * stride_valid_b + offs_n, mask=n_ok, other=0)
                    visible = visible & (key_ok != 0)[None, :]
                pi = tl.load(
                    pi_base + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                    mask=visible, other=0.0,
                )  # [M, N]: the program's row-normalised weights, read instead of computed
                acc += tl.dot(pi.to(v.dtype), v, input_precision=DOT_PRECISION)

        o_ptrs = Out + b * stride_ob + h * stride_oh
        o_ptrs += offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
        tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m < n_q)[:, None] & d_ok[None, :])


@functools.lru_cache(maxsize=256)
def _slot_table(heads: tuple[int, ...], n_heads: int, device: torch.device) -> torch.Tensor:
    """[H] int32 on the device: -1 for a softmax head, else its index in Π's head axis.

    Cached so a forward pass does not copy a tiny table to the GPU once per layer.
    """
    slot = torch.full((n_heads,), -1, dtype=torch.int32)
    slot[list(heads)] = torch.arange(len(heads), dtype=torch.int32)
    return slot.to(device)


def _tiles(n_q: int, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a layer's shape."""
    # tl.dot needs every tile side >= 16; short inputs (tests, QA) use small tiles to waste less
    if n_q <= 16:
        return 16, 16, 2, 1
    if n_q <= 64:
        return 32, 32, 4, 2
    # Swept on an H100 (bench/tune_gpu.py, bench/RESULTS.md): 64 x 64 tiles, 4 warps, 3 stages
    # were within 0.91-1.13x SDPA from n = 256 to 4096 at head size 64 and 128; at 128 with
    # short texts, 64 x 32 tiles (fewer registers, more resident programs) did better.
    if head_dim > 64 and n_q <= 256:
        return 64, 32, 4, 3
    return 64, 64, 4, 3


def override_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    flags: torch.Tensor | None,
    program_probs: torch.Tensor | None,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    _num_warps: int | None = None,
    _num_stages: int | None = None,
) -> torch.Tensor:
    """One fused launch for a layer: [B, H, n_q, D] (a view of a [B, n_q, H, D] buffer).

    CPU tensors run in Triton's interpreter (TRITON_INTERPRET=1), else on the GPU, copied
    there and back.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed; use override_attention(impl='torch')")
    if not q.is_cuda and not _interpreted() and torch.cuda.is_available():
        def gpu(t):
            return None if t is None else t.cuda()

        out = override_attention_triton(
            gpu(q), gpu(k), gpu(v), flags, gpu(program_probs), key_valid=gpu(key_valid),
            scale=scale, window=window, softcap=softcap, sinks=gpu(sinks),
            block_m=block_m, block_n=block_n)
        return out.to(q.device)
    if not q.is_cuda and not _interpreted():
        raise ValueError(
            "the Triton kernel needs CUDA tensors; to run it on the CPU set TRITON_INTERPRET=1 "
            "before triton is first imported"
        )
    batch, n_heads, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    heads = _flagged_heads(flags, n_heads)
    _check_shapes(q, k, v, heads, program_probs, key_valid, sinks, window)
    groups = n_heads // k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale

    slot = _slot_table(tuple(heads.tolist()), n_heads, q.device)
    # [B, n_q, H, D] storage: Hugging Face wants that layout, so its transpose back is free
    out = torch.empty(batch, n_q, n_heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    pi = program_probs if len(heads) else q  # never read when nothing is flagged
    valid = key_valid.to(torch.int8).contiguous() if key_valid is not None else slot
    sink_logits = sinks.detach().reshape(-1).contiguous() if sinks is not None else slot

    tile_m, tile_n, num_warps, num_stages = _tiles(n_q, head_dim)
    tile_m, tile_n = block_m or tile_m, block_n or tile_n
    num_warps, num_stages = _num_warps or num_warps, _num_stages or num_stages
    block_d = max(16, triton.next_power_of_2(head_dim))
    grid = (batch * n_heads, triton.cdiv(n_q, tile_m))
    _override_attention_kernel[grid](
        q, k, v, out, pi, slot, valid, sink_logits,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *pi.stride(),
        valid.stride(0),
        n_heads, n_q, n_kv, groups, scale * math.log2(math.e), window or 0,
        (softcap or 1.0) * math.log2(math.e),
        HEAD_DIM=head_dim,
        HAS_KEY_VALID=key_valid is not None,
        HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_SINKS=sinks is not None,
        # fp32 inputs would silently get TF32 (10-bit mantissa) dots; the 1e-4 gate needs IEEE
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # the interpreter (TRITON_INTERPRET=1) multiplies bf16 tiles as raw integers: upcast there
        DOT_IN_FP32=q.dtype == torch.bfloat16 and _interpreted(),
        BLOCK_M=tile_m, BLOCK_N=tile_n, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


# --- 4. dispatch ------------------------------------------------------------------------------


def _interpreted() -> bool:
    """Whether the kernel was built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_override_attention_kernel, InterpretedFunction)


def _triton_usable(q: torch.Tensor) -> bool:
    return triton is not None and q.is_cuda and not TRITON_FALLBACK.failed


# after the Triton kernel, chosen by "auto", fails on this GPU, "auto" takes the torch path
TRITON_FALLBACK = TritonFallback("override")


def override_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    flags: torch.Tensor | None = None,
    program_probs: torch.Tensor | None = None,
    *,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Causal attention with flagged heads replaced by ``program_probs`` · V.

    q [B, H, n_q, D]; k, v [B, H_kv, n_kv, D]; flags [H] bool; program_probs
    [B, flagged heads (ascending), n_q, n_kv]; key_valid [B, n_kv] (True = real token);
    window: keys within the last ``window`` positions only; softcap: logit cap; sinks [H].
    ``impl``: "auto" (Triton on CUDA, else torch), "triton", "torch" or "reference".
    Returns [B, H, n_q, D].
    """
    features = {"key_valid": key_valid, "scale": scale, "window": window, "softcap": softcap,
                "sinks": sinks}
    if impl == "auto" and _triton_usable(q):
        try:
            return override_attention_triton(q, k, v, flags, program_probs, **features)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - any compile/launch failure falls back, loudly
            TRITON_FALLBACK.record(err)
    if impl == "auto":
        impl = "torch"
    if impl == "triton":
        return override_attention_triton(q, k, v, flags, program_probs, **features)
    if impl == "torch":
        return override_attention_torch(q, k, v, flags, program_probs, **features)
    if impl == "reference":
        return override_attention_reference(q, k, v, flags, program_probs, **features)
    raise ValueError(f"unknown impl {impl!r}: use 'auto', 'triton', 'torch' or 'reference'")
