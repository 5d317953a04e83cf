"""What replacing heads costs: perplexity, KL and multiple-choice QA sweeps, with controls.

Heads are replaced at 0, 5, 10, 25, 50, 75 and 100 % of all heads, in one or both of two
orders: descending best-fit IoU ("iou"), or cheapest first by each head's measured
single-replacement cost on the selection split ("cost", see ``engine.head_costs``). The same
heads, in each order, also get four controls: the uniform causal matrix, a random program from
the pool (``random_seeds`` draws; the mean is reported), zero ablation (an all-zero matrix: the
head contributes nothing) and mean ablation (the head's output before the output projection
replaced by its mean over the selection texts, see ``engine.ablation``).

On held-out texts: the % perplexity increase over the unmodified model with a 95 % bootstrap
interval over texts (``engine.bootstrap``), and the KL divergence of the next-token distribution
from the unmodified model's per predicted token (one unmodified forward per batch serves every
condition; heads replaced identically in both orders, e.g. all of them, run once). QA accuracy
scores each choice by the mean log-prob of its tokens given the context, for programs, uniform
and the first random seed only (the ablations and further seeds skip QA, to save time).

In cost order, the replaceable share is the largest share of heads whose programs stay within
+16 % (and +5 %) perplexity: found by a capped bisection on the selection texts, then searched
again on the held-out texts starting from that count (``engine.share``); both are reported.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from attnprog.engine.ablation import head_output_means
from attnprog.engine.batching import pad_token_id
from attnprog.engine.bootstrap import ppl_increase_interval
from attnprog.engine.head_costs import head_costs
from attnprog.engine.nll import perplexity, score_against_base, token_logprobs
from attnprog.engine.qa import QAItem, qa_accuracy, qa_predictions, tokenise_qa
from attnprog.engine.replace import MeanOutput, OutputsRow, best_fit, n_texts_of, outputs_for
from attnprog.engine.share import DEFAULT_STEPS, LIMITS, replaceable_shares
from attnprog.engine.sweep_result import (  # noqa: F401 - part of this module's interface
    CONDITIONS,
    ORDER_HEADINGS,
    ORDER_TITLES,
    SweepResult,
    SweepRow,
)
from attnprog.errors import AttnProgError, ModelError, StoreError
from attnprog.layout import causal_offsets, text_cells
from attnprog.synth.runtime.outputs import ProgramOutputs

STANDARD_FRACTIONS = (0.0, 0.05, 0.10, 0.25, 0.50, 0.75, 1.0)
QA_CONDITIONS = ("programs", "uniform", "random")  # QA for the first random seed only
RANDOM_SEEDS = 3
HELDOUT_STEPS = 4  # the held-out search starts between sweep fractions it already measured


def fractions_up_to(limit: float) -> list[float]:
    """The standard fractions up to ``limit``, plus ``limit`` itself when it is not one of them."""
    if not 0.0 <= limit <= 1.0:
        raise AttnProgError(f"fraction must be between 0 and 1, got {limit}")
    chosen = [f for f in STANDARD_FRACTIONS if f <= limit + 1e-9]
    if not any(abs(f - limit) < 1e-9 for f in chosen):
        chosen.append(limit)
    return chosen


ORDERS = ("iou", "cost")


def orders_from_option(option: str) -> tuple[str, ...]:
    """``--order`` value -> the orders to sweep: "both" is ("iou", "cost")."""
    if option == "both":
        return ORDERS
    if option not in ORDERS:
        raise AttnProgError(f"unknown head order {option!r}: use cost, iou or both")
    return (option,)


def perplexity_sweep(
    model,
    store,
    table,
    *,
    fractions: Sequence[float] = STANDARD_FRACTIONS,
    split: str = "heldout",
    outputs=None,
    orders: Sequence[str] = ("iou",),
    costs=None,
    cost_split: str = "selection",
    cost_method: str = "auto",
    qa_items: Sequence[QAItem] | None = None,
    qa_outputs=None,
    tokenizer=None,
    qa_source: str = "",
    seed: int = 0,
    random_seeds: int = RANDOM_SEEDS,
    share_limits: Sequence[float] = LIMITS,
    share_steps: int = DEFAULT_STEPS,
    batch_size: int = 8,
    impl: str = "auto",
    progress: bool = True,
    heads: Sequence[int] | None = None,
) -> SweepResult:
    """Replace 0..100 % of heads by best programs and every control, for each head order.

    ``orders``: "iou" (best fit first) and/or "cost" (cheapest first by ``costs``, a
    ``HeadCosts`` measured on ``cost_split``; measured here with ``cost_method`` when None).
    ``outputs``: ProgramOutputs of ``table.programs`` on the split's texts or on all of the
    store's texts (when None, only the programs needed run, through ``synth.runtime.evaluate``).
    ``qa_items`` adds QA accuracy (needs ``tokenizer``; ``qa_outputs`` likewise covers the
    tokenised QA texts). ``heads`` (head indices) limits replacement to those heads; fractions are
    then shares of them. ``share_limits`` (% perplexity; empty: no search) and ``share_steps``
    set the replaceable-share search, which needs the cost order and ``cost_split`` texts.
    """
    best_iou, best_index = best_fit(table)
    _check_table_fits(best_iou, table, store)
    _check_model_fits(model, store)
    if random_seeds < 1:
        raise AttnProgError(f"random_seeds must be at least 1, got {random_seeds}")
    measure_costs = lambda: head_costs(model, store, table, split=cost_split, outputs=outputs,
                                       method=cost_method, tokenizer=tokenizer,
                                       batch_size=batch_size, impl=impl, progress=progress,
                                       heads=heads)
    head_orders, costs = _head_orders(orders, best_iou, costs, measure_costs, store, split)
    plan = _plan(head_orders, heads, fractions, table, best_iou, best_index, seed, random_seeds,
                 store.n_heads)
    run = _Runner(model, store, table, outputs, pad_token_id(tokenizer), batch_size, impl, progress)
    plan.mean_split = cost_split if cost_split in store.splits else split
    plan.means = head_output_means(model, run.token_ids(store.split_indices(plan.mean_split)),
                                   batch_size=batch_size, pad_id=run.pad_id, impl=impl)
    texts = store.split_indices(split)
    base_lp, scores = _measure(plan, run, texts, plan.variants(fractions, CONDITIONS))
    qa = _QA(run, plan, qa_items, tokenizer, qa_outputs, qa_source)
    rows = [_sweep_row(plan, name, fraction, base_lp, scores, qa)
            for name in plan.head_orders for fraction in fractions]
    replaceable = _replaceable(plan, run, rows, base_lp, cost_split, split, share_limits,
                               share_steps)
    return _sweep_result(model, store, texts, base_lp, rows, plan, costs, qa, replaceable)


def _check_model_fits(model, store) -> None:
    """Another model's heads would be replaced by programs ranked on this store's attention:
    a sweep that runs to the end and means nothing."""
    from attnprog.engine.models import attention_shape, model_id

    n_layers, n_heads, _ = attention_shape(model)
    if (n_layers, n_heads) != (store.n_layers, store.n_heads):
        raise StoreError(f"the model ({model_id(model)}) has {n_layers} x {n_heads} heads, the "
                         f"store {store.n_layers} x {store.n_heads} (made by "
                         f"{store.meta.get('model_id', 'another model')}): run the store's model")
    kept = store.embeddings  # the store's model's input embeddings of the tokens it saw
    if kept is None or not len(kept.ids):
        return
    weight = model.get_input_embeddings().weight
    made_by = store.meta.get("model_id", "another model")
    if int(kept.ids.max()) >= weight.shape[0] or kept.rows.shape[1] != weight.shape[1]:
        raise StoreError(f"the model ({model_id(model)}) has another vocabulary or width than "
                         f"the one that made the store ({made_by}): run the store's model")
    rows = weight[torch.as_tensor(kept.ids, device=weight.device)].detach().float().cpu().numpy()
    gap = float(np.linalg.norm(rows - kept.rows) / max(float(np.linalg.norm(kept.rows)), 1e-12))
    if gap > EMBEDDING_GAP:  # the same shape, other weights: transfer, not replacement
        warnings.warn(f"the model ({model_id(model)}) is not the one that made the store "
                      f"({made_by}): their input embeddings differ by {gap:.1%}, so its heads "
                      "are replaced by programs ranked on another model's attention", stacklevel=3)


# the relative difference between the model's input embeddings and the store's above which they
# are another model's: a bfloat16 copy of the same weights differs by about 0.2 %
EMBEDDING_GAP = 0.01


def _check_table_fits(best_iou, table, store) -> None:
    n_layers, n_heads = store.n_layers, store.n_heads
    ranked_on, made_by = table.meta.get("model"), store.meta.get("model_id")
    if ranked_on and made_by and ranked_on != made_by:  # its best fits are another model's heads'
        raise StoreError(f"the IoU table was ranked on {ranked_on}'s attention, the store is "
                         f"{made_by}'s: rank programs against this store")
    if len(best_iou) != n_layers * n_heads:
        raise StoreError(f"the IoU table has {len(best_iou)} heads, the store "
                         f"{n_layers} x {n_heads}: rank programs against this store")


def _head_orders(names, best_iou, costs, measure_costs, store, split):
    """({order: head indices in replacement order}, the HeadCosts the cost order used or None)."""
    head_orders = {}
    for name in names:
        if name == "iou":
            head_orders[name] = np.argsort(-best_iou, kind="stable")  # best fit first
        elif name == "cost":
            if costs is None:
                costs = measure_costs()
            # the texts that choose the heads must not be the texts the sweep reports on
            if costs.split == split or set(costs.texts) & set(store.split_indices(split)):
                raise StoreError(f"head costs were measured on the {split!r} texts the sweep "
                                 "reports on: measure them on another split (selection)")
            head_orders[name] = costs.order()  # cheapest first
        else:
            orders_from_option(name)  # raises with the valid names
    return head_orders, costs


# a variant is one forward's worth of replacement: (condition, seed index, head indices sorted)
Variant = tuple[str, int, tuple[int, ...]]


@dataclass
class _Plan:
    """Which heads each order replaces at each fraction, and what each condition gives them."""

    head_orders: dict[str, np.ndarray]  # order -> head indices, in replacement order
    counts: dict[float, int]  # fraction -> heads replaced
    iou: np.ndarray  # head_index -> best-fit IoU as reported (held-out when the table has it)
    best_index: np.ndarray  # head_index -> its best-fit program
    random_index: list[np.ndarray]  # per seed: head_index -> the random control's program
    n_heads: int  # per layer
    means: torch.Tensor | None = None  # [layers, heads, head_dim] for mean ablation
    mean_split: str = ""

    @property
    def most(self) -> int:
        return max(self.counts.values(), default=0)

    def first(self, name: str, count: int) -> tuple[int, ...]:
        """The first ``count`` heads of order ``name``, as a variant holds them."""
        return tuple(sorted(int(h) for h in self.head_orders[name][:count]))

    def variants(self, fractions, conditions, seeds: int | None = None) -> list[Variant]:
        """Every distinct replacement the sweep runs (orders that agree run once)."""
        seeds = len(self.random_index) if seeds is None else seeds
        found = {}
        for name in self.head_orders:
            for fraction in fractions:
                heads = self.first(name, self.counts[fraction])
                for condition in conditions if heads else ():
                    for i in range(seeds if condition == "random" else 1):
                        found[(condition, i, heads)] = None
        return list(found)

    def programs_of(self, variant: Variant) -> set[int]:
        condition, i, heads = variant
        table = {"programs": self.best_index, "random": self.random_index[i]}.get(condition)
        return set() if table is None else {int(table[h]) for h in heads}

    def sources(self, variant: Variant, row_map) -> dict:
        """replace_heads' sources for ``variant``, programs read from ``row_map``."""
        condition, i, heads = variant
        found = {}
        for h in heads:
            key = divmod(int(h), self.n_heads)
            if condition in ("uniform", "zero"):
                found[key] = condition
            elif condition == "mean":
                found[key] = MeanOutput(self.means[key])
            else:
                program = (self.best_index if condition == "programs" else self.random_index[i])[h]
                found[key] = OutputsRow(row_map[0], row_map[1][int(program)])
        return found


