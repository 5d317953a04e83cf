"""A run's surrogate heads: the ones its sweep replaces, each with a program that reads no
later token; a run that lacks what is needed is refused."""

import json

import pytest

from attnprog.engine.head_costs import HeadCosts
from attnprog.engine.leak import LeakCheck
from attnprog.engine.rank import IoUTable
from attnprog.engine.run import rundir
from attnprog.engine.run.surrogate_heads import run_heads
from attnprog.engine.store import AttentionStore
from attnprog.engine.sweep import perplexity_sweep
from attnprog.errors import AttnProgError, ProgramError, StoreError
from tests.engine.surrogate_run import PEEKS_AHEAD, make_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_gpt2):
    return make_run(tmp_path_factory.mktemp("heads") / "run", *tiny_gpt2)


def indices(chosen):
    return [layer * chosen.n_heads + head for layer, head in chosen.heads]


@pytest.mark.parametrize("order", ["cost", "iou"])
def test_the_heads_are_those_the_sweep_replaces_in_the_same_order(run_dir, tiny_gpt2, order):
    table = LeakCheck.load(run_dir / rundir.LEAK).causal_table(IoUTable.load(run_dir / rundir.TABLE))
    swept = perplexity_sweep(tiny_gpt2[0], AttentionStore.load(run_dir / rundir.STORE), table,
                             fractions=[0.5], orders=(order,), tokenizer=tiny_gpt2[1],
                             costs=HeadCosts.load(run_dir / rundir.COSTS), progress=False)
    chosen = run_heads(run_dir, 0.5, order, tiny_gpt2[1])
    assert indices(chosen) == swept.orders[order]


def test_a_program_that_reads_later_tokens_is_never_chosen(run_dir, tiny_gpt2):
    chosen = run_heads(run_dir, 1.0, "iou", tiny_gpt2[1])
    assert PEEKS_AHEAD not in chosen.heads.values()


def test_without_a_leak_check_in_the_run_leaky_programs_are_found_and_replaced(tmp_path, tiny_gpt2):
    run = make_run(tmp_path / "old", *tiny_gpt2, leak=False)
    chosen = run_heads(run, 1.0, "iou", tiny_gpt2[1])
    assert PEEKS_AHEAD not in chosen.heads.values()
    assert set(chosen.swaps) == {"L0.H1", "L1.H1"} and "measured now" in chosen.leak


def test_a_directory_without_a_run_is_refused(tmp_path, tiny_gpt2):
    with pytest.raises(StoreError, match="not a run directory"):
        run_heads(tmp_path, 0.25, "cost", tiny_gpt2[1])


def test_the_cost_order_without_head_costs_is_refused(tmp_path, tiny_gpt2):
    run = make_run(tmp_path / "run", *tiny_gpt2)
    (run / rundir.COSTS).unlink()
    with pytest.raises(StoreError, match="use order 'iou'"):
        run_heads(run, 0.25, "cost", tiny_gpt2[1])


def test_an_unknown_order_or_fraction_is_refused(run_dir, tiny_gpt2):
    with pytest.raises(AttnProgError, match="cost or iou"):
        run_heads(run_dir, 0.25, "random", tiny_gpt2[1])
    with pytest.raises(AttnProgError, match="between 0 and 1"):
        run_heads(run_dir, 1.5, "cost", tiny_gpt2[1])


def test_a_head_left_with_only_leaky_programs_is_refused(tmp_path, tiny_gpt2):
    run = make_run(tmp_path / "run", *tiny_gpt2)
    record = json.loads((run / rundir.LEAK).read_text())
    record["unresolved"], record["unresolved_index"] = ["L0.H1"], [1]
    (run / rundir.LEAK).write_text(json.dumps(record))
    with pytest.raises(ProgramError, match="L0.H1"):
        run_heads(run, 0.25, "cost", tiny_gpt2[1])
