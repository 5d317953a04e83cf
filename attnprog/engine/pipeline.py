"""The whole job in one call: extract, generate, evaluate, rank, select a library, replace heads,
write the report. Each stage is resumable.

Every stage writes its result into the run directory and is skipped when a re-run finds it
there for the same inputs, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from attnprog.engine.corpus import load_corpus
from attnprog.engine.extract import extract_or_load
from attnprog.engine.models import load_model
from attnprog.engine.rundir import RunRecord, check_run_dir, headline, sweep_detail
from attnprog.engine.store import AttentionStore
from attnprog.errors import AttnProgError, CorpusError
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
    cost_method: str = "auto"  # head costs: "exact" (a pass per head), "fisher", "taylor", "linear"
    batch_size: int = 8
    device: str = "cpu"
    top: int = 12  # best fits printed
    fit: bool = True  # fit one program per head on the synthesis split and add it to the pool
    fit_terms: int = 12  # features per fitted program (its sink share is one more setting)
    ray: str = ""  # Ray cluster address or "auto" ("": this machine only, Ray not imported)
    seed: int = 0  # random baselines (random program, random token)
    heads: str = ""  # heads to explain, e.g. "18.*,20.3" (empty: all)
    library_size: int = 1000  # most programs in the greedy library
    library_min_gain: float = 1e-4  # stop adding programs below this gain in mean IoU
    report: bool = True  # write report.html at the end
    # optional LLM stage (off unless llm_model is set); the API key comes from $OPENAI_API_KEY
    llm_base_url: str = ""
    llm_model: str = ""
    llm_heads: str = "all"
    llm_n: int = 4
    llm_rounds: int = 1
    llm_max_tokens_total: int = 0


# Stage names in pipeline order, as stages.json and manifest.json know them; `--force NAME`
# redoes NAME and every stage after it. A new stage adds its name here.
STAGES = ("extract", "pool", "llm", "fit", "evaluate", "rank", "library", "sweep", "report")
_RECORD: ContextVar[RunRecord | None] = ContextVar("attnprog_run_record", default=None)


@contextmanager
def _stage(echo: Callable[[str], None], name: str, key: str | None = None):
    """Print a stage's name, then its wall time when it finishes; the run's manifest records
    it under ``key`` (default: the name without its "n/m" number). Yields the manifest entry:
    set ``entry["state"] = "reused"`` when the stage read its result back."""
    start = time.perf_counter()
    echo(f"[{name}]")
    record = _RECORD.get()
    key = key or name.split(" ", 1)[-1]
    if record is None:
        yield {}
    else:
        with record.stage(key) as entry:
            yield entry
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


def evaluate_pool(store: AttentionStore, programs: list[Program], progress: bool = True,
                  ray: str = "", tokenizer=None):
    """Outputs of ``programs`` on the store's texts, streamed: sandboxed programs run now (and
    are cached by corpus and tokenizer), generator programs when ranking reads their rows.
    ``ray``: a cluster address (or "auto") to run the sandboxed programs as Ray tasks;
    ``tokenizer``: the model's, handed to paper-form programs."""
    from attnprog.synth.runtime.evaluate import evaluate_programs

    evaluate = evaluate_programs
    if ray:
        from functools import partial

        from attnprog.engine.distributed.evaluate import evaluate_on_ray

        evaluate = partial(evaluate_on_ray, address=ray)
    return evaluate(
        programs, store.sentences(), corpus_hash=store.meta.get("corpus_hash"),
        tokenizer_id=store.meta.get("tokenizer_id", ""), progress=progress, stream=True,
        tokenizer=tokenizer,
    )


def rank_table(store: AttentionStore, outputs, split: str = "selection",
               heldout: str | None = "heldout", ray: str = "", **rank_kwargs):
    """Rank on ``split``; measure each best fit on ``heldout`` when the store has that split.
    ``ray``: a cluster address (or "auto") to shard the heads over Ray actors."""
    from attnprog.engine.rank import rank, rank_with_heldout

    if ray:
        from attnprog.engine.distributed.rank import rank_on_ray

        held = heldout if heldout and heldout in store.splits else None
        return rank_on_ray(store, outputs, split=split, heldout_split=held, address=ray,
                           **rank_kwargs)
    if heldout and heldout in store.splits:
        return rank_with_heldout(store, outputs, split=split, heldout_split=heldout, **rank_kwargs)
    return rank(store, outputs, split=split, **rank_kwargs)


