"""What each term of a fitted program is worth, and the shortest program that fits."""

import pytest
import torch

from attnprog.engine.fit import fit_scores
from attnprog.engine.terms import term_counts, term_reports, terms_needed
from attnprog.synth.fitted import evaluate_fits

# head 0 attends exactly as this two-term fit says; head 1 as the sink share alone
TRUE = [{"share": 0.3, "weights": {"previous_1": 3.0, "distance": -0.7}},
        {"share": 0.8, "weights": {}}]
# the programs handed in: the two true terms and two that do nothing useful; the share alone
GIVEN = [{"share": 0.3, "weights": {"self": 0.05, "previous_1": 3.0, "capitalised": -0.05,
                                    "distance": -0.7}},
         {"share": 0.8, "weights": {}}]


@pytest.fixture(scope="module")
def store(tiny_gpt2, builtin_corpus):
    """A tiny model's store whose heads 0 and 1 attend exactly as the TRUE fits compute."""
    from attnprog.engine.extract import extract_attention

    model, tokenizer = tiny_gpt2
    store = extract_attention(model, tokenizer, builtin_corpus.take(30), batch_size=8, max_tokens=24)
    store.attn_packed[:2] = torch.from_numpy(evaluate_fits(TRUE, store.sentences()))
    return store


@pytest.fixture(scope="module")
def reports(store):
    return term_reports(store, GIVEN, [0, 1])


def test_terms_are_ranked_by_the_iou_lost_without_each(reports):
    report = reports[0]
    assert set(report.ranked[:2]) == {"previous_1", "distance"}
    assert all(report.contributions[name] > 0.05 for name in ("previous_1", "distance"))
    assert all(abs(report.contributions[name]) < 0.01 for name in ("self", "capitalised"))
    assert report.share_contribution > 0.05


def test_the_torch_measure_equals_the_emitted_programs_iou(store, reports):
    expected = fit_scores(GIVEN, store, "synthesis", rows=[0, 1])
    assert [r.synthesis_iou for r in reports] == pytest.approx(expected, abs=1e-4)


def test_iou_by_terms_rises_to_the_true_terms_and_terms_needed_is_their_count(reports):
    by_terms = reports[0].iou_by_terms
    assert sorted(by_terms) == [1, 2, 3, 4]
    assert by_terms[2] > 0.99 and by_terms[1] < by_terms[2] - 0.05  # refitted: the truth again
    assert by_terms[3] >= by_terms[2] - 0.01 and by_terms[4] >= by_terms[2] - 0.01
    assert reports[0].terms_needed == 2
    assert list(reports[0].shortest["weights"]) == reports[0].ranked[:2]


def test_each_cut_keeps_terms_of_the_next_larger_one(reports):
    cuts = reports[0].cuts
    sizes = sorted(cuts)
    for smaller, larger in zip(sizes, sizes[1:]):
        assert set(cuts[smaller]["weights"]) <= set(cuts[larger]["weights"])
        assert len(cuts[smaller]["weights"]) == smaller


def test_a_program_of_its_share_alone_needs_no_terms(reports):
    assert list(reports[1].iou_by_terms) == [0] and reports[1].iou_by_terms[0] > 0.99
    assert reports[1].terms_needed == 0 and reports[1].ranked == []


@pytest.mark.parametrize("n_terms, counts", [(12, [1, 2, 3, 4, 6, 8, 12]), (5, [1, 2, 3, 4, 5]),
                                             (1, [1]), (0, [0])])
def test_term_counts_stop_at_the_programs_own(n_terms, counts):
    assert term_counts(n_terms) == counts


def test_terms_needed_is_the_fewest_within_the_tolerance_of_the_best():
    assert terms_needed({1: 0.5, 2: 0.7, 3: 0.795, 4: 0.8, 6: 0.79}) == 3
    assert terms_needed({1: 0.9, 2: 0.89}) == 1
