"""Refinement: local search over a program's numbers on synthesis texts, kept only if selection agrees."""

from copy import copy

import numpy as np
import pytest

from attnprog.engine.refine import refine, settings_of, with_settings
from attnprog.synth.fitted import is_fitted, program_from_fit
from attnprog.synth.generator.golden import golden_programs
from attnprog.synth.generator.specs import evaluate_generated, is_generated, program_from_spec, term
from attnprog.synth.program import validate


def recency_program(rate):
    return program_from_spec({"terms": [term("first_token", weight=0.25),
                                        term("recency", {"rate": rate}, weight=0.75)]})


@pytest.fixture(scope="module")
def store(tiny_gpt2, builtin_corpus):
    from attnprog.engine.extract import extract_attention

    model, tokenizer = tiny_gpt2
    return extract_attention(model, tokenizer, builtin_corpus.take(30), batch_size=8, max_tokens=24)


def planted(store, rate_by_split):
    """A copy of the store whose head 0 follows recency_program(rate) with a rate per split."""
    clone = copy(store)
    clone.attn_packed = store.attn_packed.clone()
    sentences = store.sentences()
    for s, split in enumerate(store.splits):
        values = evaluate_generated([recency_program(rate_by_split[split])], [sentences[s]])[0]
        clone.attn_packed[0, int(store.offsets[s]) : int(store.offsets[s + 1])] = \
            clone.attn_packed.new_tensor(values)
    return clone


def test_settings_round_trip_for_fitted_generator_and_hand_written_programs():
    fitted = program_from_fit({"share": 0.3, "weights": {"first": 1.5, "distance": -0.2}}, head="L0.H0")
    generated = recency_program(0.5)
    golden = next(p for p in golden_programs() if settings_of(p))
    for program, check in ((fitted, is_fitted), (generated, is_generated), (golden, validate)):
        values = settings_of(program)
        assert values and settings_of(with_settings(program, values)) == values
        child = with_settings(program, [v * 0.5 for v in values])
        assert settings_of(child) == [v * 0.5 for v in values] and child.source != program.source
        assert check(child) and child.provenance["refined_from"] == program.hash


def test_refinement_finds_the_planted_decay_rate(store):
    head = planted(store, {"synthesis": 0.8, "selection": 0.8, "heldout": 0.8})
    (result,) = refine([recency_program(0.5)], [0], head, progress=False)
    assert result.accepted and result.child_score > result.parent_score
    rate = result.program.provenance["spec"]["terms"][1]["args"]["rate"]
    assert abs(rate - 0.8) < abs(0.5 - 0.8) / 2


def test_a_child_the_selection_split_disagrees_with_is_not_kept(store):
    head = planted(store, {"synthesis": 0.8, "selection": 0.5, "heldout": 0.5})
    parent = recency_program(0.5)
    (result,) = refine([parent], [0], head, progress=False)
    assert not result.accepted and result.program is parent
    assert result.child_score < result.parent_score


def test_refinement_reads_no_heldout_text(store):
    a = planted(store, {"synthesis": 0.8, "selection": 0.8, "heldout": 0.8})
    b = planted(store, {"synthesis": 0.8, "selection": 0.8, "heldout": 0.3})
    (ra,), (rb,) = (refine([recency_program(0.5)], [0], s, progress=False) for s in (a, b))
    assert ra.program.source == rb.program.source and np.isclose(ra.child_score, rb.child_score)
