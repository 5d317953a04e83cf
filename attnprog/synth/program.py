"""The program contract: the Program record, the one normalisation every output gets, and
pool I/O. The static check lives in :mod:`attnprog.synth.policy`, sandboxed validation in
:mod:`attnprog.synth.runtime.validate`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from attnprog.layout import tril_index


@dataclass(frozen=True)
class Program:
    """A candidate explanation: Python source defining ``name(s) -> np.ndarray``."""

    source: str
    name: str = "program"
    family: str = "custom"
    provenance: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def hash(self) -> str:
        """Content hash of source and function name (first 16 hex digits of sha256)."""
        digest = hashlib.sha256(f"{self.name}\n{self.source}".encode())
        return digest.hexdigest()[:16]

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "name": self.name,
            "family": self.family,
            "provenance": dict(self.provenance),
            "hash": self.hash,
        }

    @classmethod
    def from_dict(cls, record: dict) -> Program:
        return cls(
            source=record["source"],
            name=record.get("name", "program"),
            family=record.get("family", "custom"),
            provenance=dict(record.get("provenance", {})),
        )


def as_program(obj) -> Program:
    """``obj`` as a Program: a Program as it is, a Python function as a custom program of its
    own source (defined in a file or a notebook cell, not a lambda) with numpy imported as
    ``np``; other names of its module are not carried, so it imports what else it needs."""
    import inspect
    import textwrap

    from attnprog.errors import ProgramError

    if isinstance(obj, Program):
        return obj
    if not inspect.isfunction(obj):
        raise ProgramError(f"a program is a Program or a Python function, not "
                           f"{type(obj).__name__}")
    if obj.__name__ == "<lambda>":
        raise ProgramError("a lambda has no source of its own to run in the sandbox: write it "
                           "with def, or pass Program(source=..., name=...)")
    try:
        source = textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError) as err:
        raise ProgramError(f"the source of {obj.__name__} cannot be read ({err}): pass "
                           f"Program(source=..., name={obj.__name__!r})") from err
    return Program(source="import numpy as np\n\n\n" + source, name=obj.__name__)


def normalise(matrix: np.ndarray) -> np.ndarray:
    """Clip negatives, apply the causal mask, divide rows by their sum; empty rows -> one-hot on 0.

    The caller has already checked shape and finiteness. Returns float64 n x n.
    """
    out = np.tril(np.clip(np.asarray(matrix, dtype=np.float64), 0.0, None))
    row_sums = out.sum(axis=1, keepdims=True)
    empty = row_sums[:, 0] <= 0.0
    out[empty, 0] = 1.0
    row_sums[empty] = 1.0
    return out / row_sums


def normalise_packed(matrix: np.ndarray) -> np.ndarray:
    """``pack(normalise(matrix))`` computed on the lower triangle only (the sandbox's hot path).

    Same rule, float64 [n(n+1)/2]; equal to the dense form up to float rounding.
    """
    n = matrix.shape[-1]
    rows, cols = tril_index(n)
    cells = np.asarray(matrix[rows, cols], dtype=np.float64)
    np.maximum(cells, 0.0, out=cells)
    starts = _row_starts(n)
    sums = np.add.reduceat(cells, starts) if n else np.zeros(0)
    empty = sums <= 0.0
    if empty.any():
        cells[starts[empty]] = 1.0  # the first cell of each row is column 0
        sums[empty] = 1.0
    cells /= sums[rows]
    return cells


@lru_cache(maxsize=64)
def _row_starts(n: int) -> np.ndarray:
    """Index of each row's first cell in the packed triangle."""
    index = np.arange(n)
    starts = index * (index + 1) // 2
    starts.setflags(write=False)
    return starts


def save_pool(programs, path) -> None:
    """Write programs (Programs or functions, as :func:`as_program` takes them) as JSON lines,
    one ``Program.to_dict()`` per line."""
    import json
    from pathlib import Path

    lines = [json.dumps(as_program(p).to_dict()) + "\n" for p in programs]  # refused before writing
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(lines)


def load_pool(path) -> list[Program]:
    """Read a program pool written by :func:`save_pool` (JSON lines)."""
    import json
    from pathlib import Path

    from attnprog.errors import ProgramError

    path = Path(path)
    if not path.is_file():
        raise ProgramError(f"no program pool at {path}: write one with `attnprog generate`")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:  # e.g. a store passed as the pool
        raise ProgramError(f"{path} is not a program pool (not UTF-8 text: byte {err.start}): "
                           "pass the .jsonl file `attnprog generate` wrote") from err
    programs = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            programs.append(Program.from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError) as err:
            raise ProgramError(f"{path}:{line_no} is not a program record ({err})") from err
    if not programs:
        raise ProgramError(f"{path} holds no programs")
    return programs