def llm_stage_key(config: RunConfig) -> str:
    """What the LLM stage's programs depend on (the key is never part of it)."""
    return (f"llm={config.llm_model}@{config.llm_base_url}|heads={config.llm_heads}|n={config.llm_n}"
            f"|rounds={config.llm_rounds}|cap={config.llm_max_tokens_total}")


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

    def forget_from(self, stage: str) -> None:
        """Drop ``stage`` and every stage after it, so the next run redoes them."""
        known = list(STAGES) + [k for k in self.keys if k not in STAGES]
        if stage not in known:
            raise AttnProgError(f"--force {stage!r}: no such stage; use one of {', '.join(known)}")
        for name in known[known.index(stage):]:
            self.keys.pop(name, None)
        self.path.write_text(json.dumps(self.keys, indent=2))


def run_pipeline(config: RunConfig, echo: Callable[[str], None] = print, force: str | None = None) -> dict:
    """Run every stage for ``config`` and return a summary (also saved as ``summary.json``).

    ``force`` names a stage (see ``STAGES``) to redo, with every stage after it.
    """
    out = Path(config.out)
    check_run_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    ledger = _Ledger(out)
    if force:
        ledger.forget_from(force)
    record = RunRecord(out, config)
    token = _RECORD.set(record)
    try:
        return _run_stages(config, echo, out, ledger, record, redo_extract=force == "extract")
    finally:
        _RECORD.reset(token)


