"""Library selection: the few programs that together explain every head, chosen greedily.

Each head is explained by the best library program for it (chosen on the selection split).
Greedy coverage adds, one at a time, the program that raises the heads' mean IoU the most,
until the library reaches its size cap or the next gain is below a threshold. Quoted figures
are measured on the held-out split, beside the paper's baselines on the same heads: the
uniform causal matrix, a random earlier token per row, and a random program from the pool.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from attnprog.engine.heads import head_label
from attnprog.errors import StoreError
from attnprog.synth.program import Program
from attnprog.synth.runtime.outputs import ProgramOutputs

DEFAULT_SIZE = 1000
DEFAULT_MIN_GAIN = 1e-4  # in mean IoU over heads: 0.0001 is one head gaining 0.027 of 270


def greedy_coverage(iou: torch.Tensor, max_size: int = DEFAULT_SIZE,
                    min_gain: float = DEFAULT_MIN_GAIN) -> tuple[list[int], list[float], list[float]]:
    """Greedy library over ``iou [programs, heads]``: (program indices in the order added, each one's gain,
    the heads' mean IoU after each addition). Stops at ``max_size`` or a gain below ``min_gain``.
    """
    iou = torch.as_tensor(iou, dtype=torch.float32)
    n_programs, n_heads = iou.shape
    covered = torch.zeros(n_heads, dtype=torch.float32)  # each head's best IoU in the library
    chosen, gains, curve = [], [], []
    for _ in range(min(int(max_size), n_programs)):
        gain = (iou - covered).clamp_(min=0.0).mean(dim=1)  # [programs] mean improvement over heads
        best = int(gain.argmax())
        if chosen and float(gain[best]) < min_gain:
            break
        chosen.append(best)
        gains.append(float(gain[best]))
        covered = torch.maximum(covered, iou[best])
        curve.append(float(covered.mean()))
    return chosen, gains, curve


def prefix_assignment(selection: torch.Tensor, heldout: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    """For libraries made of the first k of K programs (k = 1..K): the heads' mean held-out IoU
    when each head uses its best program on the selection split; and the full library's choice
    per head (position among the K programs). Both inputs are [programs, heads], the K
    programs in the order added."""
    n_programs, n_heads = selection.shape
    best_selection = torch.full((n_heads,), -1.0)
    choice = torch.zeros(n_heads, dtype=torch.long)
    curve = []
    for k in range(n_programs):
        better = selection[k] > best_selection  # ties keep the earlier program, as argmax does
        best_selection = torch.where(better, selection[k], best_selection)
        choice = torch.where(better, torch.full_like(choice, k), choice)
        curve.append(float(heldout[choice, torch.arange(n_heads)].mean()))
    return curve, choice


def baseline_outputs(sentences_lengths, offsets, seed: int = 0) -> ProgramOutputs:
    """Packed outputs of the two program-free baselines on every text: the uniform causal
    matrix (row i spreads over tokens 0..i) and a random earlier token per row (seeded)."""
    rng = np.random.default_rng(seed)
    n_cells = int(offsets[-1])
    uniform = np.empty(n_cells, dtype=np.float32)
    random_token = np.zeros(n_cells, dtype=np.float32)
    for s, n in enumerate(sentences_lengths):
        start = int(offsets[s])
        for i in range(int(n)):
            row = start + i * (i + 1) // 2  # packed row i of text s holds cells 0..i
            uniform[row : row + i + 1] = 1.0 / (i + 1)
            random_token[row + int(rng.integers(0, i + 1))] = 1.0
    programs = [Program(source="# the uniform causal matrix\n", name="uniform_causal", family="baseline"),
                Program(source=f"# a random earlier token per row, seed {seed}\n", name="random_token",
                        family="baseline")]
    return ProgramOutputs(programs=programs, values=np.stack([uniform, random_token]),
                          failed=np.zeros((2, len(sentences_lengths)), dtype=bool),
                          offsets=np.asarray(offsets, dtype=np.int64))


def random_program_choice(n_programs: int, n_rows: int, seed: int = 0) -> np.ndarray:
    """A random pool program per head: the same draw the replacement sweep's baseline makes."""
    return np.random.default_rng(seed).integers(0, n_programs, size=n_rows)


@dataclass
class Library:
    """A greedy library and what it explains, with the figures to quote (held-out IoU)."""

    indices: list[int]  # programs of the table, in the order added
    programs: list[Program]
    gains: list[float]
    heads: list[int]  # head indices (layer * n_heads + head) the library was chosen for
    n_heads: int  # heads per layer, to label heads
    curve_selection: list[float]  # mean selection IoU over heads with the first k programs
    curve_heldout: list[float]  # the same on held-out texts
    assignment: list[int]  # per head (in ``heads`` order): position in ``indices`` it uses
    heldout_iou: list[float]  # per head: held-out IoU of that program
    best_fit_heldout_iou: list[float]  # per head: held-out IoU of its best fit in the whole pool
    baselines: dict[str, float] = field(default_factory=dict)  # mean held-out IoU per baseline
    meta: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.indices)

    @property
    def mean_iou(self) -> float:
        """The library's mean held-out IoU over its heads."""
        return float(np.mean(self.heldout_iou)) if self.heldout_iou else float("nan")

    def to_dict(self) -> dict:
        record = asdict(self)
        record["programs"] = [dict(p.to_dict(), index=i, gain=g, heads=self.heads_using(k))
                              for k, (p, i, g) in enumerate(zip(self.programs, self.indices, self.gains))]
        record["size"], record["mean_iou"] = self.size, self.mean_iou
        return record

    def heads_using(self, position: int) -> list[str]:
        """Labels (``L18.H3``) of the heads that use the library's ``position``-th program."""
        return [head_label(self.heads[h], self.n_heads) for h, k in enumerate(self.assignment)
                if k == position]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Library:
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"no library at {path}: run `attnprog run` to select one")
        record = json.loads(path.read_text())
        record.pop("size", None), record.pop("mean_iou", None)
        record["programs"] = [Program.from_dict(p) for p in record["programs"]]
        return cls(**record)


