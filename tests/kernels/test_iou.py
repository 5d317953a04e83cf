"""Sum-min and soft IoU: every path against the torch reference, and the metric's edge cases.

Triton tests take the ``kernel_device`` fixture (tests/kernels/conftest.py): the GPU when there
is one, else Triton's interpreter on the CPU (small shapes: slow).
"""

import numpy as np
import pytest
import torch

from attnprog.kernels import iou as iou_mod
from attnprog.kernels.iou import (
    device_layout,
    iou_from_l1,
    iou_from_l1_grad,
    iou_from_sums,
    pair_iou,
    segment_iou,
    soft_iou,
    sum_min,
    sum_min_numba,
    sum_min_torch,
    sum_min_triton,
    text_sums,
)
from attnprog.layout import causal_offsets, pack, unpack
from tests.kernels.conftest import assert_close_scaled

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")


def causal_rows(n_rows: int, lengths, seed: int, sparsity: float = 0.0) -> torch.Tensor:
    """[n_rows, C] packed row-stochastic causal matrices; ``sparsity`` zeroes that share."""
    rng = np.random.default_rng(seed)
    texts = []
    for n in lengths:
        dense = np.tril(rng.exponential(size=(n_rows, n, n)))
        dense[rng.random(dense.shape) < sparsity] = 0.0
        dense[:, :, 0] += 1e-3  # no empty rows
        dense = np.tril(dense)
        texts.append(pack(dense / dense.sum(-1, keepdims=True)))
    return torch.from_numpy(np.concatenate(texts, axis=1).astype(np.float32))


@pytest.fixture(scope="module")
def ragged():
    """37 programs and 21 heads on 6 texts of 1..20 tokens: P, H not multiples of 16."""
    lengths = [1, 7, 20, 3, 12, 16]
    offsets = torch.from_numpy(causal_offsets(lengths))
    programs = causal_rows(37, lengths, seed=1, sparsity=0.8)
    attention = causal_rows(21, lengths, seed=2)
    return programs, attention, offsets


@pytest.mark.parametrize("mode", ["dense", "sparse", "auto"])
def test_triton_fp32_matches_reference(ragged, kernel_device, mode, monkeypatch):
    monkeypatch.setattr(iou_mod, "SPARSE_MIN_HEADS", 0)  # let "auto" mix both kernels here
    programs, attention, offsets = (t.to(kernel_device) for t in ragged)
    got = sum_min_triton(programs, attention, offsets, block_p=16, block_h=16, mode=mode)
    ref = sum_min_torch(programs.double(), attention.double(), offsets)
    assert_close_scaled(got, ref, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_matches_reference(ragged, kernel_device, dtype):
    programs, attention, offsets = ragged
    programs, attention = programs.to(kernel_device, dtype), attention.to(kernel_device, dtype)
    got = sum_min_triton(programs, attention, offsets, block_p=16, block_h=32)
    ref = sum_min_torch(programs.double(), attention.double(), offsets)  # same rounded inputs
    assert_close_scaled(got, ref, 1e-5)


def test_triton_default_tiles_cover_small_shapes(kernel_device):
    lengths = [2, 5]
    offsets = torch.from_numpy(causal_offsets(lengths))
    programs, attention = causal_rows(3, lengths, seed=3), causal_rows(70, lengths, seed=4)
    got = sum_min_triton(programs.to(kernel_device), attention.to(kernel_device), offsets)
    assert_close_scaled(got, sum_min_torch(programs.double(), attention.double(), offsets), 1e-5)


def test_triton_split_texts_add_up(ragged, kernel_device):
    programs, attention, offsets = (t.to(kernel_device) for t in ragged)
    got = sum_min_triton(programs, attention, offsets, block_p=32, block_h=16, splits=3,
                         mode="dense")  # each text's cells in 3 parts, added atomically
    assert_close_scaled(got, sum_min_torch(programs.double(), attention.double(), offsets), 1e-5)


def test_triton_reuses_a_prebuilt_layout(ragged, kernel_device):
    programs, attention, offsets = (t.to(kernel_device) for t in ragged)
    layout = device_layout(attention, offsets)  # built once, as rank() does per store
    halves = [sum_min_triton(part, attention, offsets, block_p=16, block_h=16, layout=layout)
              for part in (programs[:20], programs[20:])]
    ref = sum_min_torch(programs.double(), attention.double(), offsets)
    assert_close_scaled(torch.cat(halves), ref, 1e-5)


def test_triton_rejects_a_layout_of_other_attention(ragged, kernel_device):
    programs, attention, offsets = (t.to(kernel_device) for t in ragged)
    layout = device_layout(attention[:5], offsets)
    with pytest.raises(ValueError, match="layout was built for other attention"):
        sum_min_triton(programs, attention, offsets, layout=layout)


def test_sparse_blocks_of_empty_programs_sum_to_zero(kernel_device):
    lengths = [4, 9]
    offsets = torch.from_numpy(causal_offsets(lengths))
    programs = torch.zeros(5, int(offsets[-1]), device=kernel_device)
    attention = causal_rows(3, lengths, seed=7).to(kernel_device)
    got = sum_min_triton(programs, attention, offsets, mode="sparse")
    assert got.shape == (5, 3, 2) and (got == 0).all()


def test_numba_matches_reference(ragged):
    programs, attention, offsets = ragged
    got = sum_min_numba(programs, attention, offsets, block_p=8)
    ref = sum_min_torch(programs.double(), attention.double(), offsets).float()  # fp64 sums
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_numba_takes_half_precision(ragged):
    programs, attention, offsets = ragged
    half = programs.to(torch.bfloat16)
    got = sum_min_numba(half, attention, offsets)
    torch.testing.assert_close(got, sum_min_torch(half, attention, offsets), rtol=1e-5, atol=1e-5)


def test_auto_uses_numba_on_cpu(ragged, monkeypatch):
    programs, attention, offsets = ragged
    marker = torch.zeros(1)
    monkeypatch.setattr(iou_mod, "sum_min_numba", lambda *args, **kwargs: marker)
    assert sum_min(programs, attention, offsets) is marker


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_iou_of_a_matrix_with_itself_is_one(ragged, impl):
    _, attention, offsets = ragged
    iou = soft_iou(attention, attention, offsets, impl=impl)  # [H, H, S]
    diagonal = iou[torch.arange(21), torch.arange(21)]
    torch.testing.assert_close(diagonal, torch.ones_like(diagonal), rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "numba"])