def _run_stages(config: RunConfig, echo, out: Path, ledger: _Ledger, record: RunRecord,
                redo_extract: bool = False) -> dict:
    from attnprog.engine.head_costs import HeadCosts, head_costs, resolve_method
    from attnprog.engine.heads import parse_heads
    from attnprog.engine.library import Library, select_library
    from attnprog.engine.rank import IoUTable
    from attnprog.engine.sweep import (
        fractions_up_to,
        load_qa,
        orders_from_option,
        perplexity_sweep,
    )

    (out / "config.json").write_text(json.dumps(asdict(config), indent=2))
    summary: dict = {"config": asdict(config)}

    if config.ray:
        from attnprog.engine.distributed.cluster import connect, describe

        connect(config.ray)
        echo(describe())

    with _stage(echo, "1/7 extract attention", "extract") as stage:
        corpus = load_corpus(config.corpus, text_field=config.text_field)
        if config.limit:
            corpus = corpus.take(config.limit)
        model, tokenizer = load_model(config.model, device=config.device)
        store, reused = extract_or_load(
            model, tokenizer, corpus, out / "attention.safetensors",
            batch_size=config.batch_size, max_tokens=config.max_tokens, reuse=not redo_extract,
        )
        stage["state"] = "reused" if reused else "done"
        ledger.record("extract", f"{store.meta['model_id']}|{store.meta['corpus_hash']}")
        record.describe_store(store, config.model, config.corpus)
        heads = parse_heads(config.heads, store.n_layers, store.n_heads)
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

    with _stage(echo, "2/7 program pool", "pool") as stage:
        pool_path, pool_key = out / "pool.jsonl", f"candidates={config.n_candidates}"
        if ledger.done("pool", pool_key, pool_path):
            pool = load_pool(pool_path)
            stage["state"] = "reused"
            echo(f"  reused {pool_path}: {len(pool)} programs")
        else:
            pool = build_pool(config.n_candidates)
            save_pool(pool, pool_path)
            ledger.record("pool", pool_key)
            echo(f"  wrote {pool_path}: {len(pool)} programs (golden library + generator)")
        if config.llm_model:
            from attnprog.engine.synthesis import llm_stage

            llm_path, llm_key = out / "llm_pool.jsonl", llm_stage_key(config)
            llm_programs = llm_stage(store, config, llm_path, echo,
                                     reuse=ledger.done("llm", llm_key, llm_path))
            ledger.record("llm", llm_key)
            known = {p.hash for p in pool}
            pool = pool + [p for p in llm_programs if p.hash not in known]
            pool_key += f"|{llm_key}"
        summary["programs"] = len(pool)

    fit_key = ""
    if config.fit:
        with _stage(echo, "2b/7 fit a program to every head", "fit") as stage:
            from attnprog.engine.fit import fit_stage

            fitted, fit_key, reused = fit_stage(store, config, ledger, out, echo)
            if reused:
                stage["state"] = "reused"
            pool = pool + fitted
            summary["fitted_programs"] = len(fitted)

    with _stage(echo, "3/7 evaluate programs", "evaluate"):
        store = ranking_subset(store, "selection", "heldout")  # the sweep uses held-out texts too
        outputs = evaluate_pool(store, pool, ray=config.ray, tokenizer=tokenizer)
        n_failed = int(outputs.failed.any(axis=1).sum())
        echo(f"  {outputs.n_programs} programs x {store.n_texts} selection and held-out texts; "
             f"{n_failed} programs failed on some text")

    with _stage(echo, "4/7 rank programs against every head", "rank") as stage:
        table_path = out / "iou_table.safetensors"
        table_key = f"{store.meta['model_id']}|{store.meta['corpus_hash']}|{pool_key}{fit_key}"
        if config.heads:
            table_key += f"|heads={','.join(map(str, heads))}"
        if ledger.done("rank", table_key, table_path):
            table = IoUTable.load(table_path)
            stage["state"] = "reused"
            echo(f"  reused {table_path}")
        else:
            on_gpu = str(config.device).startswith("cuda") and not config.ray
            try:  # rank where the kernels are: on a GPU, the attention goes there for this stage
                table = rank_heads(store.to(config.device) if on_gpu else store, outputs, heads,
                                   ray=config.ray)
            finally:
                store.to("cpu")
            table.save(table_path)
            ledger.record("rank", table_key)
        fits = [f for f in table.best_fits() if f.layer * store.n_heads + f.head in set(heads)]
        fits = sorted(fits, key=lambda f: -f.reported_iou)
        heldout = torch.as_tensor(table.heldout_iou).float()[heads]
        echo(f"  best fit per head (chosen on selection, IoU on held-out): mean "
             f"{heldout.mean():.3f}, median {heldout.median():.3f}; top {config.top}:")
        for fit in fits[: config.top]:
            echo(f"    L{fit.layer:<2d} H{fit.head:<2d} IoU {fit.reported_iou:.3f}  {fit.family}")
        echo(f"  read a head's programs: attnprog show --table {table_path} LAYER.HEAD")
        summary["best_fit_iou"] = {"mean": float(heldout.mean()), "median": float(heldout.median())}

    with _stage(echo, "5/7 select a library (greedy coverage)", "library") as stage:
        library_path = out / "library.json"
        library_key = (f"{table_key}|size={config.library_size}|gain={config.library_min_gain}"
                       f"|seed={config.seed}")
        if ledger.done("library", library_key, library_path):
            library = Library.load(library_path)
            stage["state"] = "reused"
            echo(f"  reused {library_path}")
        else:
            on_gpu = str(config.device).startswith("cuda")
            try:  # the held-out scoring ranks too: on a GPU, where the kernels are
                library = select_library(store.to(config.device) if on_gpu else store, outputs, table,
                                         heads, max_size=config.library_size,
                                         min_gain=config.library_min_gain, seed=config.seed)
            finally:
                store.to("cpu")
            library.save(library_path)
            ledger.record("library", library_key)
        echo(f"  {library.size} programs explain {len(heads)} heads with mean held-out IoU "
             f"{library.mean_iou:.3f} (best fits: {heldout.mean():.3f}); baselines: "
             + ", ".join(f"{name} {iou:.3f}" for name, iou in library.baselines.items()))

    with _stage(echo, "6/7 replace heads: perplexity and QA", "sweep") as stage:
        orders = ("iou",) if config.ray else orders_from_option(config.order)
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
        sweep_key = (f"{table_key}|fraction={config.fraction}|qa={config.qa}|seed={config.seed}"
                     f"|order={','.join(orders)}|costs={costs_key}")
        if ledger.done("sweep", sweep_key, out / "sweep.txt", out / "sweep.json", out / "sweep_detail.json"):
            text = (out / "sweep.txt").read_text().rstrip()
            summary["sweep"] = json.loads((out / "sweep.json").read_text())
            detail = json.loads((out / "sweep_detail.json").read_text())
            stage["state"] = "reused"
            echo(f"  reused {out / 'sweep.txt'}")
        else:
            sweep_kwargs = dict(
                fractions=fractions_up_to(config.fraction), split="heldout", outputs=outputs,
                qa_items=load_qa(None) if config.qa else None, qa_source="built-in sample",
                batch_size=config.batch_size, seed=config.seed,
                heads=heads if config.heads else None,
            )
            if config.ray:  # one task per fraction, each with its own model replica
                from attnprog.engine.distributed.sweep import sweep_on_ray

                result = sweep_on_ray(config.model, store, table, address=config.ray,
                                      device=config.device, **sweep_kwargs)
            else:
                result = perplexity_sweep(model, store, table, tokenizer=tokenizer, orders=orders,
                                          costs=costs, **sweep_kwargs)
            text = result.to_text()
            full = result.to_json() if hasattr(result, "to_json") else None
            summary["sweep"] = full["ppl_increase"] if full else {
                "iou": {f"{row.fraction:g}": {c: result.increase(row, c) for c in row.perplexity}
                        for row in result.rows}}
            detail = sweep_detail(result)
            (out / "sweep.txt").write_text(text + "\n")
            # {order: {fraction: {condition: % increase}}}; the rest is in sweep_detail.json
            (out / "sweep.json").write_text(json.dumps(summary["sweep"], indent=2))
            (out / "sweep_detail.json").write_text(json.dumps(detail, indent=2))
            ledger.record("sweep", sweep_key)
        echo(text)

    summary.update(headline(heldout.tolist(), library, summary["sweep"], detail))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    if config.report:
        with _stage(echo, "7/7 write the report", "report") as stage:
            from attnprog.engine.report import write_report

            report_path = out / "report.html"
            report_key = f"{library_key}|{sweep_key}"
            if ledger.done("report", report_key, report_path):
                stage["state"] = "reused"
                echo(f"  reused {report_path}")
            else:
                write_report(out, store=store)
                ledger.record("report", report_key)
            echo(f"  open {report_path} in a browser; `attnprog report {out}` rebuilds it")

    echo(f"run directory: {out} (manifest.json, summary.json, report.html, config.json, "
         "attention.safetensors, pool.jsonl, iou_table.safetensors, library.json, sweep.txt, "
         "sweep.json, sweep_detail.json, stages.json)")
    return summary


