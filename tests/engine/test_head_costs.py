"""engine.head_costs: each head's cost of being replaced alone, measured on selection texts."""

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from attnprog.engine.corpus import Corpus
from attnprog.engine.extract import extract_attention
from attnprog.engine.head_costs import HeadCosts, head_costs
from attnprog.errors import StoreError
from attnprog.synth.program import Program
from attnprog.synth.runtime.outputs import ProgramOutputs

TEXTS = [
    "The cat sat on the mat, and the dog sat by the door.",
    "Once upon a time a small fox found a red ball in the woods.",
    "Tom said that he would come home before the rain started.",
    "The sun rose over the hills and the birds began to sing.",
    "She opened the box and found a letter from her old friend.",
    "A boy ran to the shop to buy bread, milk and two apples.",
]


@dataclass
class SmallTable:
    """Stand-in for the ranking's IoUTable: iou [P, H], programs, best()."""

    iou: torch.Tensor
    programs: list

    def best(self):
        return self.iou.max(dim=0)


def tiny_store(model, tokenizer, splits=("selection", "selection", "selection", "heldout",
                                          "heldout", "heldout")):
    corpus = Corpus(list(TEXTS), list(splits), "costs-test")
    return extract_attention(model, tokenizer, corpus, batch_size=4, progress=False)


def programs_that_copy_attention(store, noise: float = 0.0, seed: int = 0):
    """One 'program' per head whose outputs are that head's own attention (plus noise),
    and a table that makes program h head h's best fit."""
    values = store.attn_packed.numpy().astype(np.float32).copy()
    if noise:
        rng = np.random.default_rng(seed)
        values = values * (1.0 + noise * rng.random(values.shape, dtype=np.float32))
        for s in range(store.n_texts):  # keep every row stochastic
            start, stop = int(store.offsets[s]), int(store.offsets[s + 1])
            n = int(store.lengths[s])
            rows = np.repeat(np.arange(n), np.arange(1, n + 1))
            block = values[:, start:stop]
            sums = np.zeros((values.shape[0], n), np.float32)
            np.add.at(sums.T, rows, block.T)
            values[:, start:stop] = block / sums[:, rows]
    n_rows = values.shape[0]
    programs = [Program(f"def copy{h}(s): ...", name=f"copy{h}") for h in range(n_rows)]
    outputs = ProgramOutputs(programs, values, np.zeros((n_rows, store.n_texts), bool),
                             store.offsets.numpy())
    return SmallTable(torch.eye(n_rows), programs), outputs


@pytest.mark.parametrize("method", ["exact", "linear", "fisher", "taylor"])
def test_a_head_whose_program_is_its_own_attention_costs_nothing(tiny_llama, method):
    model, tokenizer = tiny_llama
    store = tiny_store(model, tokenizer)
    table, outputs = programs_that_copy_attention(store)
    costs = head_costs(model, store, table, outputs=outputs, method=method, progress=False)
    assert costs.costs.shape == (store.n_rows,)
    np.testing.assert_allclose(costs.costs, 0.0, atol=1e-5)


def test_taylor_costs_estimate_exact_costs_for_small_changes(tiny_llama):
    model, tokenizer = tiny_llama
    store = tiny_store(model, tokenizer)
    table, outputs = programs_that_copy_attention(store, noise=0.5)
    exact = head_costs(model, store, table, outputs=outputs, method="exact", progress=False)
    taylor = head_costs(model, store, table, outputs=outputs, method="taylor", samples=8,
                        progress=False)
    assert np.abs(exact.costs).max() > 1e-4  # the noise does change the model
    np.testing.assert_allclose(taylor.costs, exact.costs, atol=0.2 * np.abs(exact.costs).max())
    assert np.all(taylor.terms["fisher"] >= 0)  # a squared norm under the Fisher metric
    np.testing.assert_allclose(taylor.costs, taylor.terms["linear"] + taylor.terms["fisher"])


def test_costs_never_run_a_heldout_text(tiny_llama):
    model, tokenizer = tiny_llama
    store = tiny_store(model, tokenizer)
    table, outputs = programs_that_copy_attention(store, noise=0.5)
    heldout_ids = {tuple(store.token_ids(s)) for s in store.split_indices("heldout")}
    seen = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.extend(map(tuple, kwargs["input_ids"].tolist())),
        with_kwargs=True,
    )
    try:
        for method in ("exact", "taylor"):
            costs = head_costs(model, store, table, outputs=outputs, method=method,
                               progress=False)
            assert costs.texts == store.split_indices("selection")
    finally:
        hook.remove()
    ran = {ids[: ids.index(0)] if 0 in ids else ids for ids in seen}  # unpadded
    assert seen and not any(ids in ran for ids in heldout_ids)


@contextmanager
def counted_forwards(model):
    """A list that gains an item per forward of ``model`` inside the block."""
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        yield calls
    finally:
        hook.remove()