def _plan(head_orders, heads, fractions, table, best_iou, best_index, seed, random_seeds,
          n_heads) -> _Plan:
    if heads is not None:  # only these heads are replaced, each order keeps its sequence
        chosen = np.asarray(list(heads), dtype=np.int64)
        head_orders = {name: order[np.isin(order, chosen)] for name, order in head_orders.items()}
    if not head_orders:
        raise AttnProgError("no head order to sweep: pass orders=('iou',), ('cost',) or both")
    # the table reports each best fit's IoU on held-out texts when it measured it
    heldout = getattr(table, "heldout_iou", None)
    reported_iou = best_iou if heldout is None else torch.as_tensor(heldout).float().cpu().numpy()
    n_candidates = len(next(iter(head_orders.values())))  # every order holds the same heads
    counts = {f: int(round(f * n_candidates)) for f in fractions}
    random_index = [np.random.default_rng(seed + i).integers(0, len(table.programs),
                                                             size=len(best_iou))
                    for i in range(random_seeds)]  # seed i + 0 is the single-seed control
    return _Plan(head_orders, counts, reported_iou, best_index, random_index, n_heads)


@dataclass
class _Runner:
    """The model, the texts and the program outputs the sweep's forward passes read."""

    model: object
    store: object
    table: object
    outputs: object  # as given: on the whole store, on the sweep's split, or None
    pad_id: int
    batch_size: int
    impl: str
    progress: bool

    def token_ids(self, texts) -> list:
        return [self.store.token_ids(s) for s in texts]

    def outputs_on(self, texts, needed, own_split: bool):
        """(outputs, program -> row, corpus indices) for ``needed`` programs on ``texts``;
        outputs given for the sweep's split only serve that split (``own_split``)."""
        needed = sorted(needed)
        if self.outputs is not None and n_texts_of(self.outputs) == self.store.n_texts:
            # the store's outputs: only these rows on these texts' cells (a store's worth of
            # hundreds of rows is gigabytes), read by position
            if self.outputs.n_programs != len(self.table.programs):
                raise StoreError(f"program outputs hold {self.outputs.n_programs} programs, the "
                                 f"IoU table {len(self.table.programs)}: evaluate the table's "
                                 "programs")
            return (_rows_on_texts(self.outputs, needed, texts, self.store.lengths),
                    {p: row for row, p in enumerate(needed)}, None)
        outputs, row_of = outputs_for(
            self.table, needed, self.outputs if own_split else None,
            lambda: self.store.sentences(texts), len(texts), self.progress,
        )
        return outputs, row_of, None

    def logprobs(self, texts, heads: dict, corpus_indices, desc: str) -> list:
        return token_logprobs(self.model, self.token_ids(texts), heads, batch_size=self.batch_size,
                              impl=self.impl, pad_id=self.pad_id, corpus_indices=corpus_indices,
                              progress=self.progress, desc=desc)


