"""kernels.override: Triton kernel and CPU path against the torch reference.

The Triton tests hand CPU tensors to the kernel: it runs them in the interpreter where no GPU is
present (tests/conftest.py sets TRITON_INTERPRET=1), and on the GPU, copied there and back,
where one is.
"""

import pytest
import torch

from attnprog.kernels.override import (
    override_attention,
    override_attention_reference,
    override_attention_torch,
    override_attention_triton,
)

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def make_inputs(batch=2, heads=4, kv_heads=2, n=21, head_dim=8, flagged=(1, 3), seed=0):
    """Random q, k, v, flags and row-normalised causal program matrices."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, n, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, n, head_dim, generator=gen)
    flags = torch.zeros(heads, dtype=torch.bool)
    flags[list(flagged)] = True
    probs = torch.rand(batch, len(flagged), n, n, generator=gen).tril()
    probs = probs / probs.sum(-1, keepdim=True)
    return q, k, v, flags, probs


def right_padding(batch, n, lengths):
    key_valid = torch.zeros(batch, n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        key_valid[b, :length] = True
    return key_valid


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_reference_gqa_with_padding(dtype):
    q, k, v, flags, probs = make_inputs()
    key_valid = right_padding(2, 21, [21, 13])
    args = (q.to(dtype), k.to(dtype), v.to(dtype), flags, probs)
    expected = override_attention_reference(*args, key_valid=key_valid)
    got = override_attention_triton(*args, key_valid=key_valid)
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_triton_several_tiles_no_flags():
    # 16 x 16 tiles over 40 tokens: the online softmax must rescale across key tiles
    q, k, v, _, _ = make_inputs(batch=1, heads=2, kv_heads=1, n=40, flagged=())
    expected = override_attention_reference(q, k, v, None, None)
    got = override_attention_triton(q, k, v, None, None, block_m=16, block_n=16)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_triton_all_heads_flagged_without_gqa_and_scale():
    q, k, v, flags, probs = make_inputs(heads=2, kv_heads=2, flagged=(0, 1), head_dim=16)
    expected = override_attention_reference(q, k, v, flags, probs, scale=0.3)
    got = override_attention_triton(q, k, v, flags, probs, scale=0.3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_triton_queries_after_a_cache():
    # 5 new queries against 21 keys: queries are the last 5 positions
    q, k, v, flags, probs = make_inputs()
    q_new, probs_new = q[:, :, -5:].contiguous(), probs[:, :, -5:].contiguous()
    expected = override_attention_reference(q_new, k, v, flags, probs_new)
    got = override_attention_triton(q_new, k, v, flags, probs_new)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_new", [5, 1])
def test_torch_path_queries_after_a_cache(n_new):
    # the last n_new positions against all 21 keys (1: a decoding step, which needs no mask)
    q, k, v, flags, probs = make_inputs()
    q_new, probs_new = q[:, :, -n_new:].contiguous(), probs[:, :, -n_new:].contiguous()
    expected = override_attention_reference(q_new, k, v, flags, probs_new)
    got = override_attention_torch(q_new, k, v, flags, probs_new)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_torch_path_matches_reference_with_padding():
    q, k, v, flags, probs = make_inputs()
    key_valid = right_padding(2, 21, [9, 21])
    expected = override_attention_reference(q, k, v, flags, probs, key_valid=key_valid)
    got = override_attention_torch(q, k, v, flags, probs, key_valid=key_valid)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_program_entries_outside_visible_cells_are_ignored():
    # Π with mass above the diagonal and on padding keys: only visible cells count
    q, k, v, flags, probs = make_inputs()
    key_valid = right_padding(2, 21, [21, 10])
    noisy = probs + torch.rand_like(probs).triu(1)
    noisy[1, :, :, 10:] += 1.0
    for impl in ("torch", "triton"):
        clean = override_attention(q, k, v, flags, probs * key_valid[:, None, None, :].float(),
                                   key_valid=key_valid, impl=impl)
        got = override_attention(q, k, v, flags, noisy, key_valid=key_valid, impl=impl)
        torch.testing.assert_close(got, clean, atol=1e-5, rtol=1e-5)


def test_flagged_head_output_is_program_times_values():
    q, k, v, flags, probs = make_inputs(kv_heads=2)
    out = override_attention(q, k, v, flags, probs, impl="torch")
    # head 3 reads KV head 3 // 2 = 1
    torch.testing.assert_close(out[:, 3], probs[:, 1] @ v[:, 1], atol=1e-6, rtol=1e-6)


def test_bad_program_shape_is_rejected():
    q, k, v, flags, probs = make_inputs()
    with pytest.raises(ValueError, match="program_probs"):
        override_attention(q, k, v, flags, probs[:, :1], impl="torch")


# what decoder architectures add to the softmax: Mistral's window, Gemma 2's cap, GPT-OSS's sinks
FEATURES = {
    "window": dict(window=5),
    "softcap": dict(softcap=2.0),
    "sinks": dict(sinks=torch.tensor([2.0, -1.0, 0.5, 3.0])),
    "all": dict(window=7, softcap=1.5, sinks=torch.tensor([1.0, 0.0, -2.0, 2.5]), scale=0.4),
}


def written_out(q, k, v, flags, probs, key_valid, scale=None, window=None, softcap=None,
                sinks=None):
    """The attention the features define, written out here: scores, cap, mask, softmax with
    one sink logit per head, then Π on the flagged heads' visible cells."""
    n, groups = q.shape[2], q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.repeat_interleave(groups, 1).transpose(-1, -2) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    visible = (j <= i) & (j > i - (window or n)) & key_valid[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.view(1, -1, 1, 1).expand(*scores.shape[:3], 1)], -1)
    attention = torch.softmax(scores, -1)[..., :n].nan_to_num(0.0)  # padding past the window
    attention[:, flags] = probs * visible
    return attention @ v.repeat_interleave(groups, 1)


