"""engine.sweep: the perplexity sweep and its head orders."""

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from attnprog.engine.head_costs import HeadCosts
from attnprog.engine.store import AttentionStore, packed_offsets_tensor
from attnprog.engine.sweep import (
    CONDITIONS,
    fractions_up_to,
    orders_from_option,
    perplexity_sweep,
)
from attnprog.errors import AttnProgError, StoreError
from attnprog.layout import causal_offsets, pack
from attnprog.synth.program import Program, normalise
from attnprog.synth.runtime.outputs import ProgramOutputs


@dataclass
class SmallTable:
    """Stand-in for the ranking's IoUTable: iou [P, H], programs, best()."""

    iou: torch.Tensor
    programs: list
    meta: dict = field(default_factory=dict)

    def best(self):
        return self.iou.max(dim=0)


def make_store(lengths, n_layers=2, n_heads=4, seed=0, splits=None):
    """A store with random token ids (attention values are not used by the sweep)."""
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 200, (n,), generator=gen) for n in lengths]
    offsets = packed_offsets_tensor(lengths)
    return AttentionStore(
        attn_packed=torch.zeros(n_layers * n_heads, int(offsets[-1])),
        offsets=offsets,
        lengths=torch.tensor(lengths),
        ids_packed=torch.cat(ids),
        texts=["x" * n for n in lengths],
        tokens=[["x"] * n for n in lengths],
        spans=[[(i, i + 1) for i in range(n)] for n in lengths],
        splits=splits or ["heldout"] * len(lengths),
        meta={"n_layers": n_layers, "n_heads": n_heads, "model_id": "tiny-gpt2"},
    )


def program_outputs(lengths):
    """Two programs, previous token and first token, evaluated by hand."""
    programs = [Program("def previous(s): ...", name="previous"),
                Program("def first(s): ...", name="first")]
    rows = []
    for n in lengths:
        previous = normalise(np.eye(n, k=-1))
        first = normalise(np.zeros((n, n)))  # empty rows become one-hot on token 0
        rows.append(np.stack([pack(previous), pack(first)]))
    values = np.concatenate(rows, axis=1).astype(np.float32)
    return programs, ProgramOutputs(programs, values, np.zeros((2, len(lengths)), bool),
                                    causal_offsets(lengths))


def test_sweep_runs_and_is_zero_at_fraction_zero(tiny_gpt2):
    model, _ = tiny_gpt2
    lengths = [12, 7, 9]
    programs, outputs = program_outputs(lengths)
    iou = torch.rand(2, 8, generator=torch.Generator().manual_seed(0))
    result = perplexity_sweep(model, make_store(lengths), SmallTable(iou, programs),
                              fractions=(0.0, 0.25, 1.0), outputs=outputs, progress=False)
    first = result.rows[0]
    assert first.n_heads == 0
    assert all(result.increase(first, c) == 0.0 for c in ("programs", "uniform", "random"))
    assert [row.n_heads for row in result.rows] == [0, 2, 8]
    assert result.increase(result.rows[-1], "programs") != 0.0
    text = result.to_text()
    assert "uniform" in text and "random" in text and "25 % (2)" in text


def test_outputs_on_the_whole_store_equal_outputs_on_the_split(tiny_gpt2):
    model, _ = tiny_gpt2
    lengths = [12, 7, 9, 5]
    store = make_store(lengths, splits=["selection", "heldout", "selection", "heldout"])
    programs, whole = program_outputs(lengths)
    _, split_only = program_outputs([7, 5])
    table = SmallTable(torch.rand(2, 8, generator=torch.Generator().manual_seed(1)), programs)
    kwargs = dict(fractions=(0.0, 0.5), progress=False)
    a = perplexity_sweep(model, store, table, outputs=whole, **kwargs)
    b = perplexity_sweep(model, store, table, outputs=split_only, **kwargs)
    assert a.n_texts == 2
    assert a.rows[1].perplexity == pytest.approx(b.rows[1].perplexity, rel=1e-9)


def test_a_model_of_another_shape_than_the_store_is_refused(tiny_gpt2):
    model, _ = tiny_gpt2  # 2 layers x 4 heads
    lengths = [12, 7]
    programs, outputs = program_outputs(lengths)
    store = make_store(lengths, n_layers=3, n_heads=4)
    table = SmallTable(torch.rand(2, 12, generator=torch.Generator().manual_seed(0)), programs)
    with pytest.raises(StoreError, match=r"has 2 x 4 heads, the store 3 x 4 .*run the store's model"):
        perplexity_sweep(model, store, table, fractions=(0.0,), outputs=outputs, progress=False)