def _rows_on_texts(outputs, rows, texts, lengths) -> ProgramOutputs:
    """ProgramOutputs of ``rows`` of ``outputs`` on ``texts`` only, packed in that order."""
    if hasattr(outputs, "rows_at"):  # streamed: generator rows computed on these texts only
        values = outputs.rows_at(rows, texts)
    else:
        values = np.asarray(outputs.values)[np.ix_(rows, text_cells(outputs.offsets, texts))]
    return ProgramOutputs(
        programs=[outputs.programs[p] for p in rows], values=values,
        failed=np.asarray(outputs.failed)[np.ix_(rows, texts)],
        offsets=causal_offsets([int(lengths[s]) for s in texts]),
    )


def _measure(plan: _Plan, run: _Runner, texts, variants: list[Variant]):
    """(unmodified log-probs, {variant: TextScores}) on ``texts``. Variants run in groups
    (programs and matrix-free controls; each random seed) so that only one group's program
    outputs are in memory at a time."""
    groups: dict[object, list[Variant]] = {}
    for variant in variants:
        groups.setdefault(variant[1] if variant[0] == "random" else "fixed", []).append(variant)
    base, scores = None, {}
    for name, group in tqdm(groups.items(), desc="sweep", unit="group",
                            disable=None if run.progress else True):
        needed = set().union(*(plan.programs_of(v) for v in group))
        outputs, row_of, corpus_indices = run.outputs_on(texts, needed, own_split=True)
        heads = [plan.sources(v, (outputs, row_of)) for v in group]
        base, measured = score_against_base(
            run.model, run.token_ids(texts), heads, batch_size=run.batch_size, impl=run.impl,
            pad_id=run.pad_id, corpus_indices=corpus_indices, progress=run.progress,
            desc=f"sweep {name}")
        scores.update(zip(group, measured, strict=True))
    if base is None:  # nothing replaced at any fraction: the unmodified run alone
        base = run.logprobs(texts, {}, None, "unmodified")
    return base, scores


