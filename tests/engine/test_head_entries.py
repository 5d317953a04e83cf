"""heads.json: one entry per head with its type, its best program by name and terms, the
held-out IoU by number of terms and the fewest terms that fit."""

import json

import pytest
import torch

from attnprog.engine.head_entries import explain_heads, heads_figures, program_names
from attnprog.engine.head_types import PATTERNS
from attnprog.engine.rank import IoUTable
from attnprog.synth.fitted import evaluate_fits, program_from_fit
from attnprog.synth.generator.golden import golden_programs
from tests.engine.test_terms import GIVEN, TRUE

ENTRY_KEYS = {"head", "head_index", "type", "type_scores", "program", "iou_by_terms", "terms_needed"}
PROGRAM_KEYS = {"name", "hash", "family", "heldout_iou", "terms"}


@pytest.fixture(scope="module")
def document(tiny_gpt2, builtin_corpus):
    """Heads 0 and 1 of a tiny model's store attend as TRUE says and carry GIVEN's fits; head 2's
    best program is a golden one; head 3's best is head 0's fitted program."""
    from attnprog.engine.extract import extract_attention

    model, tokenizer = tiny_gpt2
    store = extract_attention(model, tokenizer, builtin_corpus.take(30), batch_size=8, max_tokens=24)
    store.attn_packed[:2] = torch.from_numpy(evaluate_fits(TRUE, store.sentences()))
    fitted = [program_from_fit(fit, head=f"L0.H{h}", model_id="tiny") for h, fit in enumerate(GIVEN)]
    golden = golden_programs()[0]
    iou = torch.tensor([[0.9, 0.1, 0.1, 0.8] + [0.0] * 4, [0.1, 0.9, 0.1, 0.1] + [0.0] * 4,
                        [0.2, 0.2, 0.7, 0.2] + [0.5] * 4])
    table = IoUTable(iou=iou, programs=fitted + [golden], split="selection", n_layers=2, n_heads=4,
                     heldout_iou=torch.tensor([0.88, 0.87, 0.66, 0.77, 0.5, 0.5, 0.5, 0.5]))
    return explain_heads(store, table, [0, 1, 2, 3], fitted, model=model, tokenizer=tokenizer,
                         progress=False)


def test_one_entry_per_head_with_every_key(document):
    entries = document["heads"]
    assert [e["head"] for e in entries] == ["L0.H0", "L0.H1", "L0.H2", "L0.H3"]
    for entry in entries:
        assert ENTRY_KEYS <= set(entry) and PROGRAM_KEYS <= set(entry["program"])
        assert set(entry["type_scores"]) == set(PATTERNS)
    for term in entries[0]["program"]["terms"]:
        assert set(term) == {"term", "label", "weight", "contribution"}
    json.loads(json.dumps(document))  # plain JSON


def test_a_fitted_best_program_lists_its_terms_by_contribution_and_the_fewest_that_fit(document):
    head = document["heads"][0]
    contributions = [t["contribution"] for t in head["program"]["terms"]]
    assert contributions == sorted(contributions, reverse=True)
    assert list(head["iou_by_terms"]) == ["1", "2", "3", "4"] and head["terms_needed"] == 2
    assert head["shortest"]["terms"] == 2 and "source" in head["shortest"]
    assert head["program"]["name"].startswith("first token 30 % · ")


def test_another_heads_program_is_described_as_fitted_to_that_head(document):
    head = document["heads"][3]
    assert head["program"]["fitted_to"] == "L0.H0" and head["program"]["terms"]
    assert head["iou_by_terms"] == {} and head["terms_needed"] is None  # no program of its own


def test_names_are_short_and_never_a_hash(document):
    names = program_names(document)
    assert len(names) >= 3
    for program_hash, name in names.items():
        assert 0 < len(name) <= 60 and program_hash not in name
    assert document["heads"][2]["program"]["name"] == "First-token head"


def test_the_summary_figures_count_types_and_take_the_median_of_terms_needed(document):
    figures = heads_figures(document)
    assert sum(figures["head_types"].values()) == 4
    assert figures["median_terms_needed"] == 1.0  # heads 0 and 1: 2 and 0 terms
