"""engine.qa: multiple-choice QA loading and scoring."""

import json

import numpy as np
import pytest
import torch

from attnprog.engine.nll import token_logprobs
from attnprog.engine.qa import QAItem, load_qa, qa_accuracy, qa_predictions, tokenise_qa
from attnprog.errors import CorpusError


def test_qa_picks_the_answer_of_a_model_that_learned_it():
    from attnprog.engine.models import tiny_model

    model, tokenizer = tiny_model("gpt2", seed=3)
    story = tokenizer("the cat sat on the mat.")["input_ids"]
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        loss = model(input_ids=torch.tensor([story]), labels=torch.tensor([story])).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()

    items = [QAItem("the cat sat on the", ["dog.", "mat.", "sky."], label=1)]
    pairs = tokenise_qa(items, tokenizer)
    predictions = qa_predictions(items, pairs, token_logprobs(model, [p.ids for p in pairs]))
    assert predictions.tolist() == [1]
    assert qa_accuracy(items, predictions) == 1.0


def test_qa_scores_the_mean_log_prob_of_completion_tokens_only():
    items = [QAItem("ab", ["c", "dd"], label=1)]
    pairs = [type("P", (), {"question": 0, "choice": c, "completion_start": 2})() for c in (0, 1)]
    # context tokens are very unlikely for choice 1, but only completion tokens count
    logprobs = [np.array([0.0, -3.0]), np.array([-50.0, -1.0, -2.0])]
    assert qa_predictions(items, pairs, logprobs).tolist() == [1]


def test_builtin_qa_sample_loads():
    items = load_qa()
    assert 30 <= len(items) <= 40
    assert all(0 <= item.label < len(item.choices) for item in items)


def test_hellaswag_piqa_and_arc_fields_are_mapped(tmp_path):
    records = [
        {"ctx": "A man opens a door", "endings": ["and walks in.", "and eats it."], "label": "0"},
        {"goal": "Dry wet hands", "sol1": "use a towel", "sol2": "use water", "label": 0},
        {"question": {"stem": "What is hot?", "choices": [{"text": "ice", "label": "A"},
                                                            {"text": "fire", "label": "B"}]},
         "answerKey": "B"},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    items = load_qa(path)
    assert [item.label for item in items] == [0, 0, 1]
    assert items[2].context == "Question: What is hot?\nAnswer:"
    assert items[1].choices == ["use a towel", "use water"]


def test_malformed_qa_line_is_a_corpus_error_with_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "x", "choices": ["a", "b"], "label": 0}\n{"context": "y"}\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2"):
        load_qa(path)


def test_long_qa_pairs_keep_their_completion(tiny_gpt2):
    # a context longer than max_tokens loses its start, never the choice being scored
    _, tokenizer = tiny_gpt2
    items = [QAItem("a " * 40 + "the cat sat on the", ["mat.", "sky."], label=0)]
    pairs = tokenise_qa(items, tokenizer, max_tokens=16)
    for pair, choice in zip(pairs, items[0].choices, strict=True):
        assert len(pair.ids) <= 16 and pair.completion_start < len(pair.ids)
        assert pair.sentence.ids == pair.ids
        assert tokenizer.decode(pair.ids[pair.completion_start:]).strip().endswith(choice)
