"""Causal best fits: each head's best program among those that read no later token.

A replaced head whose program reads tokens after the query would see the very text the
model predicts. :func:`check_leaks` measures the leak (``synth.runtime.leak``) of the fitted
programs and of each head's best fit, and where a best fit leaks, of its next best, until
every head has a causal program. :meth:`LeakCheck.causal_table` is the IoU table the
replacement measurements use: leaky programs can no longer be a head's best fit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnprog.engine.heads import head_label
from attnprog.engine.rank import IoUTable, rank
from attnprog.synth.runtime.leak import CUT_POINTS, LEAK_TOLERANCE, program_leaks

LEAK_TEXTS = 3  # held-out texts the check cuts
MAX_ROUNDS = 32  # next-best programs tried per head before its leaky best fit is kept


@dataclass
class LeakCheck:
    """Leaks measured (program hash -> largest L1 row difference) and the heads whose best fit
    leaked: head_index -> {"leaky": hash, "used": hash, "heldout_iou": the used one's}."""

    leaks: dict[str, float]
    texts: list[int]
    swaps: dict[int, dict] = field(default_factory=dict)
    unresolved: list[int] = field(default_factory=list)  # heads left with a leaky best fit

    def is_leaky(self, program_hash: str) -> bool:
        return self.leaks.get(program_hash, 0.0) > LEAK_TOLERANCE

    def causal_table(self, table: IoUTable) -> IoUTable:
        """``table`` with every leaky program's IoU at -1 (never a best fit) and the held-out
        IoU of each swapped head's causal program."""
        iou = table.iou.clone()
        leaky = [k for k, p in enumerate(table.programs) if self.is_leaky(p.hash)]
        iou[leaky] = -1.0
        for h in self.unresolved:  # no causal program found: its leaky best fit stays
            iou[leaky, h] = table.iou[leaky, h]
        heldout = None if table.heldout_iou is None else table.heldout_iou.clone()
        for h, swap in self.swaps.items():
            if heldout is not None:
                heldout[h] = swap["heldout_iou"]
        return IoUTable(iou=iou, programs=table.programs, split=table.split,
                        n_layers=table.n_layers, n_heads=table.n_heads,
                        text_indices=table.text_indices, heldout_split=table.heldout_split,
                        heldout_iou=heldout, meta=dict(table.meta, causal=True))

    def figures(self, fitted_hashes: Sequence[str]) -> dict:
        """Counts for the summary: programs checked, leaky ones, leaky fitted ones, swaps."""
        return {"checked": len(self.leaks), "leaky": sum(map(self.is_leaky, self.leaks)),
                "leaky_fitted": sum(map(self.is_leaky, set(fitted_hashes))),
                "heads_swapped": len(self.swaps), "heads_left_leaky": len(self.unresolved)}

    def save(self, path: Path, n_heads: int) -> None:
        record = {"tolerance": LEAK_TOLERANCE, "texts": self.texts, "cut_points": list(CUT_POINTS),
                  "programs": self.leaks,
                  "swaps": {head_label(h, n_heads): dict(s, head_index=h) for h, s in self.swaps.items()},
                  "unresolved": [head_label(h, n_heads) for h in self.unresolved],
                  "unresolved_index": self.unresolved}
        path.write_text(json.dumps(record, indent=1))

    @classmethod
    def load(cls, path: Path) -> LeakCheck:
        record = json.loads(Path(path).read_text())
        swaps = {int(s["head_index"]): {k: v for k, v in s.items() if k != "head_index"}
                 for s in record["swaps"].values()}
        return cls(record["programs"], record["texts"], swaps, record["unresolved_index"])


def check_leaks(store, table: IoUTable, outputs, heads: Sequence[int], fitted=(),
                evaluate=None) -> LeakCheck:
    """Measure the leaks of ``fitted`` and of each head's best fit (the heads in ``heads``),
    trying next-best programs where a best fit leaks; ``outputs`` (of ``table.programs`` on
    ``store``'s texts) give a swapped head's held-out IoU. ``evaluate``: as program_leaks'."""
    split = table.heldout_split or table.split
    texts = store.split_indices(split)[:LEAK_TEXTS]
    sentences = store.sentences(texts)
    leaks: dict[str, float] = {}

    def measure(programs) -> None:
        todo = list({p.hash: p for p in programs if p.hash not in leaks}.values())
        if todo:
            leaks.update(zip([p.hash for p in todo],
                             program_leaks(todo, sentences, evaluate).tolist(), strict=True))

    measure(fitted)
    check = LeakCheck(leaks, list(texts))
    heads = list(heads)
    first = table.best()[1]
    for _ in range(MAX_ROUNDS):
        best = _causal_best(check, table)
        measure([table.programs[int(best[h])] for h in heads])
        if not any(check.is_leaky(table.programs[int(best[h])].hash) for h in heads):
            break
    best = _causal_best(check, table)
    check.unresolved = [h for h in heads if check.is_leaky(table.programs[int(best[h])].hash)]
    swapped = [h for h in heads if int(best[h]) != int(first[h]) and h not in check.unresolved]
    held = _heldout_iou(store, table, outputs, best, swapped)
    check.swaps = {h: {"leaky": table.programs[int(first[h])].hash,
                       "used": table.programs[int(best[h])].hash, "heldout_iou": held[h]}
                   for h in swapped}
    return check


def _causal_best(check: LeakCheck, table: IoUTable) -> torch.Tensor:
    """Each head's best program once the leaky ones found so far are out."""
    iou = table.iou.clone()
    iou[[k for k, p in enumerate(table.programs) if check.is_leaky(p.hash)]] = -1.0
    return iou.max(dim=0).indices


def _heldout_iou(store, table: IoUTable, outputs, best, heads: list[int]) -> dict[int, float]:
    """{head: IoU of its program ``best[head]`` on the held-out split} for ``heads``."""
    if not heads or table.heldout_split is None:
        return {h: float(table.iou[int(best[h]), h]) for h in heads}
    programs = sorted({int(best[h]) for h in heads})
    held = rank(store, outputs.select(programs), split=table.heldout_split)
    return {h: float(held.iou[programs.index(int(best[h])), h]) for h in heads}
