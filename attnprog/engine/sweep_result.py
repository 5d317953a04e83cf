"""What a head-replacement sweep measured, as JSON and as the table ``attnprog replace`` prints."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from attnprog.engine.heads import head_label

CONDITIONS = ("programs", "uniform", "random", "zero", "mean")
ORDER_TITLES = {"iou": "in descending IoU order (iou)",
                "cost": "cheapest first by measured cost (cost)"}
ORDER_HEADINGS = {"iou": "descending IoU", "cost": "cheapest first"}


@dataclass
class SweepRow:
    fraction: float
    n_heads: int
    mean_iou: float  # mean best-fit IoU of the replaced heads, held-out when known (nan at 0 %)
    perplexity: dict[str, float]  # condition -> perplexity ("random": the mean over seeds)
    qa_accuracy: dict[str, float] = field(default_factory=dict)
    order: str = "iou"  # which head order chose the replaced heads (see ORDERS)
    kl: dict[str, float] = field(default_factory=dict)  # condition -> mean KL per token, nats
    ci: dict[str, list[float]] = field(default_factory=dict)  # condition -> [low, high] % increase
    random_perplexities: list[float] = field(default_factory=list)  # one per seed


@dataclass
class SweepResult:
    """Perplexity, KL (and QA accuracy) with a growing share of heads replaced; prints as a table.

    ``rows`` holds one row per (order, fraction), orders in ``orders``' sequence. From Python,
    ``increases()`` is {order: {fraction: {condition: % increase}}}; ``to_json()`` gives the
    same with fractions as strings ("0", "0.05", ...) under "ppl_increase", beside "kl" and
    "ppl_increase_ci" (same shape; [low, high]), "replaceable_share" {"16": {"selection": share,
    "heldout": share}, ...}, "mean_iou" {order: {fraction: IoU or null}}, "n_heads" {fraction:
    count}, "perplexity", "qa_accuracy" (when QA ran), "heads" {order: ["L18.H3", ...] in
    replacement order} and "head_costs" (how the cost order was measured, when it ran).
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
    random_seeds: int = 1
    mean_split: str = ""  # the texts the mean ablation averaged over
    qa_conditions: tuple[str, ...] = ()
    replaceable: dict = field(default_factory=dict)  # "16" -> {"selection", "heldout", ...}

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
            "kl": {o: by_fraction(o, lambda r: dict(r.kl)) for o in orders},
            "ppl_increase_ci": {o: by_fraction(o, lambda r: {c: list(v) for c, v in r.ci.items()})
                                for o in orders},
            "replaceable_share": {k: {"selection": v.get("selection"), "heldout": v.get("heldout")}
                                  for k, v in self.replaceable.items()},
            "random_seeds": self.random_seeds, "mean_split": self.mean_split,
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
        return "\n".join(self._preamble() + self._ppl_table() + self._kl_table()
                         + self._share_lines() + self._qa_table())

    def __str__(self) -> str:
        return self.to_text()

    def _preamble(self) -> list[str]:
        lines = [
            f"Head replacement on {self.model}: {self.n_texts} held-out texts, {self.n_tokens} "
            f"predicted tokens; unmodified perplexity {self.base_perplexity:.3f}",
            "perplexity increase over the unmodified model [95 % bootstrap interval over texts]; "
            "heads replaced " + " | ".join(ORDER_TITLES.get(o, o) for o in self.order_names()),
            f"controls on the same heads: uniform matrix, random program ({self.random_seeds} "
            f"seeds: mean, interval holds their spread), zero ablation, mean ablation (each "
            f"head's output averaged over the {self.mean_split or '?'} texts)",
        ]
        if self.cost_info:
            info = self.cost_info
            lines.append(f"cost order: each head's ΔNLL when replaced alone ({info['method']}), "
                         f"on {len(info['texts'])} {info['split']} texts")
        if self.base_qa_accuracy is not None:
            lines.append(f"QA: {self.qa_source}, {self.n_questions} questions; unmodified "
                         f"accuracy {100 * self.base_qa_accuracy:.1f} %")
        return lines

    def _conditions(self) -> list[str]:
        present = {c for row in self.rows for c in row.perplexity}
        return [c for c in CONDITIONS if c in present]

    def _ppl_table(self) -> list[str]:
        conditions, lines = self._conditions(), []
        for order in self.order_names():
            lines += ["", f"{ORDER_HEADINGS.get(order, order)}: % perplexity increase",
                      f"{'heads':>12}  {'mean IoU':>8}  " + "  ".join(f"{c:>21}"
                                                                  for c in conditions)]
            for r in self.rows_for(order):
                iou = "-" if math.isnan(r.mean_iou) else f"{r.mean_iou:.3f}"
                cells = [f"{self.increase(r, c):+7.1f} [{r.ci.get(c, [0, 0])[0]:+6.1f},"
                         f"{r.ci.get(c, [0, 0])[1]:+6.1f}]" for c in conditions]
                lines.append(f"{_label(r):>12}  {iou:>8}  " + "  ".join(f"{c:>21}" for c in cells))
        return lines

    def _kl_table(self) -> list[str]:
        conditions, lines = self._conditions(), []
        for order in self.order_names():
            lines += ["", f"{ORDER_HEADINGS.get(order, order)}: KL(unmodified ‖ replaced), "
                      "nats per predicted token",
                      f"{'heads':>12}  " + "  ".join(f"{c:>9}" for c in conditions)]
            for r in self.rows_for(order):
                lines.append(f"{_label(r):>12}  " + "  ".join(f"{r.kl.get(c, 0.0):9.4f}"
                                                              for c in conditions))
        return lines

    def _share_lines(self) -> list[str]:
        if not self.replaceable:
            return []
        lines = ["", "replaceable share (cheapest first, programs; found by bisection on the "
                 "selection texts, measured again on the held-out texts)"]
        for limit, found in self.replaceable.items():
            held = found.get("heldout_increase_at_selection_share")
            held = "" if held is None else f" (held-out increase there {held:+.1f} %)"
            lines.append(f"  within +{limit} % perplexity: selection "
                         f"{100 * found['selection']:.1f} % of heads ({found['count']}), held-out "
                         f"{100 * found['heldout']:.1f} %{held}")
        return lines

    def _qa_table(self) -> list[str]:
        if self.base_qa_accuracy is None:
            return []
        conditions = list(self.qa_conditions) or ["programs", "uniform", "random"]
        block = "  ".join(f"{c:>9}" for c in conditions)
        orders = self.order_names()
        lines = ["", "QA accuracy" + (" (random: first seed)" if self.random_seeds > 1 else ""),
                 f"{'':>12}  " + " | ".join(f"{ORDER_HEADINGS.get(o, o):^{len(block)}}"
                                            for o in orders),
                 f"{'':>12}  " + " | ".join(block for _ in orders)]  # which column is which
        by_order = {o: self.rows_for(o) for o in orders}
        for i, row in enumerate(by_order[orders[0]]):
            cells = ["  ".join(f"{100 * by_order[o][i].qa_accuracy[c]:8.1f}%" for c in conditions)
                     for o in orders]
            lines.append(f"{_label(row):>12}  " + " | ".join(cells))
        return lines


def _label(row: SweepRow) -> str:
    return f"{100 * row.fraction:g} % ({row.n_heads})"
