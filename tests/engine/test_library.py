"""Library selection: greedy coverage over an IoU table, measured on held-out texts with baselines."""

import numpy as np
import pytest
import torch

from attnprog.engine.library import (
    Library,
    baseline_outputs,
    greedy_coverage,
    prefix_assignment,
    random_program_choice,
    select_library,
)
from attnprog.engine.rank import rank_with_heldout
from attnprog.layout import causal_offsets, pack
from tests.engine.planted import first_token, previous_token, self_token
from tests.engine.planted import pattern_outputs as outputs_of
from tests.engine.planted import planted_store as make_store

LENGTHS = [6, 9, 4, 12, 7, 10, 5, 8]
SPLITS = ["selection"] * 5 + ["heldout"] * 3


PATTERNS = [first_token, previous_token, self_token]


def planted_store(planted):
    """1 layer; head r is 0.9 * PATTERNS[planted[r]] + 0.1 * uniform noise."""
    return make_store(planted, PATTERNS, LENGTHS, SPLITS, 0.9, meta={"model_id": "hand-built"})


def pattern_outputs():
    return outputs_of(PATTERNS, LENGTHS, source=lambda fn: f"# {fn.__name__}\n")


# --- greedy coverage ---------------------------------------------------------------------------


def test_greedy_adds_first_the_program_that_raises_the_mean_iou_most():
    iou = torch.tensor([[0.9, 0.1, 0.1], [0.5, 0.5, 0.5], [0.1, 0.9, 0.9]])
    chosen, gains, curve = greedy_coverage(iou, max_size=3, min_gain=0.0)
    assert chosen[0] == 2  # mean 0.633 beats 0.5 and 0.367
    assert chosen[1] == 0 and gains[1] == pytest.approx(0.8 / 3)
    assert curve[1] == pytest.approx(0.9)


def test_greedy_curve_never_decreases_and_gains_never_increase():
    iou = torch.rand(200, 30, generator=torch.Generator().manual_seed(1))
    _, gains, curve = greedy_coverage(iou, max_size=50, min_gain=0.0)
    assert all(b >= a for a, b in zip(curve, curve[1:]))
    assert all(b <= a + 1e-7 for a, b in zip(gains, gains[1:]))


def test_greedy_stops_at_the_size_cap():
    iou = torch.rand(100, 20, generator=torch.Generator().manual_seed(2))
    chosen, _, _ = greedy_coverage(iou, max_size=7, min_gain=0.0)
    assert len(chosen) == 7 and len(set(chosen)) == 7


def test_greedy_stops_when_no_program_gains_enough():
    iou = torch.tensor([[0.9, 0.9], [0.9, 0.91], [0.1, 0.1]])
    chosen, _, curve = greedy_coverage(iou, max_size=10, min_gain=0.01)
    assert chosen == [1] and curve == [pytest.approx(0.905)]


def test_greedy_library_reaches_the_best_fit_of_every_head_when_uncapped():
    iou = torch.rand(50, 12, generator=torch.Generator().manual_seed(3))
    _, _, curve = greedy_coverage(iou, max_size=50, min_gain=0.0)
    assert curve[-1] == pytest.approx(float(iou.max(0).values.mean()))


def test_prefix_assignment_uses_each_heads_best_selection_program_and_quotes_its_heldout_iou():
    selection = torch.tensor([[0.8, 0.2], [0.3, 0.9]])
    heldout = torch.tensor([[0.7, 0.1], [0.2, 0.6]])
    curve, choice = prefix_assignment(selection, heldout)
    assert choice.tolist() == [0, 1]
    assert curve == [pytest.approx(0.4), pytest.approx(0.65)]


# --- baselines -------------------------------------------------------------------------------------


def test_uniform_baseline_spreads_each_row_over_every_earlier_token():
    outputs = baseline_outputs([4], causal_offsets([4]))
    assert np.allclose(outputs.values[0], pack(np.tril(np.ones((4, 4))) / np.arange(1, 5)[:, None]))


def test_random_token_baseline_is_one_causal_token_per_row_and_fixed_by_the_seed():
    a = baseline_outputs(LENGTHS, causal_offsets(LENGTHS), seed=3).values[1]
    b = baseline_outputs(LENGTHS, causal_offsets(LENGTHS), seed=3).values[1]
    c = baseline_outputs(LENGTHS, causal_offsets(LENGTHS), seed=4).values[1]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.sum() == sum(LENGTHS)  # one cell per row, and pack() holds only causal cells


def test_random_program_baseline_draws_what_the_replacement_sweep_draws():
    expected = np.random.default_rng(5).integers(0, 40, size=12)
    assert np.array_equal(random_program_choice(40, 12, seed=5), expected)


# --- the library on planted heads --------------------------------------------------------------------


@pytest.fixture
def planted():
    store = planted_store([0, 1, 1, 0, 2])
    outputs = pattern_outputs()
    return store, outputs, rank_with_heldout(store, outputs)


def test_library_on_planted_heads_holds_exactly_the_planted_programs(planted):
    library = select_library(*planted, min_gain=1e-4)
    assert sorted(p.name for p in library.programs) == ["first_token", "previous_token", "self_token"]
    assert library.programs[0].name in ("first_token", "previous_token")  # two heads each
    assert [library.programs[k].name for k in library.assignment] == [
        "first_token", "previous_token", "previous_token", "first_token", "self_token"]


def test_library_iou_is_measured_on_heldout_texts_and_beats_every_baseline(planted):
    store, outputs, table = planted
    library = select_library(store, outputs, table)
    assert library.heldout_iou == pytest.approx(table.heldout_iou.tolist())
    assert library.mean_iou > 0.8
    assert set(library.baselines) == {"uniform causal", "random token", "random program"}
    assert all(value < library.mean_iou for value in library.baselines.values())


def test_library_size_cap_trades_iou_for_size(planted):
    small = select_library(*planted, max_size=1)
    full = select_library(*planted)
    assert small.size == 1 and small.mean_iou < full.mean_iou
    assert full.curve_heldout[0] == pytest.approx(small.mean_iou)


def test_library_of_a_head_subset_covers_only_those_heads(planted):
    library = select_library(*planted, heads=[4])
    assert library.heads == [4] and [p.name for p in library.programs] == ["self_token"]


def test_library_round_trips_through_json(planted, tmp_path):
    library = select_library(*planted)
    loaded = Library.load(library.save(tmp_path / "library.json"))
    assert loaded.indices == library.indices and loaded.programs == library.programs
    assert loaded.mean_iou == pytest.approx(library.mean_iou)
    assert loaded.heads_using(0) == library.heads_using(0) != []
