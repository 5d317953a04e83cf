"""The replaceable share: the most heads of one order that can be replaced within a budget.

Heads are taken in order (cheapest first), and the perplexity increase with the first k of
them replaced is assumed not to decrease as k grows (monotone: it holds up to noise, since each
head added is one more head replaced). Under that assumption a bisection over k finds the largest
k within the budget; a step cap keeps it to a few forward passes, and the result then brackets
the boundary: ``count`` is verified within the budget, ``above`` verified over it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

DEFAULT_STEPS = 6
LIMITS = (16.0, 5.0)  # % perplexity: the paper's cost at 25 % of heads, and a stricter one


@dataclass
class ShareSearch:
    """Largest head count verified within ``limit``; the smallest verified over it (None
    when every head fits); and every count measured, with its % increase."""

    limit: float
    count: int
    above: int | None
    n: int
    measured: dict[int, float] = field(default_factory=dict)

    @property
    def share(self) -> float:
        return self.count / self.n if self.n else 0.0


def largest_within(increase_at: Callable[[int], float], n: int, limit: float, *,
                   steps: int | None = DEFAULT_STEPS, known: dict[int, float] | None = None,
                   first: int | None = None) -> ShareSearch:
    """Bisect head counts 0..n for the largest whose increase (``increase_at(k)``, in %) is
    at most ``limit``. ``known`` counts are not measured again; ``first`` is measured first
    (a count expected near the boundary); ``steps`` caps new measurements (None: exact)."""
    measured = {0: 0.0, **(known or {})}
    taken = 0

    def bracket() -> tuple[int, int]:
        lo = max(k for k, v in measured.items() if v <= limit)
        hi = min((k for k, v in measured.items() if v > limit and k > lo), default=n + 1)
        return lo, hi

    lo, hi = bracket()
    while hi - lo > 1 and (steps is None or taken < steps):
        mid = first if first is not None and lo < first < hi else (lo + hi) // 2
        first = None
        measured[mid] = float(increase_at(mid))
        taken += 1
        lo, hi = bracket()
    return ShareSearch(limit, lo, hi if hi <= n else None, n, measured)


def replaceable_shares(increase_at: Callable[[int], float], n: int,
                       limits: Sequence[float] = LIMITS, *, steps: int | None = DEFAULT_STEPS,
                       known: dict[int, float] | None = None,
                       first: dict[float, int] | None = None) -> dict[float, ShareSearch]:
    """:func:`largest_within` for each limit, sharing what each search measured."""
    measured = dict(known or {})
    found = {}
    for limit in limits:
        found[limit] = largest_within(increase_at, n, limit, steps=steps, known=measured,
                                      first=(first or {}).get(limit))
        measured.update(found[limit].measured)
    return found
