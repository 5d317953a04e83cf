"""Fitting a program to every head: readable, reproducible, and blind to held-out texts."""

import json

import numpy as np
import pytest
import torch

from attnprog.engine.fit import (
    FitSettings,
    corpus_features,
    distinct_features,
    fit_scores,
    fit_store,
    fitted_programs,
    mean_iou,
    model_cells,
    text_iou,
)
from attnprog.synth.features import attach_syntax
from attnprog.synth.fitted import evaluate_fits, feature

QUICK = FitSettings(max_terms=5, search_steps=80, refit_steps=80, key_tokens=10, query_tokens=5)


PATTERNS = [  # what each tiny head is made to look like, on top of its own near-uniform attention
    [("first_token", {}, 0.6), ("recency", {"rate": 0.7}, 0.4)], [("previous", {"k": 1}, 1.0)],
    [("punctuation", {}, 0.5), ("first_token", {}, 0.5)], [("self_token", {}, 1.0)],
    [("induction", {}, 0.7), ("first_token", {}, 0.3)], [("recency", {"rate": 0.5}, 1.0)],
    [("sentence_start", {}, 1.0)], [("word_start", {}, 0.5), ("previous", {"k": 2}, 0.5)],
]


@pytest.fixture(scope="module")
def store(tiny_gpt2, builtin_corpus):
    """A tiny model's store whose heads are pushed towards distinct known patterns (a random
    tiny model attends almost uniformly, which would make every fit trivial)."""
    from attnprog.engine.extract import extract_attention
    from attnprog.synth.generator.specs import evaluate_generated, program_from_spec, term

    model, tokenizer = tiny_gpt2
    store = extract_attention(model, tokenizer, builtin_corpus.take(30), batch_size=8, max_tokens=24)
    programs = [program_from_spec({"terms": [term(p, a, "first" if p in ("induction", "previous")
                                                  else None, w) for p, a, w in pattern]})
                for pattern in PATTERNS]
    pattern = torch.from_numpy(evaluate_generated(programs, store.sentences()))
    store.attn_packed = 0.8 * pattern + 0.2 * store.attn_packed.float()
    return store


@pytest.fixture(scope="module")
def fits(store):
    return fit_store(store, settings=QUICK, progress=False)


def with_heldout_replaced(store, split="heldout", seed=0):
    """A copy of the store whose ``split`` texts hold random (row-stochastic) attention."""
    from copy import copy

    from attnprog.layout import pack

    clone = copy(store)
    clone.attn_packed = store.attn_packed.clone()
    rng = np.random.default_rng(seed)
    for s in store.split_indices(split):
        n = int(store.lengths[s])
        for row in range(store.n_rows):
            m = np.tril(rng.random((n, n)))
            m /= m.sum(axis=1, keepdims=True)
            a, b = int(store.offsets[s]), int(store.offsets[s + 1])
            clone.attn_packed[row, a:b] = torch.from_numpy(pack(m)).to(clone.attn_packed.dtype)
    return clone


def test_one_fit_per_head_with_at_most_max_terms_features(store, fits):
    assert len(fits) == store.n_rows
    for fit in fits:
        assert len(fit["weights"]) <= QUICK.max_terms and 0.0 <= fit["share"] < 1.0
        for name in fit["weights"]:
            feature(name)  # every name is a known feature


def test_a_feature_equal_to_an_earlier_one_or_zero_everywhere_is_not_offered(store):
    sentences = store.sentences(store.split_indices("synthesis"))
    names = ["first", "self_punct", "newline", "self_from_punct", "previous_1"]
    kept, data = distinct_features(names, corpus_features(sentences, names))
    assert kept == ["first", "self_punct", "previous_1"]  # the stories hold no line break
    assert torch.equal(data.values, corpus_features(sentences, kept).values)


def test_fits_beat_the_uniform_pattern_on_the_texts_they_were_fitted_on(store, fits):
    uniform = [{"share": 0.0, "weights": {}}] * store.n_rows
    fitted_iou = fit_scores(fits, store, "synthesis")
    assert (fitted_iou > fit_scores(uniform, store, "synthesis") + 0.05).all()


def test_the_torch_model_and_the_numpy_programs_compute_the_same_matrices(store, fits):
    texts = store.split_indices("synthesis")
    sentences = store.sentences(texts)
    attach_syntax(sentences)  # as fit_store does: a fit may keep a POS feature
    names = sorted({k for f in fits for k in f["weights"]})
    data = corpus_features(sentences, names)
    weights = torch.tensor([[f["weights"].get(k, 0.0) for k in names] for f in fits],
                           dtype=torch.float32) * data.scale
    shares = torch.tensor([f["share"] for f in fits])
    torch_cells = model_cells(weights, shares, data).T.numpy()
    np.testing.assert_allclose(evaluate_fits(fits, sentences), torch_cells, atol=1e-5)


