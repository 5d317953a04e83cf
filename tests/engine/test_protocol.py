"""engine.protocol: the paper's same-texts best fit, and the interval of our held-out figure."""

import numpy as np
import pytest
import torch

from attnprog.engine.protocol import best_fit_iou_by_length, protocol_figures, same_text_best_fits
from attnprog.engine.rank import rank
from attnprog.errors import StoreError
from tests.engine.test_rank import PLANTED, make_outputs, make_store


def test_each_draw_is_the_best_program_on_its_own_texts():
    per_text = torch.rand(6, 4, 12, generator=torch.Generator().manual_seed(0))
    heads = [0, 2, 3]
    (figure,) = same_text_best_fits(per_text, heads, draws=1, texts_per_draw=5, seed=3)
    texts = np.random.default_rng(3).choice(12, size=5, replace=False)
    expected = per_text[:, heads][:, :, texts].mean(2).max(0).values.mean()
    assert figure == pytest.approx(float(expected))


def test_choosing_on_the_reported_texts_is_never_below_a_fixed_choice():
    per_text = torch.rand(6, 4, 12, generator=torch.Generator().manual_seed(1))
    figures = same_text_best_fits(per_text, range(4), draws=20, texts_per_draw=5)
    fixed = per_text[0].mean().item()  # one program for every head, over all texts
    assert figures.shape == (20,) and figures.min() > fixed


def test_too_few_texts_for_a_draw_is_a_user_error():
    with pytest.raises(StoreError, match="draws 5 texts"):
        same_text_best_fits(torch.rand(2, 2, 3), [0, 1])


def test_protocol_figures_on_a_planted_store():
    store, outputs = make_store(PLANTED), make_outputs()
    best_index = rank(store, outputs, split="selection").best()[1]
    figures = protocol_figures(store, outputs, best_index, [0, 1, 2, 3], split="selection")
    paper = figures["paper_protocol_iou"]
    assert paper["min"] <= paper["mean"] <= paper["max"] <= 1.0
    ours = rank(store, outputs, split="selection").best()[0].mean().item()
    low, high = figures["mean_best_fit_iou_ci"]
    assert low <= ours <= high


def test_too_few_texts_leave_the_paper_figure_out_but_keep_the_interval():
    store, outputs = make_store(PLANTED), make_outputs()
    best_index = rank(store, outputs, split="selection").best()[1]
    figures = protocol_figures(store, outputs, best_index, [0, 1], split="heldout")  # 3 texts
    assert figures["paper_protocol_iou"] is None
    assert len(figures["mean_best_fit_iou_ci"]) == 2


def test_best_fits_on_whole_texts_score_their_held_out_iou():
    from attnprog.engine.rank import rank_with_heldout

    store, outputs = make_store(PLANTED), make_outputs()
    table = rank_with_heldout(store, outputs)
    figures = best_fit_iou_by_length(store, outputs, table.best()[1], range(4), lengths=(100,))
    assert figures["100"] == pytest.approx(float(table.heldout_iou.mean()), abs=1e-6)


def test_best_fits_on_the_first_tokens_score_the_texts_cut_there():
    from attnprog.kernels.iou import pair_iou
    from attnprog.layout import unpack

    store, outputs = make_store(PLANTED), make_outputs()
    best_index = rank(store, outputs, split="selection").best()[1]
    figures = best_fit_iou_by_length(store, outputs, best_index, [2], lengths=(4,))
    expected = []
    for s in store.split_indices("heldout"):  # head 2's program and attention, cut by hand
        n = int(store.lengths[s])
        a, b = int(store.offsets[s]), int(store.offsets[s + 1])
        program = unpack(outputs.values[int(best_index[2]), a:b], n)[:4, :4]
        attention = unpack(store.attn_packed[2, a:b].numpy(), n)[:4, :4]
        expected.append(pair_iou(program, attention))
    assert figures["4"] == pytest.approx(np.mean(expected), abs=1e-6)