def select_library(store, outputs, table, heads=None, max_size: int = DEFAULT_SIZE,
                   min_gain: float = DEFAULT_MIN_GAIN, seed: int = 0,
                   heldout_split: str = "heldout", **rank_kwargs) -> Library:
    """Greedy library over ``table`` (ranked on the selection split) for ``heads`` (head indices;
    all when None), measured on ``heldout_split`` with the three baselines on the same heads.

    ``store`` and ``outputs`` are those the table was ranked from (same texts, same programs).
    """
    from attnprog.engine.rank import rank

    heads = list(range(table.iou.shape[1])) if heads is None else [int(h) for h in heads]
    if not heads:
        raise StoreError("no heads to select a library for")
    selection = table.iou[:, heads].float()
    indices, gains, curve_selection = greedy_coverage(selection, max_size, min_gain)

    # one held-out pass scores the library and the random-program baseline's picks together
    random_pick = random_program_choice(table.n_programs, table.iou.shape[1], seed)[heads]
    scored = sorted(set(indices) | {int(p) for p in random_pick})
    row_of = {p: r for r, p in enumerate(scored)}
    held = rank(store, outputs.select(scored), split=heldout_split, **rank_kwargs).iou[:, heads]
    library_held = held[[row_of[p] for p in indices]]
    curve_heldout, choice = prefix_assignment(selection[indices], library_held)
    columns = torch.arange(len(heads))
    heldout_iou = library_held[choice, columns]

    base = baseline_outputs(store.lengths.tolist(), store.offsets.cpu().numpy(), seed)
    base_iou = rank(store, base, split=heldout_split, **rank_kwargs).iou[:, heads]
    random_iou = held[[row_of[int(p)] for p in random_pick], columns]
    best_fit = ([float("nan")] * len(heads) if table.heldout_iou is None
                else table.heldout_iou[heads].float().tolist())
    return Library(
        indices=indices, programs=[table.programs[i] for i in indices], gains=gains, heads=heads,
        n_heads=table.n_heads, curve_selection=curve_selection, curve_heldout=curve_heldout,
        assignment=choice.tolist(), heldout_iou=heldout_iou.tolist(), best_fit_heldout_iou=best_fit,
        baselines={"uniform causal": float(base_iou[0].mean()),
                   "random token": float(base_iou[1].mean()),
                   "random program": float(random_iou.mean())},
        meta={"max_size": int(max_size), "min_gain": float(min_gain), "seed": int(seed),
              "split": table.split, "heldout_split": heldout_split, "n_pool": table.n_programs},
    )