@pytest.mark.parametrize("target", ["attention", "the model itself"])
def test_the_hand_written_gradient_equals_autograds(store, target):
    from attnprog.engine.fit import vocabulary

    texts = store.split_indices("synthesis")
    sentences = store.sentences(texts)
    data = corpus_features(sentences, vocabulary(sentences, 10))
    cells = torch.cat([torch.arange(int(store.offsets[s]), int(store.offsets[s + 1])) for s in texts])
    attn = store.attn_packed[:, cells].float().T.contiguous()  # [C, H]
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(attn.shape[1], data.values.shape[1], generator=gen)
    logit = torch.randn(attn.shape[1], generator=gen)
    if target == "the model itself":  # |pred - attn| has its kink at every cell
        attn = model_cells(weights, torch.sigmoid(logit), data)
    head_weights = torch.arange(1.0, attn.shape[1] + 1)  # a different gradient for every head

    results = []
    for mean in (mean_iou, lambda w, s, a, d: text_iou(model_cells(w, s, d), a, d).mean(dim=0)):
        w, lg = weights.clone().requires_grad_(True), logit.clone().requires_grad_(True)
        iou = mean(w, torch.sigmoid(lg), attn, data)
        (iou * head_weights).sum().backward()
        results.append((iou.detach(), w.grad, lg.grad))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_the_hand_written_gradient_can_be_taken_twice(store):
    from attnprog.engine.fit import vocabulary

    sentences = store.sentences(store.split_indices("synthesis"))
    data = corpus_features(sentences, vocabulary(sentences, 0))
    weights = torch.randn(2, data.values.shape[1], requires_grad=True)
    attn = torch.rand(data.values.shape[0], 2)
    iou = mean_iou(weights, torch.full((2,), 0.3), attn, data)
    first = torch.autograd.grad(iou.sum(), weights, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(iou.sum(), weights)[0], first)


def test_fitted_programs_run_unchanged_in_the_sandbox_and_reproduce_the_fit(store):
    from attnprog.synth.fitted import evaluate_fitted
    from attnprog.synth.runtime.sandbox import Sandbox
    from attnprog.synth.runtime.validate import validate_many

    programs = fitted_programs(store, settings=QUICK, progress=False)
    assert all(r.ok for r in validate_many(programs))
    sentences = store.sentences(store.split_indices("heldout"))
    expected = evaluate_fitted(programs, sentences)
    with Sandbox(2, progress=False) as box:
        runs = box.run(programs, sentences)
    for run, values in zip(runs, expected, strict=True):
        assert not run.failed.any()
        np.testing.assert_allclose(run.values, values, atol=1e-5)
    layer, head = store.head_of(3)
    assert programs[3].provenance["head"] == f"L{layer}.H{head}"


def test_no_selection_or_heldout_text_changes_a_fit(store, fits):
    changed = with_heldout_replaced(with_heldout_replaced(store, "heldout"), "selection", seed=1)
    assert fit_store(changed, settings=QUICK, progress=False) == fits


def test_no_heldout_text_changes_which_program_is_chosen(store):
    from attnprog.engine.pool import evaluate_pool, rank_table
    from attnprog.synth.generator.golden import golden_programs

    pool = golden_programs() + fitted_programs(store, settings=QUICK, progress=False)
    changed = with_heldout_replaced(store)
    chosen = []
    for version in (store, changed):
        table = rank_table(version, evaluate_pool(version, pool, progress=False))
        chosen.append(table.best()[1].tolist())
    assert chosen[0] == chosen[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_path_fits_like_the_cpu_path(store):
    gpu = fit_store(store, settings=FitSettings(**{**QUICK.__dict__, "device": "cuda"}),
                    progress=False)
    cpu_iou, gpu_iou = fit_scores(fit_store(store, settings=QUICK, progress=False), store,
                                  "synthesis"), fit_scores(gpu, store, "synthesis")
    assert abs(cpu_iou.mean() - gpu_iou.mean()) < 0.01


def test_the_pipeline_fits_every_head_ranks_the_fits_and_resumes(tmp_path):
    from attnprog.engine.rank import IoUTable
    from attnprog.engine.run.pipeline import RunConfig, run_pipeline

    config = RunConfig(out=str(tmp_path / "run"), model="tiny-gpt2", limit=30, max_tokens=24,
                       n_candidates=50, fraction=0.25, qa=False, fit_terms=4)
    lines: list[str] = []
    summary = run_pipeline(config, echo=lines.append)
    assert summary["fitted_programs"] == summary["store"]["heads"] == 8
    table = IoUTable.load(tmp_path / "run" / "iou_table.safetensors")
    fitted = [p for p in table.programs if p.family == "fitted"]
    assert len(fitted) == 8 and all(p.provenance["split"] == "synthesis" for p in fitted)

    again: list[str] = []
    run_pipeline(config, echo=again.append)
    stage = "\n".join(again).split("fit a program to every head]")[1].split("done in")[0]
    assert "reused" in stage and "fitted.jsonl" in stage


def test_a_run_of_some_heads_fits_only_those(tmp_path):
    from attnprog.engine.run.pipeline import RunConfig, run_pipeline

    config = RunConfig(out=str(tmp_path / "run"), model="tiny-gpt2", limit=30, max_tokens=24,
                       n_candidates=50, fraction=0.25, qa=False, fit_terms=4, heads="1.*")
    summary = run_pipeline(config, echo=lambda line: None)
    fitted = [json.loads(line) for line in (tmp_path / "run" / "fitted.jsonl").open()]
    assert summary["fitted_programs"] == 4  # of the tiny model's 8 heads
    assert sorted(p["provenance"]["head"] for p in fitted) == ["L1.H0", "L1.H1", "L1.H2", "L1.H3"]


def test_the_pipeline_without_fitting_adds_no_fitted_programs(tmp_path):
    from attnprog.engine.run.pipeline import RunConfig, run_pipeline

    config = RunConfig(out=str(tmp_path / "run"), model="tiny-gpt2", limit=30, max_tokens=24,
                       n_candidates=50, fraction=0.25, qa=False, fit=False)
    summary = run_pipeline(config, echo=lambda line: None)
    assert "fitted_programs" not in summary and not (tmp_path / "run" / "fitted.jsonl").exists()
