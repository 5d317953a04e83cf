"""What replacing heads costs: perplexity and multiple-choice QA sweeps.

Heads are replaced, each by its best program, at 0, 5, 10, 25, 50 and 100 % of all heads, in
one or both of two orders: descending best-fit IoU ("iou"), or cheapest first by each head's
measured single-replacement cost on the selection split ("cost", see ``engine.head_costs``).
Two baselines replace the same heads, in each order, with the uniform causal matrix and with
a random program from the pool. Perplexity is reported as the % increase over the unmodified
model on held-out texts; QA as accuracy, scoring each choice by the mean log-prob of its
tokens given the context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from attnprog.engine.batching import pad_token_id
from attnprog.engine.head_costs import head_costs
from attnprog.engine.heads import head_label
from attnprog.engine.nll import perplexity, token_logprobs
from attnprog.engine.qa import QAItem, qa_accuracy, qa_predictions, tokenise_qa
from attnprog.engine.replace import OutputsRow, best_fit, n_texts_of, outputs_for
from attnprog.errors import AttnProgError, ModelError, StoreError

STANDARD_FRACTIONS = (0.0, 0.05, 0.10, 0.25, 0.50, 1.0)
CONDITIONS = ("programs", "uniform", "random")


def fractions_up_to(limit: float) -> list[float]:
    """The standard fractions up to ``limit``, plus ``limit`` itself when it is not one of them."""
    if not 0.0 <= limit <= 1.0:
        raise AttnProgError(f"fraction must be between 0 and 1, got {limit}")
    chosen = [f for f in STANDARD_FRACTIONS if f <= limit + 1e-9]
    if not any(abs(f - limit) < 1e-9 for f in chosen):
        chosen.append(limit)
    return chosen


# --- the sweep -------------------------------------------------------------------------------


@dataclass
class SweepRow:
    fraction: float
    n_heads: int
    mean_iou: float  # mean best-fit IoU of the replaced heads, held-out when known (nan at 0 %)
    perplexity: dict[str, float]  # condition -> perplexity
    qa_accuracy: dict[str, float] = field(default_factory=dict)
    order: str = "iou"  # which head order chose the replaced heads (see ORDERS)


@dataclass
class SweepResult:
    """Perplexity (and QA accuracy) with a growing share of heads replaced; prints as a table.

    ``rows`` holds one row per (order, fraction), orders in ``orders``' sequence. From Python,
    ``increases()`` is {order: {fraction: {condition: % increase}}}; ``to_json()`` gives the
    same with fractions as strings ("0", "0.05", ...) under "ppl_increase", beside
    "mean_iou" {order: {fraction: IoU or null}}, "n_heads" {fraction: count},
    "perplexity" {order: {fraction: {condition: ppl}}}, "qa_accuracy" (same shape, when QA
    ran), "heads" {order: ["L18.H3", ...] in replacement order} and "head_costs"
    (how the cost order was measured, when it ran).
    """

    model: str
    n_texts: int
    n_tokens: int
    base_perplexity: float
    rows: list[SweepRow]
    base_qa_accuracy: float | None = None
    n_questions: int = 0
    qa_source: str = ""
    orders: dict[str, list[int]] = field(default_factory=dict)  # order -> head indices, in order
    n_heads_per_layer: int = 0
    cost_info: dict = field(default_factory=dict)

    def increase(self, row: SweepRow, condition: str) -> float:
        """% perplexity increase over the unmodified model."""
        return 100.0 * (row.perplexity[condition] / self.base_perplexity - 1.0)

    def order_names(self) -> list[str]:
        return list(dict.fromkeys(row.order for row in self.rows))

    def rows_for(self, order: str) -> list[SweepRow]:
        return [row for row in self.rows if row.order == order]

    def increases(self) -> dict[str, dict[float, dict[str, float]]]:
        """{order: {fraction: {condition: % perplexity increase}}}."""
        return {order: {row.fraction: {c: self.increase(row, c) for c in row.perplexity}
                        for row in self.rows_for(order)}
                for order in self.order_names()}

    def to_json(self) -> dict:
        """Plain JSON: see the class docstring for the keys."""

        def by_fraction(order, value):
            return {f"{row.fraction:g}": value(row) for row in self.rows_for(order)}

        orders = self.order_names()
        data = {
            "model": self.model, "n_texts": self.n_texts, "n_tokens": self.n_tokens,
            "base_perplexity": self.base_perplexity, "orders": orders,
            "ppl_increase": {o: by_fraction(o, lambda r: {c: self.increase(r, c)
                                                          for c in r.perplexity})
                             for o in orders},
            "mean_iou": {o: by_fraction(o, lambda r: None if math.isnan(r.mean_iou)
                                        else r.mean_iou) for o in orders},
            "n_heads": {f"{row.fraction:g}": row.n_heads for row in self.rows},
            "perplexity": {o: by_fraction(o, lambda r: dict(r.perplexity)) for o in orders},
        }  # fmt: skip
        if self.base_qa_accuracy is not None:
            data["base_qa_accuracy"] = self.base_qa_accuracy
            data["qa_source"], data["n_questions"] = self.qa_source, self.n_questions
            data["qa_accuracy"] = {o: by_fraction(o, lambda r: dict(r.qa_accuracy))
                                   for o in orders}
        if self.orders and self.n_heads_per_layer:
            data["heads"] = {o: [head_label(h, self.n_heads_per_layer) for h in head_indices]
                             for o, head_indices in self.orders.items()}
        if self.cost_info:
            data["head_costs"] = dict(self.cost_info)
        return data

    def to_text(self) -> str:
        orders = self.order_names()
        lines = [
            f"Head replacement on {self.model}: {self.n_texts} held-out texts, {self.n_tokens} "
            f"predicted tokens; unmodified perplexity {self.base_perplexity:.3f}",
            "perplexity increase over the unmodified model; heads replaced "
            + " | ".join(ORDER_TITLES.get(o, o) for o in orders),
        ]
        if self.cost_info:
            info = self.cost_info
            lines.append(f"cost order: each head's ΔNLL when replaced alone ({info['method']}), "
                         f"on {len(info['texts'])} {info['split']} texts")
        if self.base_qa_accuracy is not None:
            lines.append(f"QA: {self.qa_source}, {self.n_questions} questions; unmodified "
                         f"accuracy {100 * self.base_qa_accuracy:.1f} %")
        block = f"{'mean IoU':>8}  " + "  ".join(f"{c:>9}" for c in CONDITIONS)
        width = len(block)
        lines += ["", f"{'':>12}  " + " | ".join(f"{ORDER_HEADINGS.get(o, o):^{width}}"
                                                 for o in orders)]
        lines.append(f"{'heads':>12}  " + " | ".join(block for _ in orders))
        by_order = {o: self.rows_for(o) for o in orders}
        for i, row in enumerate(by_order[orders[0]]):
            label = f"{100 * row.fraction:g} % ({row.n_heads})"
            cells = []
            for o in orders:
                r = by_order[o][i]
                iou = "-" if math.isnan(r.mean_iou) else f"{r.mean_iou:.3f}"
                cells.append(f"{iou:>8}  " + "  ".join(f"{self.increase(r, c):+8.1f}%"
                                                       for c in CONDITIONS))
            lines.append(f"{label:>12}  " + " | ".join(cells))
        if self.base_qa_accuracy is not None:
            block = "  ".join(f"{c:>9}" for c in CONDITIONS)
            lines += ["", "QA accuracy", f"{'':>12}  " + " | ".join(
                f"{ORDER_HEADINGS.get(o, o):^{len(block)}}" for o in orders)]
            for i, row in enumerate(by_order[orders[0]]):
                label = f"{100 * row.fraction:g} % ({row.n_heads})"
                cells = ["  ".join(f"{100 * by_order[o][i].qa_accuracy[c]:8.1f}%"
                                   for c in CONDITIONS) for o in orders]
                lines.append(f"{label:>12}  " + " | ".join(cells))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


ORDERS = ("iou", "cost")
ORDER_TITLES = {"iou": "in descending IoU order (iou)",
                "cost": "cheapest first by measured cost (cost)"}
ORDER_HEADINGS = {"iou": "descending IoU", "cost": "cheapest first"}


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
    batch_size: int = 8,
    impl: str = "auto",
    progress: bool = True,
    heads: Sequence[int] | None = None,
) -> SweepResult:
    """Replace 0..100 % of heads by best programs and both baselines, for each head order.

    ``orders``: "iou" (best fit first) and/or "cost" (cheapest first by ``costs``, a
    ``HeadCosts`` measured on ``cost_split``; measured here with ``cost_method`` when None).
    ``outputs``: ProgramOutputs of ``table.programs`` on the split's texts or on all of the
    store's texts (when None, only the programs needed run, through ``synth.runtime.evaluate``).
    ``qa_items`` adds QA accuracy (needs ``tokenizer``; ``qa_outputs`` likewise covers the
    tokenised QA texts). ``heads`` (head indices) limits replacement to those heads; fractions are
    then shares of them.
    """
    best_iou, best_index = best_fit(table)
    _check_table_fits(best_iou, store)
    measure_costs = lambda: head_costs(model, store, table, split=cost_split, outputs=outputs,
                                       method=cost_method, tokenizer=tokenizer,
                                       batch_size=batch_size, impl=impl, progress=progress)
    head_orders, costs = _head_orders(orders, best_iou, costs, measure_costs, store, split)
    plan = _plan(head_orders, heads, fractions, table, best_iou, best_index, seed, store.n_heads)

    texts, needed = store.split_indices(split), plan.needed()
    outputs, row_of, corpus_indices = _text_outputs(store, table, texts, needed, outputs, progress)
    qa_pairs, qa_outputs, qa_row_of = _qa_outputs(qa_items, tokenizer, table, needed, qa_outputs,
                                                  progress)
    scorer = _Scorer(model, [store.token_ids(s) for s in texts], outputs, row_of, corpus_indices,
                     pad_token_id(tokenizer), batch_size, impl, progress,
                     qa_items, qa_pairs, qa_outputs, qa_row_of)

    base_lp, base_acc = scorer.run(lambda _: {}, "unmodified")
    base = perplexity(base_lp)
    steps = [(name, fraction) for name in plan.head_orders for fraction in fractions]
    rows = [_sweep_row(plan, scorer, name, fraction, base, base_acc)
            for name, fraction in tqdm(steps, desc="sweep", unit="fraction",
                                       disable=None if progress else True)]
    return _sweep_result(model, store, texts, base_lp, base, base_acc, rows, plan, costs,
                         qa_items, qa_source)


def _check_table_fits(best_iou, store) -> None:
    n_layers, n_heads = store.n_layers, store.n_heads
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


@dataclass
class _Plan:
    """Which heads each order replaces at each fraction, and the programs they get."""

    head_orders: dict[str, np.ndarray]  # order -> head indices, in replacement order
    counts: dict[float, int]  # fraction -> heads replaced
    iou: np.ndarray  # head_index -> best-fit IoU as reported (held-out when the table has it)
    best_index: np.ndarray  # head_index -> its best-fit program
    random_index: np.ndarray  # head_index -> the random baseline's program
    n_heads: int  # per layer

    @property
    def most(self) -> int:
        return max(self.counts.values(), default=0)

    def needed(self) -> list[int]:
        """The only programs that ever run: best fits and random picks of the replaced heads."""
        replaced = {int(h) for order in self.head_orders.values() for h in order[: self.most]}
        return sorted({int(self.best_index[h]) for h in replaced}
                      | {int(self.random_index[h]) for h in replaced})

    def sources(self, order, condition: str, count: int, row_map) -> dict:
        """replace_heads' sources: the first ``count`` heads of ``order`` under ``condition``."""
        heads = {}
        for h in order[:count]:
            key = divmod(int(h), self.n_heads)
            if condition == "uniform":
                heads[key] = "uniform"
            else:
                program = self.best_index[h] if condition == "programs" else self.random_index[h]
                heads[key] = OutputsRow(row_map[0], row_map[1][int(program)])
        return heads