def test_a_table_ranked_on_another_models_attention_is_refused(tiny_gpt2):
    model, _ = tiny_gpt2
    lengths = [12, 7]
    programs, outputs = program_outputs(lengths)
    table = SmallTable(torch.rand(2, 8, generator=torch.Generator().manual_seed(0)), programs,
                       meta={"model": "tiny-llama-seed0"})  # the same 2 x 4 heads
    with pytest.raises(StoreError, match="ranked on tiny-llama-seed0's attention, the store is tiny-gpt2's"):
        perplexity_sweep(model, make_store(lengths), table, fractions=(0.0,), outputs=outputs,
                         progress=False)


@pytest.fixture(scope="module")
def extracted(tiny_gpt2, builtin_corpus):
    """A tiny GPT-2's store (with its input embeddings) and a table of two hand programs."""
    from attnprog.engine.extract import extract_attention

    model, tokenizer = tiny_gpt2
    store = extract_attention(model, tokenizer, builtin_corpus.take(4), max_tokens=12)
    store.splits = ["heldout"] * store.n_texts
    programs, outputs = program_outputs(store.lengths.tolist())
    table = SmallTable(torch.rand(2, 8, generator=torch.Generator().manual_seed(0)), programs)
    return store, table, outputs


def test_a_model_with_other_weights_than_the_stores_is_named_in_a_warning(extracted):

    from attnprog.engine.models import tiny_model

    store, table, outputs = extracted
    other, _ = tiny_model("gpt2", seed=1)  # the same shape and vocabulary, other weights
    with pytest.warns(UserWarning, match=r"is not the one that made the store .*differ by"):
        perplexity_sweep(other, store, table, fractions=(0.0,), outputs=outputs, progress=False)


def test_the_stores_own_model_runs_without_that_warning(tiny_gpt2, extracted):
    import warnings

    store, table, outputs = extracted
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is not the one that made the store")
        perplexity_sweep(tiny_gpt2[0], store, table, fractions=(0.0,), outputs=outputs,
                         progress=False)


def test_fraction_list_for_the_cli():
    assert fractions_up_to(0.25) == [0.0, 0.05, 0.10, 0.25]
    assert fractions_up_to(0.3) == [0.0, 0.05, 0.10, 0.25, 0.3]


def test_fraction_out_of_range_is_a_user_error():
    from attnprog.errors import AttnProgError

    with pytest.raises(AttnProgError, match="between 0 and 1"):
        fractions_up_to(1.5)


# --- head orders: descending IoU and cheapest first -------------------------------------------

SPLITS = ["selection", "heldout", "selection", "heldout", "selection", "heldout"]
LENGTHS = [12, 7, 9, 10, 8, 11]


def given_costs(costs, store):
    return HeadCosts(np.asarray(costs, dtype=float), "exact", "selection",
                     store.split_indices("selection"), 20, 3.0)


def test_cost_order_replaces_the_cheapest_heads_first(tiny_gpt2):
    model, _ = tiny_gpt2
    store = make_store(LENGTHS, splits=SPLITS)
    programs, outputs = program_outputs(LENGTHS)
    table = SmallTable(torch.rand(2, 8, generator=torch.Generator().manual_seed(2)), programs)
    costs = given_costs([0.5, -0.1, 0.3, 0.0, 0.9, 0.2, 0.05, 0.7], store)
    result = perplexity_sweep(model, store, table, fractions=(0.0, 0.5), outputs=outputs,
                              orders=("cost",), costs=costs, progress=False)
    assert result.orders["cost"] == [1, 3, 6, 5]  # the 4 cheapest heads (50 %), cheapest first
    assert np.all(np.diff(costs.costs[result.orders["cost"]]) >= 0)
    assert result.to_json()["heads"]["cost"] == ["L0.H1", "L0.H3", "L1.H2", "L1.H1"]


def test_both_orders_appear_side_by_side_in_text_and_json(tiny_gpt2):
    model, _ = tiny_gpt2
    store = make_store(LENGTHS, splits=SPLITS)
    programs, outputs = program_outputs(LENGTHS)
    table = SmallTable(torch.rand(2, 8, generator=torch.Generator().manual_seed(3)), programs)
    costs = given_costs(np.linspace(1.0, 0.0, 8), store)  # the reverse of row order
    result = perplexity_sweep(model, store, table, fractions=(0.0, 0.25), outputs=outputs,
                              orders=("iou", "cost"), costs=costs, progress=False)
    assert set(result.increases()) == {"iou", "cost"}
    data = json.loads(json.dumps(result.to_json()))  # plain JSON, round-trips
    for order in ("iou", "cost"):
        assert set(data["ppl_increase"][order]) == {"0", "0.25"}
        assert set(data["ppl_increase"][order]["0.25"]) == set(CONDITIONS)
        assert set(data["kl"][order]["0.25"]) == set(CONDITIONS)
        assert all(len(v) == 2 for v in data["ppl_increase_ci"][order]["0.25"].values())
        assert data["mean_iou"][order]["0"] is None and data["mean_iou"][order]["0.25"] > 0
    assert data["n_heads"] == {"0": 0, "0.25": 2}
    header = result.to_text().splitlines()
    assert any("descending IoU" in line and "cheapest first" in line for line in header)