def test_disjoint_supports_give_zero(impl):
    n = 6
    offsets = torch.from_numpy(causal_offsets([n]))
    first_token = np.zeros((n, n), np.float32)
    first_token[:, 0] = 1.0
    diagonal = np.eye(n, dtype=np.float32)
    diagonal[0, 0] = 0.0  # the one cell they share
    programs = torch.from_numpy(pack(first_token)[None])
    attention = torch.from_numpy(pack(diagonal)[None])
    assert soft_iou(programs, attention, offsets, impl=impl).item() == 0.0


def test_empty_union_gives_zero_not_nan():
    m = torch.zeros(2, 3, 4)
    iou = iou_from_sums(m, torch.zeros(2, 4), torch.zeros(3, 4))
    assert not torch.isnan(iou).any() and (iou == 0).all()


def test_nan_sum_min_gives_zero():
    m = torch.full((1, 1, 1), float("nan"))
    assert iou_from_sums(m, torch.ones(1, 1), torch.ones(1, 1)).item() == 0.0


def test_pair_iou_agrees_with_the_table_on_random_data(ragged):
    programs, attention, offsets = ragged
    table = soft_iou(programs, attention, offsets, impl="torch")
    for p, h, s in [(0, 0, 0), (3, 5, 2), (36, 20, 5), (10, 7, 4)]:
        a, b = int(offsets[s]), int(offsets[s + 1])
        got = pair_iou(programs[p, a:b], attention[h, a:b])
        assert got == pytest.approx(float(table[p, h, s]), rel=1e-5, abs=1e-6)


def test_pair_iou_reads_square_matrices_like_their_packed_cells(ragged):
    programs, attention, offsets = ragged
    a, b = int(offsets[2]), int(offsets[3])  # the 20-token text
    square = [unpack(x[a:b].numpy(), 20) for x in (programs[4], attention[9])]
    assert pair_iou(*square) == pytest.approx(pair_iou(programs[4, a:b], attention[9, a:b]))


def test_pair_iou_counts_only_causal_cells():
    previous = np.eye(5, k=-1)
    previous[0, 0] = 1.0
    assert pair_iou(previous, previous + np.triu(np.ones((5, 5)), k=1)) == pytest.approx(1.0)


def test_pair_iou_takes_numpy_and_torch_alike():
    rng = np.random.default_rng(0)
    x, y = rng.random(10), rng.random(10)
    assert pair_iou(torch.from_numpy(x).float(), torch.from_numpy(y)) == pytest.approx(
        pair_iou(x, y), rel=1e-6)


def test_pair_iou_of_an_empty_union_is_the_tables_value():
    offsets = torch.from_numpy(causal_offsets([3]))
    zeros = torch.zeros(1, 6)
    assert pair_iou(np.zeros((3, 3)), np.zeros((3, 3))) == soft_iou(zeros, zeros, offsets).item() == 0.0


def test_segment_iou_agrees_with_the_table_on_random_data(ragged):
    programs, attention, offsets = ragged
    table = soft_iou(programs[:21], attention, offsets, impl="torch")  # [21, 21, S]
    own = table[torch.arange(21), torch.arange(21)].T  # [S, 21]: program h against head h
    got = segment_iou(programs[:21].T, attention.T, offsets)
    torch.testing.assert_close(got, own, rtol=1e-5, atol=1e-6)


