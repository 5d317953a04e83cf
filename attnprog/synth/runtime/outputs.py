"""ProgramOutputs: the normalised outputs of some programs on some texts, in the packed causal
layout."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attnprog.errors import StoreError
from attnprog.layout import text_cells
from attnprog.synth.program import Program


@dataclass
class ProgramOutputs:
    """Outputs of ``programs`` on one tokenised corpus.

    values  [programs, cells] float32  normalised program matrices, packed; 0 where a program
                                       failed
    failed  [programs, texts] bool     True where the program failed on that text (scores IoU 0)
    reasons                            per program, the first failure reason (or "" when none)
    offsets [texts + 1] int64          the corpus' packed offsets (same as the AttentionStore's)
    """

    programs: list[Program]
    values: np.ndarray
    failed: np.ndarray
    offsets: np.ndarray
    reasons: list[str] = field(default_factory=list)
    corpus_hash: str = ""

    def __post_init__(self) -> None:
        if not self.reasons:
            self.reasons = [""] * len(self.programs)

    @property
    def n_programs(self) -> int:
        return len(self.programs)

    def rows(self, start: int, stop: int, texts=None) -> np.ndarray:
        """Values of programs ``start:stop``: [stop - start, cells] float32; with ``texts``,
        only those texts' cells, in that order."""
        values = self.values[start:stop]
        return values if texts is None else values[:, text_cells(self.offsets, texts)]

    def select(self, indices) -> ProgramOutputs:
        """The outputs of the programs at ``indices`` only (rows copied)."""
        indices = np.asarray(list(indices), dtype=np.int64)
        return ProgramOutputs(
            programs=[self.programs[i] for i in indices],
            values=self.values[indices],
            failed=np.asarray(self.failed)[indices],
            offsets=self.offsets,
            reasons=[self.reasons[i] for i in indices],
            corpus_hash=self.corpus_hash,
        )

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        meta = {
            "programs": json.dumps([p.to_dict() for p in self.programs]),
            "reasons": json.dumps(self.reasons),
            "corpus_hash": self.corpus_hash,
        }
        tensors = {
            "values": np.ascontiguousarray(self.values, dtype=np.float32),
            "failed": np.ascontiguousarray(self.failed, dtype=np.uint8),
            "offsets": np.ascontiguousarray(self.offsets, dtype=np.int64),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> ProgramOutputs:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise StoreError(f"no program outputs at {path}: run the evaluation step first")
        try:
            with safe_open(str(path), framework="numpy") as handle:
                meta = handle.metadata() or {}
                values = handle.get_tensor("values")
                failed = handle.get_tensor("failed").astype(bool)
                offsets = handle.get_tensor("offsets")
        except (SafetensorError, OSError, ValueError) as err:  # another file, or not safetensors
            raise StoreError(f"{path} is not a file of program outputs ({err}): pass the "
                             "outputs an evaluation wrote, or --pool") from err
        programs = [Program.from_dict(r) for r in json.loads(meta.get("programs", "[]"))]
        return cls(
            programs=programs,
            values=values,
            failed=failed,
            offsets=offsets,
            reasons=json.loads(meta.get("reasons", "[]")),
            corpus_hash=meta.get("corpus_hash", ""),
        )
