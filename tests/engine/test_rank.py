"""rank(): IoU tables on a hand-built store whose heads are noisy copies of known programs."""

import numpy as np
import pytest
import torch

from attnprog.engine.rank import IoUTable, rank, rank_with_heldout
from attnprog.errors import StoreError
from attnprog.layout import causal_offsets
from tests.engine.planted import (
    first_token,
    pattern_outputs,
    planted_store,
    previous_token,
    self_token,
    uniform,
)

LENGTHS = [5, 9, 3, 12, 7, 10, 4, 8]
SPLITS = ["selection"] * 5 + ["heldout"] * 3


PATTERNS = [first_token, previous_token, self_token, uniform]


def make_store(planted, seed=0):
    """2 layers x 2 heads; head r is 0.8 * PATTERNS[planted[r]] + 0.2 * noise, rows normalised."""
    return planted_store(planted, PATTERNS, LENGTHS, SPLITS, 0.8, n_layers=2, seed=seed,
                         meta={"model": "hand-built"})


def make_outputs():
    return pattern_outputs(PATTERNS, LENGTHS)


PLANTED = [1, 0, 3, 2]  # head row -> index of the pattern it copies


@pytest.fixture
def store():
    return make_store(PLANTED)


@pytest.fixture
def outputs():
    return make_outputs()


def test_rank_picks_the_planted_program_per_head(store, outputs):
    table = rank(store, outputs, split="selection")
    best_iou, best_index = table.best()
    assert best_index.tolist() == PLANTED
    assert (best_iou > 0.6).all()
    assert table.iou.shape == (4, 4) and table.iou.dtype == torch.float32


def test_chunked_streaming_equals_unchunked(store, outputs):
    whole = rank(store, outputs, chunk_programs=None)
    one_by_one = rank(store, outputs, chunk_programs=1)
    torch.testing.assert_close(one_by_one.iou, whole.iou, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["numba", "triton"])
def test_paths_agree_with_torch(store, outputs, impl):
    from attnprog.kernels import iou as iou_mod

    if impl == "triton" and not (torch.cuda.is_available() or iou_mod._interpreted()):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1 before import")
    torch.testing.assert_close(
        rank(store, outputs, impl=impl).iou, rank(store, outputs, impl="torch").iou,
        rtol=1e-5, atol=1e-6,
    )


def test_per_text_values_average_to_the_table(store, outputs):
    table = rank(store, outputs, per_text=True)
    assert table.per_text.shape == (4, 4, 5)
    torch.testing.assert_close(table.per_text.mean(dim=2), table.iou)


def test_failed_text_scores_zero(store, outputs):
    outputs.failed[1, 2] = True
    table = rank(store, outputs, per_text=True)
    assert (table.per_text[1, :, 2] == 0).all()
    assert (table.per_text[1, :, 1] > 0).all()


def test_nan_program_scores_zero_never_nan(store, outputs):
    start, end = int(store.offsets[3]), int(store.offsets[4])
    outputs.values[0, start:end] = np.nan
    outputs.values[2, :] = np.inf
    table = rank(store, outputs, per_text=True)
    assert not torch.isnan(table.iou).any() and not torch.isnan(table.per_text).any()
    assert (table.per_text[0, :, 3] == 0).all() and (table.iou[2] == 0).all()


def test_heldout_iou_is_the_best_fit_measured_on_heldout(store, outputs):
    table = rank_with_heldout(store, outputs)
    held = rank(store, outputs, split="heldout")
    expected = held.iou[torch.tensor(PLANTED), torch.arange(4)]
    torch.testing.assert_close(table.heldout_iou, expected)
    assert [fit.reported_iou for fit in table.best_fits()] == pytest.approx(expected.tolist())


def test_topk_is_sorted_and_starts_with_best(store, outputs):
    table = rank(store, outputs)
    values, indices = table.topk(3)
    assert values.shape == (4, 3)
    assert (values[:, :-1] >= values[:, 1:]).all()
    assert indices[:, 0].tolist() == table.best()[1].tolist()


def test_best_fits_name_layer_head_and_program(store, outputs):
    fits = rank(store, outputs).best_fits()
    assert [(f.layer, f.head, f.name) for f in fits] == [
        (0, 0, "previous_token"), (0, 1, "first_token"), (1, 0, "uniform"), (1, 1, "self_token")
    ]


def test_table_round_trips_through_a_file(store, outputs, tmp_path):
    table = rank_with_heldout(store, outputs, per_text=True)
    loaded = IoUTable.load(table.save(tmp_path / "table.safetensors"))
    torch.testing.assert_close(loaded.iou, table.iou)
    torch.testing.assert_close(loaded.per_text, table.per_text)
    torch.testing.assert_close(loaded.heldout_iou, table.heldout_iou)
    assert loaded.programs == table.programs and loaded.split == "selection"
    assert (loaded.n_layers, loaded.n_heads, loaded.text_indices) == (2, 2, [0, 1, 2, 3, 4])


def test_outputs_from_another_corpus_raise(store, outputs):
    outputs.offsets = causal_offsets(LENGTHS[:-1])
    with pytest.raises(StoreError, match="evaluate the programs"):
        rank(store, outputs)


def test_unknown_split_raises(store, outputs):
    with pytest.raises(StoreError, match="no texts in split"):
        rank(store, outputs, split="synthesis")