def test_segment_iou_of_an_empty_union_or_text_is_zero():
    offsets = torch.tensor([0, 3, 3, 6])  # the second text has no cells
    predicted = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    attention = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    assert segment_iou(predicted, attention, offsets).tolist() == [0.0, 0.0, 1.0]


def test_the_l1_gradient_is_autograds():
    total = torch.tensor([2.0, 6.0, 0.0])
    distance = torch.tensor([0.5, 3.0, 0.0], requires_grad=True)
    iou_from_l1(total, distance).sum().backward()
    torch.testing.assert_close(iou_from_l1_grad(total, distance.detach()), distance.grad)


def test_text_sums_sum_each_text(ragged):
    programs, _, offsets = ragged
    sums = text_sums(programs, offsets)
    lengths = torch.tensor([1, 7, 20, 3, 12, 16], dtype=torch.float32)
    torch.testing.assert_close(sums, lengths.expand(37, 6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [[0, 3, 2], [3, 0, 2], [3, 2, 0], [0, 0]])
def test_text_sums_give_zero_for_empty_texts_wherever_they_are(lengths):
    offsets = torch.from_numpy(causal_offsets(lengths))
    values = torch.rand(4, int(offsets[-1]), generator=torch.Generator().manual_seed(0))
    expected = torch.stack([values[:, int(offsets[s]):int(offsets[s + 1])].double().sum(1)
                            for s in range(len(lengths))], dim=1).float()
    torch.testing.assert_close(text_sums(values, offsets), expected, rtol=1e-6, atol=1e-6)


def test_torch_reference_chunks_agree(ragged):
    programs, attention, offsets = ragged
    torch.testing.assert_close(
        sum_min_torch(programs, attention, offsets, chunk_elements=50),
        sum_min_torch(programs, attention, offsets),
    )


def test_mismatched_offsets_raise(ragged):
    programs, attention, offsets = ragged
    with pytest.raises(ValueError, match="offsets end at"):
        sum_min(programs, attention, offsets[:-1], impl="torch")


def test_unknown_impl_raises(ragged):
    with pytest.raises(ValueError, match="impl must be one of"):
        sum_min(*ragged, impl="cuda")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_kernel_matches_reference_at_context_length(dtype):
    lengths = [1, 64, 512, 33, 2048]
    offsets = torch.from_numpy(causal_offsets(lengths))
    programs = causal_rows(70, lengths, seed=5, sparsity=0.9).to("cuda", dtype)
    attention = causal_rows(45, lengths, seed=6).to("cuda", dtype)
    got = sum_min(programs, attention, offsets)  # auto: the Triton kernels
    ref = sum_min_torch(programs.double(), attention.double(), offsets)
    # fp32 sums over up to 16 K cells per split: relative error ~ sqrt(16 K) x 6e-8 ~ 1e-5
    assert_close_scaled(got, ref, 5e-5)


def test_auto_falls_back_to_torch_with_a_warning_when_the_triton_kernel_fails(monkeypatch):
    import attnprog.kernels.iou as iou_module

    def broken_kernel(*args, **kwargs):
        raise RuntimeError("PTX too new for this driver")

    monkeypatch.setattr(iou_module.TRITON_FALLBACK, "failure", None)
    monkeypatch.setattr(iou_module, "resolve_impl", lambda impl, device: "triton")
    monkeypatch.setattr(iou_module, "sum_min_triton", broken_kernel)
    programs, attention = torch.rand(3, 10), torch.rand(2, 10)
    offsets = torch.tensor([0, 1, 10])
    with pytest.warns(RuntimeWarning, match="PTX too new"):
        m = iou_module.sum_min(programs, attention, offsets, impl="auto")
    assert torch.allclose(m, iou_module.sum_min_torch(programs, attention, offsets))
    assert iou_module.TRITON_FALLBACK.failed
    with pytest.raises(RuntimeError):  # forcing the kernel still reports its failure
        iou_module.sum_min(programs, attention, offsets, impl="triton")


def test_auto_sends_one_hot_blocks_to_the_sparse_kernel_and_dense_ones_to_the_dense(kernel_device):
    lengths = [16, 16]
    offsets = torch.from_numpy(causal_offsets(lengths))
    attention = causal_rows(4, lengths, seed=8).to(kernel_device)
    layout = device_layout(attention, offsets)
    one_hot = np.zeros((16, 16), np.float32)
    one_hot[np.arange(16), np.arange(16)] = 1.0  # attend to self: one cell per row
    sparse_rows = torch.from_numpy(np.tile(pack(one_hot), 2)).repeat(16, 1)
    dense_rows = causal_rows(16, lengths, seed=9)
    programs = torch.cat([sparse_rows, dense_rows]).to(kernel_device)
    plan = iou_mod._sparse_plan(programs, layout, block_p=16, p_pad=32, mode="auto")
    assert plan.sparse.tolist() == [[True, True], [False, False]]