def _plan(head_orders, heads, fractions, table, best_iou, best_index, seed, n_heads) -> _Plan:
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
    random_index = np.random.default_rng(seed).integers(0, len(table.programs), size=len(best_iou))
    return _Plan(head_orders, counts, reported_iou, best_index, random_index, n_heads)


def _text_outputs(store, table, texts, needed, outputs, progress):
    """(outputs, program -> row, corpus indices for token_logprobs) on the sweep's texts."""
    # outputs on the whole store are addressed by store index, on the split by position
    whole_store = outputs is not None and n_texts_of(outputs) == store.n_texts
    outputs, row_of = outputs_for(
        table, needed, outputs, lambda: store.sentences(texts),
        store.n_texts if whole_store else len(texts), progress,
    )
    return outputs, row_of, texts if whole_store else None


def _qa_outputs(qa_items, tokenizer, table, needed, qa_outputs, progress):
    """(tokenised QA pairs, outputs on them, program -> row), or Nones without QA items."""
    if not qa_items:
        return None, qa_outputs, None
    if tokenizer is None:
        raise ModelError("QA scoring needs the model's tokenizer: pass tokenizer=")
    qa_pairs = tokenise_qa(qa_items, tokenizer)
    qa_outputs, qa_row_of = outputs_for(
        table, needed, qa_outputs, lambda: [p.sentence for p in qa_pairs], len(qa_pairs), progress,
    )
    return qa_pairs, qa_outputs, qa_row_of


