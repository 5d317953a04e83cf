"""The run directory describes itself: ``manifest.json`` (how the run was made) and
``summary.json`` (the headline figures under plain keys).

The manifest is rewritten after every stage, so an interrupted run still says which stages
finished, when, and from what.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from attnprog.errors import AttnProgError, StoreError

PACKAGES = ("attnprog", "torch", "transformers", "numpy", "numba", "triton", "safetensors",
            "matplotlib", "spacy", "tqdm", "typer")
PAPER = {  # "Explaining Attention with Program Synthesis" and its authors' corrected follow-up
    "best_fit_iou": {"GPT-2": 0.69, "TinyLlama-1.1B": 0.74, "Llama-3.2-3B": 0.79},
    "best_fit_iou_protocol": "best fit chosen and reported on the same 5 sentences",
    # soft IoU falls as texts grow longer: compare on texts of this length
    "best_fit_iou_texts": "single sentences of 12 to 20 words",
    "ppl_increase_at_25_percent": 16.0,
    "ppl_increase_at_25_percent_protocol": "original: a hook composed the program onto the "
                                           "head's output instead of replacing its attention",
    "ppl_increase_at_25_percent_corrected": {"GPT-2": 32.5, "TinyLlama-1.1B": 17.2,
                                             "Llama-3.2-3B": 15.1, "Qwen3-8B-Base": 1.8},
    "zero_ablation_at_25_percent": {"GPT-2": 47.1, "Qwen3-8B-Base": 23.6},
    "corrected_protocol": "follow-up: the program's matrix replaces the head's attention; zero "
                          "ablation of the same heads beside it",
    "replaceable_share_at_16_percent": {"GPT-2": 22 / 144, "Qwen3-8B-Base": 624 / 1152},
}


# --- every file of a run directory, named once -------------------------------------------------

CONFIG = "config.json"  # the RunConfig
MANIFEST = "manifest.json"  # how the run was made: stages, timings, packages, device
LEDGER = "stages.json"  # the inputs each finished stage was made from
SUMMARY = "summary.json"  # the headline figures under plain keys
STORE = "attention.safetensors"  # every head's attention (AttentionStore)
POOL = "pool.jsonl"  # golden library + generator programs
LLM_POOL = "llm_pool.jsonl"  # programs from the LLM stage
FITTED = "fitted.jsonl"  # one fitted program per head
TABLE = "iou_table.safetensors"  # IoU of every program against every head (IoUTable)
LEAK = "leak.json"  # each checked program's leak (row i on the text vs on its prefix), swaps
LIBRARY = "library.json"  # the greedy library
HEADS = "heads.json"  # every head's type, best program by name, terms and the shortest fit
COSTS = "head_costs.json"  # each head's cost replaced alone (HeadCosts)
COSTS_PARTIAL = "head_costs.partial.json"  # exact costs finished so far
SWEEP_TEXT = "sweep.txt"  # the sweep's table as printed
SWEEP = "sweep.json"  # {order: {fraction: {condition: % increase}}}
SWEEP_DETAIL = "sweep_detail.json"  # everything the sweep measured
REPORT = "report.html"  # the self-contained report

RUN_FILES = (MANIFEST, SUMMARY, REPORT, CONFIG, STORE, POOL, LLM_POOL, FITTED, TABLE, LEAK, LIBRARY,
             HEADS, COSTS, SWEEP_TEXT, SWEEP, SWEEP_DETAIL, LEDGER)
RUN_MARKERS = (MANIFEST, LEDGER)  # files only a run directory holds
# what the single-stage commands (extract, generate, synthesize, rank) write and a run reads
# back or redoes (with the synthesis reports beside the pools); "*.partial" files are what an
# interrupted one leaves
STAGE_FILES = (STORE, POOL, LLM_POOL, FITTED, TABLE, "pool.llm.json", "llm_pool.llm.json")


def _stage_file(name: str) -> bool:
    return name in STAGE_FILES or name.endswith(".partial") or name.startswith(".")


def check_run_dir(out: Path) -> None:
    """Refuse an ``--out`` that is a file, or a directory holding files no run would write.

    A run writes config.json, report.html and more: it must not land in a checkpoint's or a
    project's folder and overwrite what is there. An earlier run's directory is resumed, and
    one holding only stage outputs (e.g. ``attnprog extract``'s store) is used as it is.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out} is a file; give attnprog run a new or empty directory")
    names = {entry.name for entry in out.iterdir()} if out.is_dir() else set()
    if not names & set(RUN_MARKERS) and not all(_stage_file(name) for name in names):
        raise StoreError(
            f"{out} is not empty and is not a run directory (no manifest.json or stages.json); "
            "a run writes config.json, report.html and more there. Give a new or empty "
            "directory, or an earlier run's directory to resume it."
        )


def now() -> str:
    """UTC time, ISO 8601, to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info(requested: str) -> dict:
    """What the run ran on: the requested device, the GPU's name if any, CPU and platform."""
    import torch

    used = ("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested
    info = {"requested": requested, "used": used, "torch": torch.__version__, "cuda": None,
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


class RunRecord:
    """Stage states and timings of one run; writes ``manifest.json`` whenever they change."""

    def __init__(self, out: Path, config) -> None:
        self.path = Path(out) / "manifest.json"
        previous = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.manifest = {
            "created": previous.get("created", now()),
            "updated": now(),
            "command": sys.argv,
            "config": dataclasses.asdict(config),
            "seed": getattr(config, "seed", None),
            "packages": package_versions(),
            "device": device_info(getattr(config, "device", "cpu")),
            "model": previous.get("model", {}),
            "corpus": previous.get("corpus", {}),
            "stages": {},
            "previous_stages": previous.get("stages", {}),
        }
        self.write()

    def describe_store(self, store, model_spec: str, corpus_spec: str) -> None:
        """Record the model's id and file hash and the corpus hash, from the attention store."""
        model_id = str(store.meta.get("model_id", ""))
        _, _, revision = model_id.partition("@")
        self.manifest["model"] = {
            "spec": model_spec, "id": model_id, "file_hash": revision.removeprefix("sha256:") or None,
            "type": store.meta.get("model_type"), "layers": store.n_layers, "heads": store.n_heads,
            "kv_heads": store.meta.get("n_kv_heads"), "dtype": store.meta.get("dtype"),
            "embeddings": store.embeddings.source if store.embeddings is not None else None,
        }
        self.manifest["corpus"] = {
            "spec": corpus_spec, "hash": store.meta.get("corpus_hash"),
            "tokenizer_id": store.meta.get("tokenizer_id"), "texts": store.n_texts,
            "max_tokens": store.meta.get("max_tokens"),
            "splits": {s: store.splits.count(s) for s in sorted(set(store.splits))},
        }
        self.write()

    @contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """Time one stage; the yielded dict's ``state`` is "done" unless the stage sets
        "reused"; an exception (or Ctrl-C) records "failed" and re-raises."""
        entry = {"state": "running", "started_at": now()}
        self.manifest["stages"][name] = entry
        self.write()
        start = time.perf_counter()
        try:
            yield entry
        except BaseException:
            entry["state"] = "failed"
            raise
        else:
            if entry["state"] == "running":
                entry["state"] = "done"
        finally:
            entry["seconds"] = round(time.perf_counter() - start, 3)
            entry["finished_at"] = now()
            self.write()

    def write(self) -> None:
        self.manifest["updated"] = now()
        tmp = self.path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(self.manifest, indent=2, default=str))
        tmp.replace(self.path)


def read_heads(directory: Path) -> dict | None:
    """``heads.json`` of a run directory, or None where the run wrote none (an older run, or a
    table written by ``attnprog rank`` alone)."""
    path = Path(directory) / HEADS
    return json.loads(path.read_text()) if path.is_file() else None


# --- summary ---------------------------------------------------------------------------------

# the sweep's figures summary.json holds under these keys, beside "ppl_increase"
SWEEP_FIGURES = ("kl", "ppl_increase_ci", "replaceable_share")


def sweep_detail(result) -> dict:
    """Everything a SweepResult holds, as JSON (whatever its fields), plus each row's increase."""
    record = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(vars(result))
    base = record.get("base_perplexity")
    for row in _rows(record):
        if base and isinstance(row.get("perplexity"), dict):
            row["increase"] = {c: 100.0 * (p / base - 1.0) for c, p in row["perplexity"].items()}
    return record


def _rows(record) -> Iterator[dict]:
    """Every dict with a ``fraction`` key anywhere in a sweep record (one or several orders)."""
    if isinstance(record, dict):
        if "fraction" in record:
            yield record
        for value in record.values():
            yield from _rows(value)
    elif isinstance(record, list):
        for value in record:
            yield from _rows(value)


def qa_accuracy(detail: dict | None) -> dict | None:
    """QA accuracy before (unmodified model) and after replacement, by fraction and condition."""
    if not detail or detail.get("base_qa_accuracy") is None:
        return None
    after: dict = {}
    for row in _rows(detail):
        if row.get("qa_accuracy"):
            after.setdefault(f"{row['fraction']:g}", {}).update(row["qa_accuracy"])
    return {"before": detail["base_qa_accuracy"], "after": after}


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def headline(best_fit_iou, library=None, sweep: dict | None = None, detail: dict | None = None) -> dict:
    """The figures a run is quoted by, under plain keys (held-out IoU over the explained heads)."""
    iou = np.asarray(best_fit_iou, dtype=np.float64)
    figures = {
        "heads": int(iou.size),
        "mean_best_fit_iou": _finite(float(iou.mean())) if iou.size else None,
        "median_best_fit_iou": _finite(float(np.median(iou))) if iou.size else None,
        "share_heads_iou_above_0_5": float((iou > 0.5).mean()) if iou.size else None,
        "share_heads_iou_above_0_75": float((iou > 0.75).mean()) if iou.size else None,
        "library_size": library.size if library is not None else None,
        "library_mean_iou": _finite(library.mean_iou) if library is not None else None,
        "baseline_iou": dict(library.baselines) if library is not None else None,
        "ppl_increase": sweep,
        "qa_accuracy": qa_accuracy(detail),
        "base_perplexity": (detail or {}).get("base_perplexity"),
        "paper": PAPER,
    }
    figures.update((detail or {}).get("figures", {}))  # KL, intervals, shares, the paper's protocol
    return figures


# --- the ledger ------------------------------------------------------------------------------

LEDGER_VERSION = 2  # 2: a "version" entry beside the stage keys; 1 (no entry) holds the same keys


def _named(part: str) -> str:
    """A key's part as ``why`` prints it: the bare 16-digit hash keys hold is the corpus's."""
    return f"corpus={part}" if re.fullmatch(r"[0-9a-f]{16}", part) else part


class Ledger:
    """``stages.json``: the key (what its result depends on) of every finished stage.

    A stage whose key and files are unchanged is read back; otherwise it runs, and ``why``
    says in one line what changed. Keys of a version-1 ledger are read as they are.
    """

    def __init__(self, out: Path, stages: Sequence[str]) -> None:
        self.path = Path(out) / LEDGER
        self.stages = tuple(stages)
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.version = saved.pop("version", 1)
        self.keys: dict[str, str] = saved

    def done(self, stage: str, key: str, files: Sequence[Path]) -> bool:
        return self.keys.get(stage) == key and all(path.is_file() for path in files)

    def why(self, stage: str, key: str, files: Sequence[Path]) -> str:
        """Why ``stage`` runs again ("" when it never finished here)."""
        old = self.keys.get(stage)
        if old is None:
            return ""
        if old != key:
            before, now = old.split("|"), key.split("|")
            gone = list(dict.fromkeys(_named(part) for part in before if part not in now))
            new = list(dict.fromkeys(_named(part) for part in now if part not in before))
            change = (f"{', '.join(gone)} -> {', '.join(new)}" if gone and new
                      else f"no longer {', '.join(gone)}" if gone else f"now also {', '.join(new)}")
            return f"redoing {stage}: its inputs changed ({change})"
        missing = [path.name for path in files if not path.is_file()]
        return f"redoing {stage}: {', '.join(missing)} missing" if missing else ""

    def record(self, stage: str, key: str) -> None:
        self.keys[stage] = key
        self._write()

    def forget_from(self, stage: str) -> None:
        """Drop ``stage`` and every stage after it, so the next run redoes them."""
        known = list(self.stages) + [name for name in self.keys if name not in self.stages]
        if stage not in known:
            raise AttnProgError(f"--force {stage!r}: no such stage; use one of {', '.join(known)}")
        for name in known[known.index(stage):]:
            self.keys.pop(name, None)
        self._write()

    def _write(self) -> None:
        self.path.write_text(json.dumps({"version": LEDGER_VERSION, **self.keys}, indent=2))