def test_cost_order_is_the_same_whatever_the_heldout_texts_are(tiny_gpt2):
    model, _ = tiny_gpt2
    store = make_store(LENGTHS, splits=SPLITS)
    other = make_store(LENGTHS, splits=SPLITS)
    for s in other.split_indices("heldout"):  # new held-out tokens, same selection texts
        start = int(other.lengths[:s].sum())
        other.ids_packed[start : start + int(other.lengths[s])] = torch.randint(
            0, 200, (int(other.lengths[s]),), generator=torch.Generator().manual_seed(s))
    programs, outputs = program_outputs(LENGTHS)
    table = SmallTable(torch.rand(2, 8, generator=torch.Generator().manual_seed(4)), programs)
    kwargs = dict(fractions=(0.0, 0.5), outputs=outputs, orders=("cost",), cost_method="exact",
                  progress=False)
    a = perplexity_sweep(model, store, table, **kwargs)
    b = perplexity_sweep(model, other, table, **kwargs)
    assert a.base_perplexity != b.base_perplexity  # the reported texts did change
    assert a.cost_info["costs"] == b.cost_info["costs"]
    assert a.orders["cost"] == b.orders["cost"]


def test_costs_measured_on_the_reported_texts_are_refused(tiny_gpt2):
    model, _ = tiny_gpt2
    store = make_store(LENGTHS, splits=SPLITS)
    programs, outputs = program_outputs(LENGTHS)
    table = SmallTable(torch.rand(2, 8), programs)
    leaky = HeadCosts(np.zeros(8), "exact", "heldout", store.split_indices("heldout"), 20, 3.0)
    with pytest.raises(StoreError, match="measure them on another split"):
        perplexity_sweep(model, store, table, fractions=(0.0, 0.5), outputs=outputs,
                         orders=("cost",), costs=leaky, progress=False)


def test_order_option_names_both_orders_or_one():
    assert orders_from_option("both") == ("iou", "cost")
    assert orders_from_option("cost") == ("cost",)
    with pytest.raises(AttnProgError, match="use cost, iou or both"):
        orders_from_option("random")


# --- controls, KL, intervals and the replaceable share ---------------------------------------


def test_every_control_has_kl_and_an_interval_around_its_increase(tiny_gpt2):
    model, _ = tiny_gpt2
    store = make_store(LENGTHS, splits=SPLITS)
    programs, outputs = program_outputs(LENGTHS)
    table = SmallTable(torch.rand(2, 8, generator=torch.Generator().manual_seed(5)), programs)
    result = perplexity_sweep(model, store, table, fractions=(0.0, 0.5), outputs=outputs,
                              random_seeds=2, progress=False)
    first, half = result.rows
    assert all(first.kl[c] == 0.0 and first.ci[c] == [0.0, 0.0] for c in CONDITIONS)
    for condition in CONDITIONS:
        low, high = half.ci[condition]
        assert half.kl[condition] > 0.0
        assert low <= result.increase(half, condition) <= high
    assert len(half.random_perplexities) == 2
    assert half.perplexity["random"] == pytest.approx(np.mean(half.random_perplexities))
    assert result.mean_split == "selection"
    text = result.to_text()
    assert "zero" in text and "mean" in text and "KL" in text


def sweep_with_costs(model, seed: int, **options):
    """A sweep of the small store with given costs (cheapest: head 0) and a seeded table."""
    store = make_store(LENGTHS, splits=SPLITS)
    programs, outputs = program_outputs(LENGTHS)
    table = SmallTable(torch.rand(2, 8, generator=torch.Generator().manual_seed(seed)), programs)
    costs = given_costs(np.linspace(0.0, 1.0, 8), store)
    return perplexity_sweep(model, store, table, outputs=outputs, costs=costs, progress=False,
                            **options)


def test_orders_replacing_the_same_heads_agree(tiny_gpt2):
    model, _ = tiny_gpt2
    result = sweep_with_costs(model, 6, fractions=(0.0, 1.0), orders=("iou", "cost"),
                              share_limits=())
    every = {row.order: row for row in result.rows if row.fraction == 1.0}
    assert every["iou"].perplexity == every["cost"].perplexity
    assert every["iou"].kl == every["cost"].kl


def test_replaceable_share_is_searched_on_selection_and_heldout_texts(tiny_gpt2):
    model, _ = tiny_gpt2
    result = sweep_with_costs(model, 7, fractions=(0.0, 0.5), orders=("cost",),
                              share_limits=(16.0, 5.0))
    shares = result.to_json()["replaceable_share"]
    assert set(shares) == {"16", "5"}
    for share in shares.values():
        assert 0.0 <= share["heldout"] <= 1.0 and 0.0 <= share["selection"] <= 1.0
    assert shares["5"]["selection"] <= shares["16"]["selection"]
    assert "replaceable share" in result.to_text()