@dataclass
class _Scorer:
    """Runs the model on the sweep's texts (and QA pairs) with some heads replaced."""

    model: object
    token_ids: list
    outputs: object
    row_of: dict
    corpus_indices: list[int] | None
    pad_id: int | None
    batch_size: int
    impl: str
    progress: bool
    qa_items: Sequence[QAItem] | None
    qa_pairs: list | None
    qa_outputs: object
    qa_row_of: dict | None

    def run(self, heads_for, desc: str):
        """(token log-probs, QA accuracy or None) with ``heads_for((outputs, row_of))`` replaced."""
        lp = token_logprobs(self.model, self.token_ids, heads_for((self.outputs, self.row_of)),
                            batch_size=self.batch_size, impl=self.impl, pad_id=self.pad_id,
                            corpus_indices=self.corpus_indices, progress=self.progress, desc=desc)
        if self.qa_pairs is None:
            return lp, None
        qa_heads = heads_for((self.qa_outputs, self.qa_row_of))
        # QA texts are short: bigger batches, fewer forward passes
        qa_lp = token_logprobs(self.model, [p.ids for p in self.qa_pairs], qa_heads,
                               batch_size=4 * self.batch_size, impl=self.impl, pad_id=self.pad_id,
                               progress=self.progress, desc=desc + " QA")
        return lp, qa_accuracy(self.qa_items, qa_predictions(self.qa_items, self.qa_pairs, qa_lp))


