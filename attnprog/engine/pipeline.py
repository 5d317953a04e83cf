"""The whole job in one call: extract, generate, evaluate, rank, replace. Each stage is resumable.

Every stage writes its result into the run directory and is skipped when a re-run finds it
there for the same inputs, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from attnprog.engine.corpus import load_corpus
from attnprog.engine.extract import extract_or_load
from attnprog.engine.models import load_model
from attnprog.engine.store import AttentionStore
from attnprog.errors import CorpusError
from attnprog.synth.program import Program, load_pool, save_pool


@dataclass
class RunConfig:
    """What one pipeline run does; saved as ``config.json`` in the run directory."""

    out: str = "runs/demo"
    model: str = "smollm2-135m"
    corpus: str = "builtin"
    text_field: str = "text"
    limit: int = 0  # first N texts only (0: all)
    max_tokens: int = 128
    n_candidates: int = 5000  # generator programs, on top of the golden library
    fraction: float = 0.25  # largest share of heads replaced in the sweep
    qa: bool = True
    order: str = "both"  # heads replaced by "iou" (best fit first), "cost" (cheapest first), "both"
    cost_method: str = "auto"  # head costs: "exact" (a pass per head), "linear", "auto"
    batch_size: int = 8
    device: str = "cpu"
    top: int = 12  # best fits printed


@contextmanager
def _stage(echo: Callable[[str], None], name: str):
    """Print a stage's name, then its wall time when it finishes."""
    start = time.perf_counter()
    echo(f"[{name}]")
    yield
    echo(f"  done in {time.perf_counter() - start:.1f} s")


def build_pool(n_candidates: int, golden: bool = True) -> list[Program]:
    """The golden library (when asked) plus ``n_candidates`` distinct generator programs."""
    from attnprog.synth.generator.golden import golden_programs
    from attnprog.synth.generator.specs import generate

    library = golden_programs() if golden else []
    generated = generate(n_min=n_candidates) if n_candidates > 0 else []
    seen = {p.hash for p in library}
    return library + [p for p in generated if p.hash not in seen]


def ranking_subset(store: AttentionStore, split: str, heldout: str | None) -> AttentionStore:
    """The store restricted to the texts ranking reads: ``split`` and ``heldout`` when present."""
    splits = [split] + ([heldout] if heldout and heldout in store.splits else [])
    texts = sorted({s for name in splits for s in store.split_indices(name)})
    return store.subset(texts) if len(texts) < store.n_texts else store


def evaluate_pool(store: AttentionStore, programs: list[Program], progress: bool = True):
    """Outputs of ``programs`` on the store's texts, streamed: sandboxed programs run now (and
    are cached by corpus and tokenizer), generator programs when ranking reads their rows."""
    from attnprog.synth.runtime.evaluate import evaluate_programs

    return evaluate_programs(
        programs, store.sentences(), corpus_hash=store.meta.get("corpus_hash"),
        tokenizer_id=store.meta.get("tokenizer_id", ""), progress=progress, stream=True,
    )


def rank_table(store: AttentionStore, outputs, split: str = "selection",
               heldout: str | None = "heldout", **rank_kwargs):
    """Rank on ``split``; measure each best fit on ``heldout`` when the store has that split."""
    from attnprog.engine.rank import rank, rank_with_heldout

    if heldout and heldout in store.splits:
        return rank_with_heldout(store, outputs, split=split, heldout_split=heldout, **rank_kwargs)
    return rank(store, outputs, split=split, **rank_kwargs)


class _Ledger:
    """``stages.json`` in the run directory: the inputs each finished stage was made from."""

    def __init__(self, out: Path):
        self.path = out / "stages.json"
        self.keys = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def done(self, stage: str, key: str, *artefacts: Path) -> bool:
        return self.keys.get(stage) == key and all(a.is_file() for a in artefacts)

    def record(self, stage: str, key: str) -> None:
        self.keys[stage] = key
        self.path.write_text(json.dumps(self.keys, indent=2))