class _QA:
    """QA accuracy of the unmodified model and of every QA variant (none without items)."""

    def __init__(self, run: _Runner, plan: _Plan, items, tokenizer, qa_outputs, source: str):
        self.items, self.source, self.accuracy, self.base = items, source, {}, None
        if not items:
            return
        if tokenizer is None:
            raise ModelError("QA scoring needs the model's tokenizer: pass tokenizer=")
        pairs = tokenise_qa(items, tokenizer)
        variants = plan.variants(plan.counts, QA_CONDITIONS, seeds=1)
        needed = sorted(set().union(set(), *(plan.programs_of(v) for v in variants)))
        outputs, row_of = outputs_for(run.table, needed, qa_outputs,
                                      lambda: [p.sentence for p in pairs], len(pairs), run.progress)
        ids = [p.ids for p in pairs]

        def accuracy(heads: dict, desc: str) -> float:
            # QA texts are short: bigger batches, fewer forward passes
            lp = token_logprobs(run.model, ids, heads, batch_size=4 * run.batch_size,
                                impl=run.impl, pad_id=run.pad_id, progress=run.progress, desc=desc)
            return qa_accuracy(items, qa_predictions(items, pairs, lp))

        self.base = accuracy({}, "unmodified QA")
        for variant in variants:
            self.accuracy[variant] = accuracy(plan.sources(variant, (outputs, row_of)),
                                              f"QA {variant[0]} {len(variant[2])} heads")