@pytest.mark.parametrize("feature", FEATURES)
def test_every_path_honours_windows_softcaps_and_sinks(feature):
    # 37 tokens in 16 x 16 tiles: the window starts the key loop past the first tiles
    q, k, v, flags, probs = make_inputs(n=37, head_dim=16, seed=3)
    q, k = 3 * q, 3 * k  # peaked attention, so a cap or a window changes it
    key_valid = right_padding(2, 37, [37, 26])
    expected = written_out(q, k, v, flags, probs, key_valid, **FEATURES[feature])
    reference = override_attention_reference(q, k, v, flags, probs, key_valid=key_valid,
                                             **FEATURES[feature])
    torch.testing.assert_close(reference, expected, atol=1e-6, rtol=1e-6)
    for impl in ("torch", "triton"):
        extra = {"block_m": 16, "block_n": 16} if impl == "triton" else {}
        run = override_attention_torch if impl == "torch" else override_attention_triton
        got = run(q, k, v, flags, probs, key_valid=key_valid, **FEATURES[feature], **extra)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=impl)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_gpu_honours_windows_softcaps_and_sinks(feature, dtype):
    q, k, v, flags, probs = make_inputs(batch=3, heads=4, kv_heads=2, n=200, head_dim=64)
    key_valid = right_padding(3, 200, [200, 150, 7]).cuda()
    args = [t.cuda() for t in (q.to(dtype), k.to(dtype), v.to(dtype))] + [flags, probs.cuda()]
    features = {name: value.cuda() if isinstance(value, torch.Tensor) else value
                for name, value in FEATURES[feature].items()}
    expected = override_attention_reference(*args, key_valid=key_valid, **features)
    got = override_attention(*args, key_valid=key_valid, **features)  # auto: Triton on CUDA
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_on_gpu_matches_reference(dtype):
    q, k, v, flags, probs = make_inputs(batch=3, heads=9, kv_heads=3, n=200, head_dim=64,
                                        flagged=(0, 4, 8))
    key_valid = right_padding(3, 200, [200, 150, 7]).cuda()
    args = [t.cuda() for t in (q.to(dtype), k.to(dtype), v.to(dtype))] + [flags, probs.cuda()]
    expected = override_attention_reference(*args, key_valid=key_valid)
    got = override_attention(*args, key_valid=key_valid)  # auto: Triton on CUDA
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_auto_falls_back_to_torch_with_a_warning_when_the_triton_kernel_fails(monkeypatch):
    import attnprog.kernels.override as override_module

    def broken_kernel(*args, **kwargs):
        raise RuntimeError("out of shared memory")

    monkeypatch.setattr(override_module.TRITON_FALLBACK, "failure", None)
    monkeypatch.setattr(override_module, "_triton_usable", lambda q: True)
    monkeypatch.setattr(override_module, "override_attention_triton", broken_kernel)
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.warns(RuntimeWarning, match="out of shared memory"):
        out = override_module.override_attention(q, k, v, impl="auto")
    assert torch.allclose(out, override_module.override_attention_torch(q, k, v, None, None))