def run_pipeline(config: RunConfig, echo: Callable[[str], None] = print) -> dict:
    """Run every stage for ``config`` and return a summary (also saved as ``summary.json``)."""
    from attnprog.engine.head_costs import HeadCosts, head_costs, resolve_method
    from attnprog.engine.rank import IoUTable
    from attnprog.engine.sweep import (
        fractions_up_to,
        load_qa,
        orders_from_option,
        perplexity_sweep,
    )

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2))
    summary: dict = {"config": asdict(config)}
    ledger = _Ledger(out)

    with _stage(echo, "1/5 extract attention"):
        corpus = load_corpus(config.corpus, text_field=config.text_field)
        if config.limit:
            corpus = corpus.take(config.limit)
        model, tokenizer = load_model(config.model, device=config.device)
        store, reused = extract_or_load(
            model, tokenizer, corpus, out / "attention.safetensors",
            batch_size=config.batch_size, max_tokens=config.max_tokens,
        )
        echo(f"  {'reused' if reused else 'extracted'} {store.n_rows} heads "
             f"({store.n_layers} layers x {store.n_heads}) on {store.n_texts} texts, "
             f"{store.n_cells} causal cells; splits: "
             + ", ".join(f"{s} {store.splits.count(s)}" for s in sorted(set(store.splits))))
        missing = {"selection", "heldout"} - set(store.splits)
        if missing:
            raise CorpusError(f"the run needs texts in the selection and heldout splits; "
                              f"{store.n_texts} texts left none in {sorted(missing)}: use more texts")
        summary["store"] = {"heads": store.n_rows, "texts": store.n_texts, "cells": store.n_cells,
                            "model_id": store.meta["model_id"]}

    with _stage(echo, "2/5 program pool"):
        pool_path, pool_key = out / "pool.jsonl", f"candidates={config.n_candidates}"
        if ledger.done("pool", pool_key, pool_path):
            pool = load_pool(pool_path)
            echo(f"  reused {pool_path}: {len(pool)} programs")
        else:
            pool = build_pool(config.n_candidates)
            save_pool(pool, pool_path)
            ledger.record("pool", pool_key)
            echo(f"  wrote {pool_path}: {len(pool)} programs (golden library + generator)")
        summary["programs"] = len(pool)

    with _stage(echo, "3/5 evaluate programs"):
        store = ranking_subset(store, "selection", "heldout")  # the sweep uses held-out texts too
        outputs = evaluate_pool(store, pool)
        n_failed = int(outputs.failed.any(axis=1).sum())
        echo(f"  {outputs.n_programs} programs x {store.n_texts} selection and held-out texts; "
             f"{n_failed} programs failed on some text")

    with _stage(echo, "4/5 rank programs against every head"):
        table_path = out / "iou_table.safetensors"
        table_key = f"{store.meta['model_id']}|{store.meta['corpus_hash']}|{pool_key}"
        if ledger.done("rank", table_key, table_path):
            table = IoUTable.load(table_path)
            echo(f"  reused {table_path}")
        else:
            table = rank_table(store, outputs)
            table.save(table_path)
            ledger.record("rank", table_key)
        fits = sorted(table.best_fits(), key=lambda f: -f.reported_iou)
        heldout = torch.as_tensor(table.heldout_iou).float()
        echo(f"  best fit per head (chosen on selection, IoU on held-out): mean "
             f"{heldout.mean():.3f}, median {heldout.median():.3f}; top {config.top}:")
        for fit in fits[: config.top]:
            echo(f"    L{fit.layer:<2d} H{fit.head:<2d} IoU {fit.reported_iou:.3f}  {fit.family}")
        echo(f"  read a head's programs: attnprog show --table {table_path} LAYER.HEAD")
        summary["best_fit_iou"] = {"mean": float(heldout.mean()), "median": float(heldout.median())}

    with _stage(echo, "5/5 replace heads: perplexity and QA"):
        orders = orders_from_option(config.order)
        costs, costs_key = None, ""
        if "cost" in orders:  # each head's cost replaced alone, on selection texts only
            costs_path = out / "head_costs.json"
            method = resolve_method(config.cost_method, model)
            costs_key = f"{table_key}|split=selection|method={method}"
            if ledger.done("costs", costs_key, costs_path):
                costs = HeadCosts.load(costs_path)
                echo(f"  reused {costs_path}")
            else:
                costs = head_costs(model, store, table, split="selection", outputs=outputs,
                                   method=method, tokenizer=tokenizer,
                                   batch_size=config.batch_size,
                                   resume=out / "head_costs.partial.json")
                costs.save(costs_path)
                ledger.record("costs", costs_key)
            echo(f"  head costs ({costs.method}, {len(costs.texts)} selection texts): "
                 f"median {1000 * float(np.median(costs.costs)):.2f} mnats/token, cheapest "
                 f"{1000 * costs.costs.min():.2f}, dearest {1000 * costs.costs.max():.2f}")
        sweep_key = (f"{table_key}|fraction={config.fraction}|qa={config.qa}|"
                     f"order={config.order}|costs={costs_key}")
        if ledger.done("sweep", sweep_key, out / "sweep.txt", out / "sweep.json"):
            text = (out / "sweep.txt").read_text().rstrip()
            summary["sweep"] = json.loads((out / "sweep.json").read_text())
            echo(f"  reused {out / 'sweep.txt'}")
        else:
            result = perplexity_sweep(
                model, store, table, fractions=fractions_up_to(config.fraction), split="heldout",
                outputs=outputs, orders=orders, costs=costs,
                qa_items=load_qa(None) if config.qa else None, tokenizer=tokenizer,
                qa_source="built-in sample", batch_size=config.batch_size,
            )
            text = result.to_text()
            summary["sweep"] = result.to_json()
            (out / "sweep.txt").write_text(text + "\n")
            (out / "sweep.json").write_text(json.dumps(summary["sweep"], indent=2))
            ledger.record("sweep", sweep_key)
        echo(text)

    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    echo(f"run directory: {out} (config.json, attention.safetensors, pool.jsonl, "
         "iou_table.safetensors, head_costs.json, sweep.txt, sweep.json, stages.json, "
         "summary.json)")
    return summary