def rank_heads(store: AttentionStore, outputs, heads: list[int], **rank_kwargs):
    """``rank_table`` for the heads in ``heads`` only (rows); the table keeps every column,
    with IoU 0 for heads not ranked, and names the ranked ones in ``meta["heads"]``."""
    from attnprog.engine.rank import IoUTable

    if len(heads) == store.n_rows:
        return rank_table(store, outputs, **rank_kwargs)
    rows = torch.as_tensor(heads, dtype=torch.long)
    narrow = AttentionStore(
        attn_packed=store.attn_packed[rows.to(store.device)], offsets=store.offsets,
        lengths=store.lengths, ids_packed=store.ids_packed, texts=store.texts, tokens=store.tokens,
        spans=store.spans, splits=store.splits, meta=dict(store.meta, n_layers=1, n_heads=len(heads)),
    )
    part = rank_table(narrow, outputs, **rank_kwargs)
    iou = torch.zeros(part.n_programs, store.n_rows)
    iou[:, rows] = part.iou
    heldout = None
    if part.heldout_iou is not None:
        heldout = torch.zeros(store.n_rows)
        heldout[rows] = part.heldout_iou
    return IoUTable(iou=iou, programs=part.programs, split=part.split, n_layers=store.n_layers,
                    n_heads=store.n_heads, text_indices=part.text_indices,
                    heldout_split=part.heldout_split, heldout_iou=heldout,
                    meta=dict(part.meta, heads=list(heads)))