def test_loading_a_missing_table_raises(tmp_path):
    with pytest.raises(StoreError, match="attnprog rank"):
        IoUTable.load(tmp_path / "nope.safetensors")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_rank_matches_cpu(store, outputs):
    cpu = rank(store, outputs, per_text=True)
    gpu = rank(make_store(PLANTED).to("cuda"), outputs, per_text=True)
    torch.testing.assert_close(gpu.per_text, cpu.per_text, rtol=1e-5, atol=1e-5)


def test_cli_rank_writes_the_table_and_prints_best_fits(store, outputs, tmp_path):
    from typer.testing import CliRunner

    from attnprog.cli import app

    store.save(tmp_path / "store.safetensors")
    outputs.save(tmp_path / "outputs.safetensors")
    result = CliRunner().invoke(app, [
        "rank", "--store", str(tmp_path / "store.safetensors"),
        "--outputs", str(tmp_path / "outputs.safetensors"),
        "--out", str(tmp_path / "table.safetensors"), "--device", "cpu", "--top", "2",
    ])
    assert result.exit_code == 0, result.output
    table = IoUTable.load(tmp_path / "table.safetensors")
    assert table.best()[1].tolist() == PLANTED and table.heldout_iou is not None
    assert "previous_token" in result.output or "first_token" in result.output


def test_cli_rank_needs_a_pool_or_outputs(tmp_path):
    from typer.testing import CliRunner

    from attnprog.cli import app

    result = CliRunner().invoke(app, ["rank", "--store", str(tmp_path / "s.safetensors")])
    assert result.exit_code != 0 and "exactly one of --pool" in str(result.exception)


def test_bench_reports_rates_and_ratios():
    from attnprog.kernels.bench import format_results, run_rank_bench

    rows = run_rank_bench("cpu", shapes=[(20, 10)], kinds=("sparse",), n_texts=2, n=8,
                          verbose=False)
    assert rows[0]["kernel"] > 0 and rows[0]["x_torch"] == rows[0]["kernel"] / rows[0]["torch"]
    assert "x torch" in format_results(rows)


def test_rank_leaves_the_outputs_untouched(store, outputs):
    outputs.values[3, :4] = -1.0
    before = outputs.values.copy()
    rank(store, outputs, split=None)
    np.testing.assert_array_equal(outputs.values, before)


def test_table_names_the_stores_model(outputs):
    store = make_store(PLANTED)
    store.meta["model_id"] = "tiny-gpt2@abc"
    assert rank(store, outputs).meta["model"] == "tiny-gpt2@abc"


@pytest.mark.parametrize("split", [None, "selection"])
def test_ranking_streamed_outputs_equals_ranking_dense_outputs(tiny_gpt2, split):
    from attnprog.engine.corpus import make_corpus
    from attnprog.engine.extract import extract_attention
    from attnprog.synth.generator.golden import golden_programs
    from attnprog.synth.generator.specs import generate
    from attnprog.synth.runtime.evaluate import evaluate_programs

    model, tokenizer = tiny_gpt2
    texts = make_corpus([f"Tom saw {i} cats, and the cats saw Tom." for i in range(12)])
    store = extract_attention(model, tokenizer, texts, progress=False)
    programs = golden_programs()[:4] + generate(n_min=60)
    kwargs = dict(corpus_hash=store.meta["corpus_hash"], use_cache=False, progress=False)
    dense = evaluate_programs(programs, store.sentences(), **kwargs)
    streamed = evaluate_programs(programs, store.sentences(), stream=True, **kwargs)
    by_dense = rank(store, dense, split=split, chunk_programs=7)
    by_stream = rank(store, streamed, split=split, chunk_programs=7)  # rows of the split's texts
    assert torch.equal(by_dense.iou, by_stream.iou)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_made_generator_rows_rank_like_cpu_rows(tiny_gpt2):
    from attnprog.engine.corpus import make_corpus
    from attnprog.engine.extract import extract_attention
    from attnprog.engine.rank import rank_with_heldout
    from attnprog.synth.generator.golden import golden_programs
    from attnprog.synth.generator.specs import generate
    from attnprog.synth.runtime.evaluate import evaluate_programs

    model, tokenizer = tiny_gpt2
    texts = make_corpus([f"Ann met {i} dogs; the dogs met Ann." for i in range(16)])
    store = extract_attention(model, tokenizer, texts, progress=False)
    programs = golden_programs()[:4] + generate(n_min=60)
    kwargs = dict(corpus_hash=store.meta["corpus_hash"], use_cache=False, progress=False)
    dense = evaluate_programs(programs, store.sentences(), **kwargs)  # numpy rows
    streamed = evaluate_programs(programs, store.sentences(), stream=True, **kwargs)
    split, heldout = store.splits[0], store.splits[-1]
    on_cpu_rows = rank_with_heldout(store.to("cuda"), dense, split=split, heldout_split=heldout)
    on_gpu_rows = rank_with_heldout(store, streamed, split=split, heldout_split=heldout)
    # the whole table (near-ties may pick other winners, so held-out figures are not compared)
    torch.testing.assert_close(on_gpu_rows.iou, on_cpu_rows.iou, rtol=1e-4, atol=1e-5)
    assert on_gpu_rows.heldout_iou.shape == on_cpu_rows.heldout_iou.shape


def test_rows_are_made_on_the_gpu_only_for_streamed_outputs_on_cuda(store, outputs):
    from attnprog.engine.rank import _device_rows

    assert _device_rows(outputs, torch.device("cpu")) is None
    assert _device_rows(outputs, torch.device("cuda")) is None  # dense outputs: rows are there