def _sweep_row(plan: _Plan, scorer: _Scorer, name: str, fraction: float, base: float,
               base_acc: float | None) -> SweepRow:
    """Every condition with the first heads of order ``name`` replaced, ``fraction`` of them."""
    order, count = plan.head_orders[name], plan.counts[fraction]
    ppl, acc = {}, {}
    for condition in CONDITIONS:
        if count == 0:  # nothing replaced: the unmodified run, exactly
            ppl[condition], acc[condition] = base, base_acc
            continue
        lp, acc[condition] = scorer.run(lambda m, c=condition: plan.sources(order, c, count, m),
                                        f"{name} {100 * fraction:g}% {condition}")
        ppl[condition] = perplexity(lp)
    mean_iou = float(plan.iou[order[:count]].mean()) if count else float("nan")
    return SweepRow(fraction, count, mean_iou, ppl, acc if scorer.qa_pairs is not None else {},
                    order=name)


def _sweep_result(model, store, texts, base_lp, base, base_acc, rows, plan: _Plan, costs,
                  qa_items, qa_source) -> SweepResult:
    cost_info = {}
    if "cost" in plan.head_orders:
        cost_info = {"method": costs.method, "split": costs.split, "texts": list(costs.texts),
                     "n_tokens": costs.n_tokens,
                     "costs": [float(c) for c in costs.costs]}
    return SweepResult(
        model=str(store.meta.get("model_id", type(model).__name__)),
        n_texts=len(texts),
        n_tokens=sum(len(lp) for lp in base_lp),
        base_perplexity=base,
        rows=rows,
        base_qa_accuracy=base_acc,
        n_questions=len(qa_items or []),
        qa_source=qa_source,
        orders={name: [int(h) for h in order[: plan.most]]
                for name, order in plan.head_orders.items()},
        n_heads_per_layer=plan.n_heads,
        cost_info=cost_info,
    )
