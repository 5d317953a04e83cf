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
    orders: dict[str, list[int]] = field(default_factory=dict)  # order -> head rows, in order
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
    tokenised QA texts). ``heads`` (rows) limits replacement to those heads; fractions are
    then shares of them.
    """
    n_layers, n_heads = store.n_layers, store.n_heads
    best_iou, best_index = best_fit(table)
    if len(best_iou) != n_layers * n_heads:
        raise StoreError(f"the IoU table has {len(best_iou)} heads, the store "
                         f"{n_layers} x {n_heads}: rank programs against this store")
    head_orders = {}
    for name in orders:
        if name == "iou":
            head_orders[name] = np.argsort(-best_iou, kind="stable")  # best fit first
        elif name == "cost":
            if costs is None:
                costs = head_costs(model, store, table, split=cost_split, outputs=outputs,
                                   method=cost_method, tokenizer=tokenizer,
                                   batch_size=batch_size, impl=impl, progress=progress)
            if costs.split == split or set(costs.texts) & set(store.split_indices(split)):
                raise StoreError(f"head costs were measured on the {split!r} texts the sweep "
                                 "reports on: measure them on another split (selection)")
            head_orders[name] = costs.order()  # cheapest first
        else:
            orders_from_option(name)  # raises with the valid names
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
    most = max(counts.values(), default=0)
    replaced = {int(h) for order in head_orders.values() for h in order[:most]}
    n_programs = len(table.programs)
    random_index = np.random.default_rng(seed).integers(0, n_programs, size=len(best_iou))

    # the only programs that ever run: best fits and random picks of the replaced heads
    needed = sorted({int(best_index[h]) for h in replaced} | {int(random_index[h]) for h in replaced})

    texts = store.split_indices(split)
    token_ids = [store.token_ids(s) for s in texts]
    pad_id = pad_token_id(tokenizer)
    # outputs on the whole store are addressed by store index, on the split by position
    whole_store = outputs is not None and n_texts_of(outputs) == store.n_texts
    corpus_indices = texts if whole_store else None
    outputs, row_of = outputs_for(
        table, needed, outputs, lambda: store.sentences(texts),
        store.n_texts if whole_store else len(texts), progress,
    )

    def sources(order, condition: str, count: int, row_map) -> dict:
        heads = {}
        for h in order[:count]:
            key = divmod(int(h), n_heads)
            if condition == "uniform":
                heads[key] = "uniform"
            else:
                program = best_index[h] if condition == "programs" else random_index[h]
                heads[key] = OutputsRow(row_map[0], row_map[1][int(program)])
        return heads

    qa_pairs = None
    if qa_items:
        if tokenizer is None:
            raise ModelError("QA scoring needs the model's tokenizer: pass tokenizer=")
        qa_pairs = tokenise_qa(qa_items, tokenizer)
        qa_outputs, qa_row_of = outputs_for(
            table, needed, qa_outputs, lambda: [p.sentence for p in qa_pairs], len(qa_pairs),
            progress,
        )

    def run(heads_for, desc):
        lp = token_logprobs(model, token_ids, heads_for((outputs, row_of)), batch_size=batch_size,
                            impl=impl, pad_id=pad_id, corpus_indices=corpus_indices,
                            progress=progress, desc=desc)
        acc = None
        if qa_pairs is not None:
            qa_heads = heads_for((qa_outputs, qa_row_of))
            # QA texts are short: bigger batches, fewer forward passes
            qa_lp = token_logprobs(model, [p.ids for p in qa_pairs], qa_heads,
                                   batch_size=4 * batch_size, impl=impl, pad_id=pad_id,
                                   progress=progress, desc=desc + " QA")
            acc = qa_accuracy(qa_items, qa_predictions(qa_items, qa_pairs, qa_lp))
        return lp, acc

    base_lp, base_acc = run(lambda _: {}, "unmodified")
    base = perplexity(base_lp)
    rows = []
    steps = [(name, fraction) for name in head_orders for fraction in fractions]
    for name, fraction in tqdm(steps, desc="sweep", unit="fraction",
                               disable=None if progress else True):
        order, count = head_orders[name], counts[fraction]
        ppl, acc = {}, {}
        for condition in CONDITIONS:
            if count == 0:  # nothing replaced: the unmodified run, exactly
                ppl[condition], acc[condition] = base, base_acc
                continue
            lp, acc[condition] = run(lambda m, o=order, c=condition, k=count: sources(o, c, k, m),
                                     f"{name} {100 * fraction:g}% {condition}")
            ppl[condition] = perplexity(lp)
        mean_iou = float(reported_iou[order[:count]].mean()) if count else float("nan")
        rows.append(SweepRow(fraction, count, mean_iou, ppl, acc if qa_pairs is not None else {},
                             order=name))

    cost_info = {}
    if "cost" in head_orders:
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
        orders={name: [int(h) for h in order[:most]] for name, order in head_orders.items()},
        n_heads_per_layer=n_heads,
        cost_info=cost_info,
    )