def _sweep_row(plan: _Plan, name: str, fraction: float, base_lp, scores: dict,
               qa: _QA) -> SweepRow:
    """Every condition with the first heads of order ``name`` replaced, ``fraction`` of them."""
    count = plan.counts[fraction]
    heads = plan.first(name, count)
    base, base_nll = perplexity(base_lp), np.array([-lp.sum() for lp in base_lp])
    tokens = np.array([len(lp) for lp in base_lp])
    row = SweepRow(fraction, count, float("nan"), {}, order=name)
    for condition in CONDITIONS:
        if count == 0:  # nothing replaced: the unmodified run, exactly
            row.perplexity[condition], row.kl[condition], row.ci[condition] = base, 0.0, [0.0, 0.0]
            continue
        seeds = range(len(plan.random_index) if condition == "random" else 1)
        measured = [scores[(condition, i, heads)] for i in seeds]
        ppls = [perplexity(m.logprobs) for m in measured]
        nll = np.array([[-lp.sum() for lp in m.logprobs] for m in measured])  # [seeds, texts]
        row.perplexity[condition] = float(np.mean(ppls))
        row.kl[condition] = float(np.mean([m.mean_kl() for m in measured]))
        row.ci[condition] = list(ppl_increase_interval(base_nll, nll, tokens))
        if condition == "random":
            row.random_perplexities = ppls
    if qa.items:
        row.qa_accuracy = {c: qa.base if count == 0 else qa.accuracy[(c, 0, heads)]
                           for c in QA_CONDITIONS}
    if count:
        row.mean_iou = float(plan.iou[list(heads)].mean())
    return row


