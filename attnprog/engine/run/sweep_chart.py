"""The replacement story's numbers, read from summary.json for the page's charts and table.

summary.json holds ``ppl_increase[order][fraction][condition]`` (older runs: one order, or the
same dict under "sweep"), and may hold ``kl`` of the same shape, ``ppl_increase_ci`` with a
[low, high] interval per point, ``replaceable_share`` and ``paper_protocol_iou``. Whatever is
there is drawn; what is missing is left out.
"""

from __future__ import annotations

import math

METRICS = {"ppl_increase": "perplexity increase (%)", "kl": "KL divergence from the model (nats/token)"}
INTERVALS = {"ppl_increase": "ppl_increase_ci", "kl": "kl_ci"}


def _is_fraction(key) -> bool:
    try:
        float(key)
        return True
    except (TypeError, ValueError):
        return False


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def by_order(sweep: dict | None) -> dict[str, dict]:
    """{order: {fraction: {condition: value}}} from either shape ({fraction: ...} is one order,
    named "IoU")."""
    if not sweep:
        return {}
    orders = {"IoU": sweep} if all(_is_fraction(k) for k in sweep) else sweep
    return {str(o): f for o, f in orders.items() if isinstance(f, dict)}


def sweep_curves(sweep: dict | None) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{order: {condition: [(fraction, value), ...]}} sorted by fraction, numbers only."""
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for order, by_fraction in by_order(sweep).items():
        for fraction, by_condition in by_fraction.items():
            if not (_is_fraction(fraction) and isinstance(by_condition, dict)):
                continue
            for condition, value in by_condition.items():
                if _finite(value):
                    curves.setdefault(order, {}).setdefault(condition, []).append(
                        (float(fraction), float(value)))
    for conditions in curves.values():
        for points in conditions.values():
            points.sort()
    return curves


def ppl_sweep(summary: dict) -> dict | None:
    """The perplexity sweep of a summary: "ppl_increase", else the older "sweep"."""
    return summary.get("ppl_increase") or summary.get("sweep")


def interval(intervals: dict | None, order: str, fraction: float, condition: str) -> list | None:
    """[low, high] of one point from a ``*_ci`` dict, or None."""
    for key, by_condition in (by_order(intervals).get(order) or {}).items():
        if _is_fraction(key) and abs(float(key) - fraction) < 1e-9 and isinstance(by_condition, dict):
            bounds = by_condition.get(condition)
            if isinstance(bounds, (list, tuple)) and len(bounds) == 2 and all(map(_finite, bounds)):
                return [float(bounds[0]), float(bounds[1])]
    return None


def heads_by_fraction(detail: dict | None) -> dict[float, int]:
    """{fraction: heads replaced} from sweep_detail.json's rows (any nesting)."""
    found: dict[float, int] = {}
    stack = [detail]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if _is_fraction(item.get("fraction")) and isinstance(item.get("n_heads"), int):
                found[round(float(item["fraction"]), 9)] = item["n_heads"]
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def chart_data(summary: dict, n_explained: int, detail: dict | None = None) -> list[dict]:
    """One chart per metric present: {"metric", "label", "series": [{"order", "condition",
    "points": [[fraction, value, low or None, high or None, heads replaced], ...]}]}."""
    counts = heads_by_fraction(detail)
    charts = []
    for metric, label in METRICS.items():
        values = ppl_sweep(summary) if metric == "ppl_increase" else summary.get(metric)
        series = []
        for order, conditions in sweep_curves(values).items():
            for condition, points in conditions.items():
                rows = []
                for fraction, value in points:
                    bounds = interval(summary.get(INTERVALS[metric]), order, fraction, condition)
                    heads = counts.get(round(fraction, 9), round(fraction * n_explained))
                    rows.append([fraction, value, *(bounds or [None, None]), heads])
                series.append({"order": order, "condition": condition, "points": rows})
        if series:
            charts.append({"metric": metric, "label": label, "series": series})
    return charts
