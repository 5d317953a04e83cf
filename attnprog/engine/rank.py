"""Ranking: the soft IoU of every program against every head, and each head's best fit.

The attention stays where the store keeps it (GPU or CPU); program outputs stream to it in
chunks sized to a memory budget, and the sum-min kernel (``attnprog.kernels.iou``) does the
programs × heads × texts reduction. A program that failed on a text, or wrote a non-finite value there,
scores 0 on that text; nothing yields NaN.
"""

from __future__ import annotations

import json
import os
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from attnprog.engine.store import AttentionStore
from attnprog.errors import StoreError
from attnprog.kernels.iou import (
    cell_major,
    device_layout,
    iou_from_sums,
    resolve_impl,
    sum_min,
    sum_min_numba,
    text_sums,
)
from attnprog.layout import causal_offsets, text_cells
from attnprog.synth.program import Program
from attnprog.synth.runtime.outputs import ProgramOutputs
from attnprog.synth.titles import program_title

FORMAT_VERSION = "1"
DEFAULT_MEMORY_BUDGET = 512 << 20  # bytes of per-chunk working memory on the device


@dataclass
class BestFit:
    """One head's best program: highest mean IoU on the ranking split."""

    layer: int
    head: int
    program_index: int
    name: str
    family: str
    iou: float  # mean IoU on the split the table was ranked on
    heldout_iou: float | None = None  # the same program's mean IoU on the held-out split
    title: str = ""  # what the program does, in words (synth.titles.program_title)

    @property
    def reported_iou(self) -> float:
        """The figure to quote (DESIGN.md "Best fit"): held-out IoU when measured."""
        return self.iou if self.heldout_iou is None else self.heldout_iou

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class IoUTable:
    """Mean soft IoU of the programs against all n_heads_total heads of a model on one split.

    iou         [programs, n_heads_total] float32  mean over the split's texts; column =
                                                   head_index = layer * n_heads + head
    per_text    [programs, n_heads_total, texts]   per-text IoU, when requested
    heldout_iou [n_heads_total]                    IoU of each head's best fit on
                                                   ``heldout_split``, when measured
    """

    iou: torch.Tensor
    programs: list[Program]
    split: str
    n_layers: int
    n_heads: int
    per_text: torch.Tensor | None = None
    text_indices: list[int] = field(default_factory=list)
    heldout_split: str | None = None
    heldout_iou: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n_programs(self) -> int:
        return int(self.iou.shape[0])

    def best(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(best_iou [n_heads_total], best_index [n_heads_total]): each head's top program (first
        on ties)."""
        if self.n_programs == 0:
            raise StoreError("the IoU table holds no programs")
        best_iou, best_index = self.iou.max(dim=0)
        return best_iou, best_index

    def topk(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(iou [n_heads_total, k], index [n_heads_total, k]): each head's k best programs, best
        first."""
        k = max(0, min(int(k), self.n_programs))
        values, indices = self.iou.T.topk(k, dim=1, largest=True, sorted=True)
        return values, indices

    def best_fits(self) -> list[BestFit]:
        """Every head's best fit, in head_index order (layer-major)."""
        best_iou, best_index = self.best()
        fits = []
        for head_index, (iou, index) in enumerate(zip(best_iou.tolist(), best_index.tolist())):
            layer, head = divmod(head_index, self.n_heads)
            program = self.programs[index]
            heldout = None if self.heldout_iou is None else float(self.heldout_iou[head_index])
            fits.append(BestFit(layer, head, index, program.name, program.family, iou, heldout,
                                program_title(program)))
        return fits

    # --- persistence -------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write tensors to safetensors, programs and metadata into its header."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"iou": self.iou.detach().cpu().float().contiguous()}
        if self.per_text is not None:
            tensors["per_text"] = self.per_text.detach().cpu().float().contiguous()
        if self.heldout_iou is not None:
            tensors["heldout_iou"] = self.heldout_iou.detach().cpu().float().contiguous()
        metadata = {
            "format": FORMAT_VERSION,
            "kind": "attnprog.iou_table",
            "programs": json.dumps([p.to_dict() for p in self.programs]),
            "split": self.split,
            "n_layers": str(self.n_layers),
            "n_heads": str(self.n_heads),
            "text_indices": json.dumps(self.text_indices),
            "heldout_split": self.heldout_split or "",
            "meta": json.dumps(self.meta),
        }
        tmp = path.with_suffix(path.suffix + ".partial")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> IoUTable:
        """Read a table written by :meth:`save`."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise StoreError(f"no IoU table at {path}: run `attnprog rank` first")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise StoreError(f"{path} is not a readable IoU table ({err})") from err
        if metadata.get("kind") != "attnprog.iou_table" or "iou" not in tensors:
            raise StoreError(f"{path} is not an attnprog IoU table")
        return cls(
            iou=tensors["iou"],
            programs=[Program.from_dict(r) for r in json.loads(metadata["programs"])],
            split=metadata["split"],
            n_layers=int(metadata["n_layers"]),
            n_heads=int(metadata["n_heads"]),
            per_text=tensors.get("per_text"),
            text_indices=json.loads(metadata.get("text_indices", "[]")),
            heldout_split=metadata.get("heldout_split") or None,
            heldout_iou=tensors.get("heldout_iou"),
            meta=json.loads(metadata.get("meta", "{}")),
        )


# --- ranking ----------------------------------------------------------------------------------


def _check_outputs(store: AttentionStore, outputs: ProgramOutputs) -> None:
    store_offsets = store.offsets.cpu().numpy()
    if not np.array_equal(np.asarray(outputs.offsets), store_offsets):
        raise StoreError(
            f"program outputs cover {len(outputs.offsets) - 1} texts / {int(outputs.offsets[-1])} "
            f"cells but the store has {store.n_texts} / {store.n_cells}: evaluate the programs "
            "on this store's texts"
        )
    if outputs.failed.shape != (outputs.n_programs, store.n_texts):
        raise StoreError(f"failure mask has shape {outputs.failed.shape}, expected "
                         f"({outputs.n_programs}, {store.n_texts})")


def _split_cells(store: AttentionStore, texts: list[int]) -> tuple[np.ndarray | None, np.ndarray]:
    """(cell index into the packed layout or None for all texts, offsets of the split [texts + 1])."""
    offsets = store.offsets.cpu().numpy()
    if texts == list(range(store.n_texts)):
        return None, offsets
    return text_cells(offsets, texts), causal_offsets(store.lengths.cpu().numpy()[texts])


def chunk_size(n_programs: int, n_cells: int, n_heads: int, n_texts: int, memory_budget: int,
               per_text: bool = False) -> int:
    """Programs per chunk so one chunk's working memory fits ``memory_budget`` bytes.

    Per program: its outputs (fp32, one copy staged and one on the device) and ~4
    [heads, texts] fp32 temporaries (sum-min, union, IoU, and the per-text copy when kept).
    """
    per_program = 4 * (2 * n_cells + (4 + int(per_text)) * n_heads * n_texts)
    return int(max(1, min(n_programs, memory_budget // max(per_program, 1))))


@dataclass
class SplitAttention:
    """The attention of one split, ready to score program chunks against (see :func:`score_chunk`).

    cells: index of the split's cells in the packed layout (None: every text); offsets
    [texts + 1] of the split; attention [n_heads_total, cells] (the split's cells) on its device;
    attn_sums [n_heads_total, texts]; attention_t and layout: the numba and Triton paths' own
    copies, built once rather than per chunk.
    """

    texts: list[int]
    cells: np.ndarray | None
    offsets: torch.Tensor
    attention: torch.Tensor
    attn_sums: torch.Tensor
    attention_t: torch.Tensor | None
    layout: object | None
    impl: str  # the resolved sum-min path
    requested: str  # what the caller asked for ("auto" may fall back from Triton to torch)


def prepare_split(store: AttentionStore, split: str | None, impl: str = "auto") -> SplitAttention:
    """The store's attention on ``split``'s texts, with what every chunk needs precomputed."""
    texts = store.split_indices(split)
    if not texts:
        raise StoreError(f"split {split!r} holds no texts")
    device = store.attn_packed.device
    requested, resolved = impl, resolve_impl(impl, device)
    cells, offsets_np = _split_cells(store, texts)
    offsets = torch.from_numpy(np.asarray(offsets_np, dtype=np.int64))
    attention = store.attn_packed  # [n_heads_total, cells] on its device, then the split's cells
    if cells is not None:
        attention = attention[:, torch.from_numpy(cells).to(device)]
    attention_t = cell_major(attention) if resolved == "numba" else None
    layout = device_layout(attention, offsets) if resolved == "triton" else None
    return SplitAttention(list(texts), cells, offsets, attention, text_sums(attention, offsets),
                          attention_t, layout, resolved, requested)


def score_chunk(target: SplitAttention, values, failed: np.ndarray) -> torch.Tensor:
    """IoU [programs, heads, texts] of a chunk of program rows ``values [programs, cells]`` (the
    split's cells; numpy, or a tensor already on the device) against ``target``'s heads.

    ``failed [programs, texts]`` marks texts a program failed on; they, and texts where it wrote a
    non-finite value, score 0.
    """
    device, offsets = target.attention.device, target.offsets
    if isinstance(values, torch.Tensor):
        chunk = values.to(device=device, dtype=torch.float32)  # [programs, cells]
    else:
        chunk = torch.as_tensor(np.asarray(values, dtype=np.float32)).to(device)
    failed = torch.from_numpy(np.asarray(failed, dtype=bool)).to(device)  # [programs, texts]
    # A non-finite value fails the program on that text; the kernel needs finite, >= 0.
    # A text's sum is finite when all its values are, so the per-cell test runs only if not.
    prog_sums = text_sums(chunk, offsets)  # [programs, texts]
    if not bool(torch.isfinite(prog_sums).all()):
        finite = torch.isfinite(chunk)
        failed |= text_sums((~finite).float(), offsets) > 0
        chunk = torch.where(finite, chunk, torch.zeros_like(chunk))
        prog_sums = text_sums(chunk, offsets)
    if chunk.numel() and float(chunk.amin()) < 0:  # out of contract; never write into the caller's array
        chunk = chunk.clamp(min=0.0)
        prog_sums = text_sums(chunk, offsets)

    if target.impl == "numba":
        m = sum_min_numba(chunk, target.attention, offsets, attention_cell_major=target.attention_t)
    else:
        # "auto" lets sum_min fall back to torch if the Triton kernel fails on this GPU
        requested = target.requested
        m = sum_min(chunk, target.attention, offsets,
                    impl=requested if requested == "auto" else target.impl, layout=target.layout)
    iou = iou_from_sums(m.to(device), prog_sums, target.attn_sums)
    return iou.masked_fill_(failed[:, None, :], 0.0)


class _DeviceRows:
    """Rows of streamed outputs made on the GPU: generator programs mixed there with torch
    (atoms built once per corpus, in parallel processes), the others copied from their values.
    """

    def __init__(self, outputs, device: torch.device):
        from attnprog.synth.generator.mixing import TorchMixer
        from attnprog.synth.generator.specs import is_generated

        self.outputs, self.device = outputs, device
        generated = [i for i, p in enumerate(outputs.programs) if is_generated(p)]
        self.spec_of = np.full(outputs.n_programs, -1, dtype=np.int64)  # program -> spec row
        self.spec_of[generated] = np.arange(len(generated))
        specs = [outputs.programs[i].provenance["spec"] for i in generated]
        workers = min(16, os.cpu_count() or 1)
        self.mixer = TorchMixer(specs, outputs.sentences, device, workers=workers)

    def rows(self, indices) -> torch.Tensor:
        """[len(indices), cells] float32 on the device."""
        indices = np.asarray(indices, dtype=np.int64)
        spec = self.spec_of[indices]
        out = torch.empty(len(indices), int(self.outputs.offsets[-1]), device=self.device)
        mixed = np.flatnonzero(spec >= 0)
        if len(mixed):
            out[torch.from_numpy(mixed).to(self.device)] = self.mixer.rows(spec[mixed].tolist())
        stored = np.flatnonzero(spec < 0)
        if len(stored):
            values = self.outputs.select(indices[stored].tolist()).values
            out[torch.from_numpy(stored).to(self.device)] = torch.from_numpy(values).to(self.device)
        return out


_DEVICE_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # outputs -> _DeviceRows


def _device_rows(outputs, device: torch.device) -> _DeviceRows | None:
    """The GPU row maker of streamed generator outputs (one per outputs object), or None
    where rows come from the CPU: not on CUDA, not streamed outputs, or no generator program."""
    if device.type != "cuda" or not hasattr(outputs, "sentences"):
        return None
    if outputs not in _DEVICE_ROWS:
        from attnprog.synth.generator.specs import is_generated

        mixable = any(is_generated(p) for p in outputs.programs)  # else: copy rows as before
        _DEVICE_ROWS[outputs] = _DeviceRows(outputs, device) if mixable else None
    return _DEVICE_ROWS[outputs]


class _Subset:
    """Programs ``indices`` of streamed outputs, their rows made on the GPU when read."""

    def __init__(self, parent, indices):
        self.parent, self.indices = parent, [int(i) for i in indices]
        self.programs = [parent.programs[i] for i in self.indices]
        self.failed = np.asarray(parent.failed)[self.indices]
        self.offsets, self.corpus_hash = parent.offsets, parent.corpus_hash
        self.reasons = [parent.reasons[i] for i in self.indices]

    @property
    def n_programs(self) -> int:
        return len(self.indices)

    def rows(self, start: int, stop: int, texts=None) -> np.ndarray:
        return self.parent.rows_at(self.indices[start:stop], texts)


def rank(
    store: AttentionStore,
    outputs: ProgramOutputs,
    split: str | None = "selection",
    per_text: bool = False,
    chunk_programs: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    impl: str = "auto",
    progress: bool = False,
) -> IoUTable:
    """Mean soft IoU of every program against every head over the texts of ``split``.

    ``outputs`` (ProgramOutputs, or StreamedOutputs whose rows are computed as they are read)
    must be evaluated on the store's texts (same packed offsets). Programs stream
    to the attention's device ``chunk_programs`` at a time (default: what fits
    ``memory_budget`` bytes). ``impl`` picks the sum-min path ("auto": Triton on CUDA, numba
    on CPU). ``split=None`` or "all" ranks on every text.
    """
    _check_outputs(store, outputs)
    target = prepare_split(store, split, impl)
    texts, cells, n_texts, n_heads_total = (target.texts, target.cells, len(target.texts),
                                            store.n_rows)
    n_cells = int(target.offsets[-1])
    device = target.attention.device
    device_rows = _device_rows(outputs.parent if isinstance(outputs, _Subset) else outputs, device)
    cells_device = None if cells is None else torch.from_numpy(cells).to(device)

    n_programs = outputs.n_programs
    if chunk_programs is None:
        chunk_programs = chunk_size(n_programs, n_cells, n_heads_total, n_texts, memory_budget,
                                    per_text)
    chunk_programs = max(1, int(chunk_programs))
    failed_all = np.asarray(outputs.failed, dtype=bool)[:, texts]  # [programs, texts]

    iou_mean = torch.zeros(n_programs, n_heads_total, dtype=torch.float32)
    iou_texts = torch.zeros(n_programs, n_heads_total, n_texts, dtype=torch.float32) if per_text else None
    starts = range(0, n_programs, chunk_programs)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="ranking", unit="chunk", disable=None)  # None: only on a terminal
    for p0 in starts:
        p1 = min(n_programs, p0 + chunk_programs)
        if device_rows is not None:  # generator rows made on the GPU, next to the kernel
            parent_rows = outputs.indices[p0:p1] if isinstance(outputs, _Subset) else range(p0, p1)
            values = device_rows.rows(parent_rows)
            values = values if cells_device is None else values[:, cells_device]
        else:  # streamed outputs compute these rows only now, on the split's texts only
            values = outputs.rows(p0, p1, texts=None if cells is None else texts)
        iou = score_chunk(target, values, failed_all[p0:p1])
        iou_mean[p0:p1] = iou.mean(dim=2).cpu()
        if iou_texts is not None:
            iou_texts[p0:p1] = iou.cpu()

    return table_of(store, outputs, split, texts, iou_mean, iou_texts, impl=target.impl)


def table_of(store: AttentionStore, outputs, split: str | None, texts, iou_mean: torch.Tensor,
             iou_texts: torch.Tensor | None, **meta) -> IoUTable:
    """The IoUTable of scores computed for ``outputs`` against ``store``'s heads on ``texts``;
    ``meta`` adds to the model and corpus identity (the kernel used, the cluster...)."""
    return IoUTable(
        iou=iou_mean,
        programs=list(outputs.programs),
        split=split or "all",
        n_layers=store.n_layers,
        n_heads=store.n_heads,
        per_text=iou_texts,
        text_indices=list(texts),
        meta={"model": store.meta.get("model_id", ""),
              "corpus_hash": store.meta.get("corpus_hash", ""), **meta},
    )


def subset_outputs(outputs: ProgramOutputs, indices) -> ProgramOutputs:
    """The outputs of the programs at ``indices`` only (rows copied)."""
    return outputs.select(indices)


def rank_with_heldout(
    store: AttentionStore,
    outputs: ProgramOutputs,
    split: str = "selection",
    heldout_split: str = "heldout",
    ranker=None,
    **kwargs,
) -> IoUTable:
    """Rank on ``split`` to pick each head's best fit, then measure it on ``heldout_split``.

    The table's ``heldout_iou [n_heads_total]`` holds the figure DESIGN.md reports for a best fit.
    Keyword arguments go to :func:`rank` (or ``ranker``, a function with its signature, e.g.
    the Ray-sharded one) for both passes.
    """
    ranker = ranker or rank
    table = ranker(store, outputs, split=split, **kwargs)
    _, best_index = table.best()
    unique = torch.unique(best_index)  # only the winners are re-scored
    if _device_rows(outputs, store.attn_packed.device) is not None:
        winners = _Subset(outputs, unique.tolist())  # their rows are made on the GPU as well
    else:
        winners = subset_outputs(outputs, unique.tolist())
    held = ranker(store, winners, split=heldout_split,
                **{k: v for k, v in kwargs.items() if k != "per_text"})
    position = torch.searchsorted(unique, best_index)  # winner's row in the held-out table
    table.heldout_split = heldout_split
    table.heldout_iou = held.iou[position, torch.arange(table.iou.shape[1])]
    return table