def _replaceable(plan: _Plan, run: _Runner, rows, base_lp, cost_split: str, split: str,
                 limits, steps: int) -> dict:
    """{"16": {...}, "5": {...}}: the replaceable share in cost order, by bisection on the
    selection texts, then on the held-out texts from there (empty without the cost order)."""
    if "cost" not in plan.head_orders or not limits or cost_split not in run.store.splits:
        return {}
    selection = run.store.split_indices(cost_split)
    n = len(plan.head_orders["cost"])
    base = perplexity(base_lp)
    known = {r.n_heads: 100.0 * (r.perplexity["programs"] / base - 1.0)
             for r in rows if r.order == "cost"}
    found_selection = replaceable_shares(_increase_at(plan, run, selection, cost_split, False),
                                         n, limits, steps=steps)
    found_heldout = replaceable_shares(
        _increase_at(plan, run, run.store.split_indices(split), split, True, base), n, limits,
        steps=HELDOUT_STEPS, known=known, first={k: v.count for k, v in found_selection.items()})
    shares = {}
    for limit in limits:
        sel, held = found_selection[limit], found_heldout[limit]
        shares[f"{limit:g}"] = {
            "selection": sel.share, "heldout": held.share, "count": sel.count,
            "selection_above": sel.above, "heldout_count": held.count,
            "heldout_above": held.above, "n_heads": n, "order": "cost",
            "heldout_increase_at_selection_share": held.measured.get(sel.count),
        }
    return shares


def _increase_at(plan: _Plan, run: _Runner, texts, split: str, own_split: bool,
                 base: float | None = None):
    """k -> % perplexity increase on ``texts`` with the k cheapest heads' programs (``base``:
    the unmodified perplexity there, measured when not given)."""
    needed = {int(plan.best_index[h]) for h in plan.head_orders["cost"]}
    outputs, row_of, corpus_indices = run.outputs_on(texts, needed, own_split)
    if base is None:
        base = perplexity(run.logprobs(texts, {}, None, f"{split} unmodified"))

    def increase_at(count: int) -> float:
        heads = plan.sources(("programs", 0, plan.first("cost", count)), (outputs, row_of))
        lp = run.logprobs(texts, heads, corpus_indices, f"{split} share search, {count} heads")
        return 100.0 * (perplexity(lp) / base - 1.0)

    return increase_at


def _sweep_result(model, store, texts, base_lp, rows, plan: _Plan, costs, qa: _QA,
                  replaceable: dict) -> SweepResult:
    cost_info = {}
    if "cost" in plan.head_orders:
        cost_info = {"method": costs.method, "split": costs.split, "texts": list(costs.texts),
                     "n_tokens": costs.n_tokens,
                     "costs": [float(c) for c in costs.costs]}
    return SweepResult(
        model=str(store.meta.get("model_id", type(model).__name__)),
        n_texts=len(texts),
        n_tokens=sum(len(lp) for lp in base_lp),
        base_perplexity=perplexity(base_lp),
        rows=rows,
        base_qa_accuracy=qa.base,
        n_questions=len(qa.items or []),
        qa_source=qa.source,
        orders={name: [int(h) for h in order[: plan.most]]
                for name, order in plan.head_orders.items()},
        n_heads_per_layer=plan.n_heads,
        cost_info=cost_info,
        random_seeds=len(plan.random_index),
        mean_split=plan.mean_split,
        qa_conditions=QA_CONDITIONS if qa.items else (),
        replaceable=replaceable,
    )