def test_exact_costs_resume_from_the_heads_already_measured(tiny_gpt2, tmp_path):
    model, tokenizer = tiny_gpt2
    store = tiny_store(model, tokenizer)
    table, outputs = programs_that_copy_attention(store, noise=0.5)
    resume = tmp_path / "costs.partial.json"
    first = head_costs(model, store, table, outputs=outputs, method="exact", resume=resume,
                       progress=False)
    with counted_forwards(model) as calls:
        second = head_costs(model, store, table, outputs=outputs, method="exact", resume=resume,
                            progress=False)
    np.testing.assert_array_equal(first.costs, second.costs)
    assert len(calls) == 1  # only the unmodified pass (one batch) ran again


def test_exact_costs_are_measured_again_for_other_best_fits(tiny_gpt2, tmp_path):
    """The resume file of another ranking (same texts, so the same base NLL) is not read back:
    on a GPU, where `attnprog run` measures exact costs, a rerun with new best fits would
    otherwise keep the old programs' costs."""
    model, tokenizer = tiny_gpt2
    store = tiny_store(model, tokenizer)
    table, outputs = programs_that_copy_attention(store, noise=0.5)
    resume = tmp_path / "costs.partial.json"
    head_costs(model, store, table, outputs=outputs, method="exact", resume=resume, progress=False)
    shifted = SmallTable(table.iou.roll(1, dims=1), table.programs)  # head h's best: program h-1
    with counted_forwards(model) as calls:
        again = head_costs(model, store, shifted, outputs=outputs, method="exact", resume=resume,
                           progress=False)
    assert len(calls) == 1 + store.n_rows  # the unmodified pass, then every head again
    fresh = head_costs(model, store, shifted, outputs=outputs, method="exact", progress=False)
    np.testing.assert_array_equal(again.costs, fresh.costs)


@pytest.mark.parametrize("method", ["exact", "fisher"])
def test_costs_of_some_heads_measure_only_those(tiny_gpt2, method):
    """`run --heads 1.*` ranks only those heads; measuring every head's cost (a forward pass per
    head when exact) spent the time on heads the run does not explain, with an arbitrary best
    fit, and their figures went into the costs line the run prints."""
    model, tokenizer = tiny_gpt2
    store = tiny_store(model, tokenizer)
    table, outputs = programs_that_copy_attention(store, noise=0.5)
    chosen = list(range(store.n_heads, store.n_rows))  # layer 1
    every = head_costs(model, store, table, outputs=outputs, method=method, progress=False)
    with counted_forwards(model) as calls:
        some = head_costs(model, store, table, outputs=outputs, method=method, heads=chosen,
                          progress=False)
    if method == "exact":
        assert len(calls) == 1 + len(chosen)  # the unmodified pass, then each chosen head
    assert some.costs.shape == (store.n_rows,)
    np.testing.assert_allclose(some.costs[chosen], every.costs[chosen], rtol=1e-4, atol=1e-6)
    assert not some.costs[: store.n_heads].any()  # unmeasured, like an unranked head's IoU


def test_costs_save_and_load_and_order_cheapest_first(tmp_path):
    costs = HeadCosts(np.array([0.3, -0.01, 0.2, 0.0]), "linear", "selection", [0, 2], 17, 3.1)
    loaded = HeadCosts.load(costs.save(tmp_path / "costs.json"))
    np.testing.assert_array_equal(loaded.costs, costs.costs)
    assert loaded.order().tolist() == [1, 3, 2, 0]


def test_a_store_without_selection_texts_is_refused(tiny_gpt2):
    model, tokenizer = tiny_gpt2
    store = tiny_store(model, tokenizer, splits=("heldout",) * 6)
    table, outputs = programs_that_copy_attention(store)
    with pytest.raises(StoreError, match="no 'selection' texts"):
        head_costs(model, store, table, outputs=outputs, progress=False)


@pytest.mark.slow
def test_fisher_costs_on_smollm2_are_finite_and_non_negative_for_every_head(smollm2,
                                                                              builtin_corpus):
    from attnprog.engine.rank import rank
    from attnprog.synth.generator.golden import golden_programs
    from attnprog.synth.runtime.evaluate import evaluate_programs

    model, tokenizer = smollm2
    corpus = builtin_corpus.split("selection").take(4)
    store = extract_attention(model, tokenizer, corpus, max_tokens=32, progress=False)
    outputs = evaluate_programs(golden_programs(), store.sentences(), progress=False)
    table = rank(store, outputs, split="selection")
    costs = head_costs(model, store, table, outputs=outputs, method="fisher", progress=False)
    assert costs.costs.shape == (270,)
    assert np.isfinite(costs.costs).all() and (costs.costs >= 0).all()
    assert costs.costs.max() > 0
