"""The stages of ``attnprog run``, in the order they run, as data.

Each ``Stage`` says what its result depends on (``key``), which run files hold it (``files``),
how to compute it (``run``) and how to read it back (``load``); ``after`` prints what it gives
either way. The pipeline loops over ``STAGES``; a stage reads and writes ``RunState``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from attnprog.engine.heads import head_label, parse_heads
from attnprog.engine.run import rundir
from attnprog.engine.run.config import RunConfig
from attnprog.errors import CorpusError


@dataclass
class RunState:
    """What the stages of one run hand each other."""

    config: RunConfig
    out: Path
    echo: Callable[[str], None]
    record: rundir.RunRecord
    device: str = "cpu"
    redo_extract: bool = False
    keys: dict[str, str] = field(default_factory=dict)  # each stage's key, for later stages'
    summary: dict = field(default_factory=dict)
    model: object = None
    tokenizer: object = None
    store: object = None  # AttentionStore; the selection and held-out texts from "evaluate" on
    full_store: object = None  # the store as extracted (every split), from "evaluate" to "heads"
    heads: list[int] = field(default_factory=list)  # head_index of the heads explained
    pool: list = field(default_factory=list)
    llm_programs: list = field(default_factory=list)
    fitted: list = field(default_factory=list)
    outputs: object = None
    table: object = None
    leak: object = None  # LeakCheck of the best fits and the fitted programs
    causal_table: object = None  # the table without leaky programs: what replacement uses
    library: object = None
    explained: dict = field(default_factory=dict)  # heads.json
    costs: object = None
    sweep_text: str = ""
    detail: dict = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.out / name

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline; ``key=None`` marks a stage that decides reuse itself."""

    name: str  # as stages.json, manifest.json and --force know it
    title: str
    run: Callable[[RunState], bool | None]  # True when it read its result back itself
    key: Callable[[RunState], str] | None = None
    files: tuple[str, ...] = ()
    load: Callable[[RunState], None] = lambda state: None
    after: Callable[[RunState], None] = lambda state: None
    wanted: Callable[[RunConfig], bool] = lambda config: True


def sweep_orders(config: RunConfig) -> tuple[str, ...]:
    from attnprog.engine.sweep import orders_from_option

    return ("iou",) if config.ray else orders_from_option(config.order)


# --- extract -------------------------------------------------------------------------------


def run_extract(state: RunState) -> bool:
    from attnprog.engine.corpus import load_corpus
    from attnprog.engine.extract import extract_or_load
    from attnprog.engine.models import attention_shape, load_model
    from attnprog.engine.replace import check_replaceable

    config = state.config
    corpus = load_corpus(config.corpus, text_field=config.text_field)
    corpus = corpus.take(config.limit) if config.limit else corpus
    state.model, state.tokenizer = load_model(config.model, device=state.device)
    check_replaceable(state.model)  # an architecture we cannot replace fails before any result
    state.heads = parse_heads(config.heads, *attention_shape(state.model)[:2])  # before extracting
    store, reused = extract_or_load(
        state.model, state.tokenizer, corpus, state.path(rundir.STORE),
        batch_size=config.batch_size, max_tokens=config.max_tokens, reuse=not state.redo_extract,
    )
    state.store, state.keys["extract"] = store, f"{store.meta['model_id']}|{store.meta['corpus_hash']}"
    state.record.describe_store(store, config.model, config.corpus)
    state.summary["store"] = {"heads": store.n_rows, "texts": store.n_texts,
                              "cells": store.n_cells, "model_id": store.meta["model_id"]}
    return reused


def after_extract(state: RunState) -> None:
    store = state.store
    state.echo(f"  {store.n_rows} heads ({store.n_layers} layers x {store.n_heads}) on "
               f"{store.n_texts} texts, {store.n_cells} causal cells; splits: "
               + ", ".join(f"{s} {store.splits.count(s)}" for s in sorted(set(store.splits))))
    missing = {"selection", "heldout"} - set(store.splits)
    if missing:
        raise CorpusError(f"the run needs texts in the selection and heldout splits; "
                          f"{store.n_texts} texts left none in {sorted(missing)}: use more texts")


def store_key(state: RunState) -> str:
    return state.keys["extract"]


# --- programs: the pool, the LLM's, the fitted ones -----------------------------------------


POOL_VERSION = 2  # bump when the generator's programs change; 2: causal same_word


def pool_key(state: RunState) -> str:
    return f"candidates={state.config.n_candidates}|pool=v{POOL_VERSION}"


def run_pool(state: RunState) -> None:
    from attnprog.engine.pool import build_pool
    from attnprog.synth.program import save_pool

    state.pool = build_pool(state.config.n_candidates)
    save_pool(state.pool, state.path(rundir.POOL))


def load_pool_file(state: RunState) -> None:
    from attnprog.synth.program import load_pool

    state.pool = load_pool(state.path(rundir.POOL))


def after_pool(state: RunState) -> None:
    state.echo(f"  {len(state.pool)} programs (golden library + generator)")
    state.summary["programs"] = len(state.pool)


def llm_key(state: RunState) -> str:
    """What the LLM stage's programs depend on (the API key is never part of it)."""
    c = state.config
    return (f"llm={c.llm_model}@{c.llm_base_url}|heads={c.llm_heads}|n={c.llm_n}"
            f"|rounds={c.llm_rounds}|cap={c.llm_max_tokens_total}")


def run_llm(state: RunState) -> None:
    from attnprog.engine.synthesis import llm_programs

    path = state.path(rundir.LLM_POOL)
    state.llm_programs = llm_programs(state.store, state.config, path, state.echo)


def load_llm(state: RunState) -> None:
    from attnprog.synth.program import load_pool

    path = state.path(rundir.LLM_POOL)
    state.llm_programs = load_pool(path) if path.stat().st_size else []


def after_llm(state: RunState) -> None:
    known = {p.hash for p in state.pool}
    state.pool = state.pool + [p for p in state.llm_programs if p.hash not in known]
    state.echo(f"  {len(state.llm_programs)} LLM programs")
    state.summary["programs"] = len(state.pool)


def fit_key(state: RunState) -> str:
    from attnprog.engine.fit import FIT_VERSION
    from attnprog.synth.features import tagger_id

    key = f"{store_key(state)}|fit=v{FIT_VERSION},terms={state.config.fit_terms}|tags={tagger_id()}"
    return key + (f"|heads={','.join(map(str, state.heads))}" if state.config.heads else "")


def run_fit(state: RunState) -> None:
    from attnprog.engine.fit import FitSettings, fitted_programs
    from attnprog.synth.program import save_pool

    store = state.store
    if "synthesis" not in store.splits:
        state.echo("  no texts in the synthesis split: nothing to fit on (use more texts)")
        state.fitted = []
        return
    start = time.perf_counter()
    settings = FitSettings(max_terms=state.config.fit_terms, device=state.device)
    rows = state.heads if state.config.heads else None  # --heads: fit only the heads explained
    state.fitted = fitted_programs(store, "synthesis", settings, rows=rows)
    save_pool(state.fitted, state.path(rundir.FITTED))
    scores = [p.provenance["split_iou"] for p in state.fitted]
    state.echo(f"  fitted {len(state.fitted)} heads on {store.splits.count('synthesis')} synthesis "
               f"texts in {time.perf_counter() - start:.0f} s (mean IoU there {np.mean(scores):.3f})")


def load_fit(state: RunState) -> None:
    from attnprog.synth.program import load_pool

    state.fitted = load_pool(state.path(rundir.FITTED))


def after_fit(state: RunState) -> None:
    state.pool = state.pool + state.fitted
    state.summary["fitted_programs"] = len(state.fitted)
    state.echo(f"  {len(state.fitted)} fitted programs")


# --- evaluate and rank ---------------------------------------------------------------------


def run_evaluate(state: RunState) -> None:
    from attnprog.engine.pool import evaluate_pool, ranking_subset

    state.full_store = state.store  # the "heads" stage reads the synthesis texts too
    state.store = ranking_subset(state.store, "selection", "heldout")  # the sweep reads held-out
    state.outputs = evaluate_pool(state.store, state.pool, ray=state.config.ray,
                                  tokenizer=state.tokenizer)
    n_failed = int(state.outputs.failed.any(axis=1).sum())
    state.echo(f"  {state.outputs.n_programs} programs x {state.store.n_texts} selection and "
               f"held-out texts; {n_failed} programs failed on some text")


def rank_key(state: RunState) -> str:
    from attnprog.synth.features import tagger_id

    meta = state.store.meta  # the ranked texts' store (selection and held-out), as keys always were
    key = f"{meta['model_id']}|{meta['corpus_hash']}|{state.keys['pool']}|tags={tagger_id()}"
    key += f"|{state.keys['llm']}" if "llm" in state.keys else ""
    key += f"|fit=v{state.keys['fit'].rsplit('|fit=v', 1)[1].split('|')[0]}" if state.fitted else ""
    if state.config.heads:
        key += f"|heads={','.join(map(str, state.heads))}"
    return key + f"|leak=v{LEAK_VERSION}"


def on_device(state: RunState, compute: Callable):
    """``compute(store)`` with the store on the run's GPU (where the kernels are), else here."""
    gpu = state.on_gpu and not state.config.ray
    try:
        return compute(state.store.to(state.device) if gpu else state.store)
    finally:
        state.store.to("cpu")


LEAK_VERSION = 2  # bump when the leak check changes what it measures; 2: prefixes keep token meaning


def run_rank(state: RunState) -> None:
    from attnprog.engine.leak import check_leaks
    from attnprog.engine.pool import rank_heads

    c = state.config
    # Ray's ranking actors take the cluster's GPUs under "auto"; --device cpu keeps them off
    where = {"device": state.device} if c.ray and c.device != "auto" else {}
    state.table = on_device(state, lambda store: rank_heads(store, state.outputs, state.heads,
                                                            ray=c.ray, **where))
    state.table.save(state.path(rundir.TABLE))
    state.leak = check_leaks(state.store, state.table, state.outputs, state.heads, state.fitted)
    state.leak.save(state.path(rundir.LEAK), state.store.n_heads)


def load_rank(state: RunState) -> None:
    from attnprog.engine.leak import LeakCheck
    from attnprog.engine.rank import IoUTable

    state.table = IoUTable.load(state.path(rundir.TABLE))
    state.leak = LeakCheck.load(state.path(rundir.LEAK))


def heldout_best_fits(state: RunState) -> torch.Tensor:
    return torch.as_tensor(state.table.heldout_iou).float()[state.heads]


def heldout_tokens(state: RunState) -> float:
    """Mean length of the held-out texts: soft IoU falls as texts grow longer, so every IoU
    figure is quoted with it."""
    return float(state.store.lengths[state.store.split_indices("heldout")].double().mean())


def after_rank(state: RunState) -> None:
    chosen, n_heads = set(state.heads), state.store.n_heads
    fits = [f for f in state.table.best_fits() if f.layer * n_heads + f.head in chosen]
    fits = sorted(fits, key=lambda f: -f.reported_iou)
    heldout = heldout_best_fits(state)
    median = float(np.median(heldout.numpy()))  # as summary.json's median (torch's takes the lower)
    state.echo(f"  best fit per head (chosen on selection, IoU on held-out texts of "
               f"{heldout_tokens(state):.0f} tokens on average): mean {heldout.mean():.3f}, "
               f"median {median:.3f}; top {state.config.top}:")
    for fit in fits[: state.config.top]:
        label = head_label(fit.layer * n_heads + fit.head, n_heads)
        state.echo(f"    {label:<7} IoU {fit.reported_iou:.3f}  {fit.family}: {fit.title}")
    state.echo(f"  read a head's programs: attnprog show --table {state.path(rundir.TABLE)} "
               "LAYER.HEAD")
    state.summary["best_fit_iou"] = {"mean": float(heldout.mean()), "median": median}
    echo_leaks(state)
    echo_by_length(state)


def echo_by_length(state: RunState) -> None:
    """Print and record the best causal fits' IoU on the first tokens of the held-out texts,
    the figure to set beside results on shorter texts (the paper's sentences)."""
    from attnprog.engine.protocol import best_fit_iou_by_length

    figures = best_fit_iou_by_length(state.store, state.outputs, state.causal_table.best()[1],
                                     state.heads)
    state.summary["best_fit_iou_by_length"] = figures
    state.echo(f"  on the first {' / '.join(figures)} tokens of each held-out text: "
               f"{' / '.join(f'{v:.3f}' for v in figures.values())} (IoU falls as texts grow "
               "longer; the paper's sentences have 12 to 20 words)")


def echo_leaks(state: RunState) -> None:
    """Print and record the leak check; replacement (costs, sweep) uses the causal table."""
    state.causal_table = state.leak.causal_table(state.table)
    figures = state.leak.figures([p.hash for p in state.fitted])
    state.summary["leak"] = figures
    state.echo(f"  leak check ({len(state.leak.texts)} held-out texts cut at 3 points, "
               f"{rundir.LEAK}): {figures['leaky']} of {figures['checked']} programs read later "
               f"tokens ({figures['leaky_fitted']} fitted); {figures['heads_swapped']} heads use "
               f"their best causal program in costs and sweep instead of a leaky best fit")
    if state.leak.unresolved:
        state.echo(f"  warning: {len(state.leak.unresolved)} heads have no causal program among "
                   "their best; costs and sweep use their leaky best fit")


# --- library -------------------------------------------------------------------------------


def library_key(state: RunState) -> str:
    c = state.config
    return f"{state.keys['rank']}|size={c.library_size}|gain={c.library_min_gain}|seed={c.seed}"


def run_library(state: RunState) -> None:
    from attnprog.engine.library import select_library

    c = state.config
    state.library = on_device(state, lambda store: select_library(
        store, state.outputs, state.table, state.heads, max_size=c.library_size,
        min_gain=c.library_min_gain, seed=c.seed))
    state.library.save(state.path(rundir.LIBRARY))


def load_library(state: RunState) -> None:
    from attnprog.engine.library import Library

    state.library = Library.load(state.path(rundir.LIBRARY))


def after_library(state: RunState) -> None:
    library = state.library
    programs = "1 program explains" if library.size == 1 else f"{library.size} programs explain"
    state.echo(f"  {programs} {len(state.heads)} heads with mean held-out "
               f"IoU {library.mean_iou:.3f} (best fits: {heldout_best_fits(state).mean():.3f}); "
               "baselines: " + ", ".join(f"{n} {iou:.3f}" for n, iou in library.baselines.items()))


# --- heads: types, programs by name, the shortest program that fits -------------------------

HEADS_VERSION = 3  # bump when heads.json changes; 2: cuts refitted on every synthesis text;
# 3: each cut from the next larger one, ranked again there


def heads_key(state: RunState) -> str:
    return f"{state.keys['rank']}|heads=v{HEADS_VERSION}|seed={state.config.seed}"


def run_heads(state: RunState) -> None:
    from attnprog.engine.head_entries import explain_heads

    start = time.perf_counter()
    state.explained = explain_heads(state.full_store, state.table, state.heads, state.fitted,
                                    model=state.model, tokenizer=state.tokenizer,
                                    seed=state.config.seed, device=state.device)
    state.path(rundir.HEADS).write_text(json.dumps(state.explained, indent=1))
    state.echo(f"  typed {len(state.heads)} heads and measured their programs term by term in "
               f"{time.perf_counter() - start:.0f} s")


def load_heads(state: RunState) -> None:
    state.explained = rundir.read_heads(state.out) or {}


def after_heads(state: RunState) -> None:
    from attnprog.engine.head_entries import heads_figures

    state.full_store = None  # the stages after this one read the ranked texts only
    figures = heads_figures(state.explained)
    state.summary.update(figures)
    state.echo("  head types: " + ", ".join(f"{t} {n}" for t, n in figures["head_types"].items()))
    if figures["median_terms_needed"] is not None:
        state.echo(f"  median terms needed (held-out IoU within 0.01 of the best count): "
                   f"{figures['median_terms_needed']:g}")
    clearest = clearest_heads(state.explained.get("heads", []), per_type=2)[: state.config.top]
    if clearest:  # none when every head is mixed or content
        state.echo("  the clearest heads of each type (score on the type's pattern, best program):")
    for entry in clearest:
        state.echo(f"    {entry['head']:<7} {entry['type']:<15} "
                   f"{entry['type_scores'][entry['type']]:.2f}  {entry['program']['name']}")


def clearest_heads(entries: list[dict], per_type: int) -> list[dict]:
    """The ``per_type`` heads of each pattern type (not "mixed" or "content") with the highest
    score on their type's pattern, the clearest type first."""
    by_type: dict[str, list[dict]] = {}
    for entry in sorted(entries, key=lambda e: -e["type_scores"].get(e["type"], 0.0)):
        if entry["type"] in entry["type_scores"] and len(by_type.setdefault(entry["type"], [])) < per_type:
            by_type[entry["type"]].append(entry)
    return sorted((e for group in by_type.values() for e in group),
                  key=lambda e: -by_type[e["type"]][0]["type_scores"][e["type"]])


# --- head costs and the replacement sweep --------------------------------------------------


def costs_key(state: RunState) -> str:
    from attnprog.engine.head_costs import resolve_method

    method = resolve_method(state.config.cost_method, state.model)
    return f"{state.keys['rank']}|split=selection|method={method}"


def run_costs(state: RunState) -> None:
    from attnprog.engine.head_costs import head_costs, resolve_method

    c = state.config
    state.costs = head_costs(state.model, state.store, state.causal_table, split="selection",
                             outputs=state.outputs, method=resolve_method(c.cost_method, state.model),
                             tokenizer=state.tokenizer, batch_size=c.batch_size,
                             resume=state.path(rundir.COSTS_PARTIAL),
                             heads=state.heads if c.heads else None)
    state.costs.save(state.path(rundir.COSTS))


def load_costs(state: RunState) -> None:
    from attnprog.engine.head_costs import HeadCosts

    state.costs = HeadCosts.load(state.path(rundir.COSTS))


def after_costs(state: RunState) -> None:
    costs = state.costs.costs[state.heads]  # the explained heads' (--heads: only those measured)
    state.echo(f"  head costs ({state.costs.method}, {len(state.costs.texts)} selection texts): "
               f"median {1000 * float(np.median(costs)):.2f} mnats/token, cheapest "
               f"{1000 * costs.min():.2f}, dearest {1000 * costs.max():.2f}")


# bump when the sweep's output changes; 2: zero and mean ablation, KL, intervals, 3 random
# seeds, the replaceable share and the paper's protocol
SWEEP_VERSION = 2


def sweep_key(state: RunState) -> str:
    c = state.config
    return (f"{state.keys['rank']}|fraction={c.fraction}|qa={c.qa}|seed={c.seed}"
            f"|order={','.join(sweep_orders(c))}|costs={state.keys.get('costs', '')}"
            f"|sweep=v{SWEEP_VERSION}")


def run_sweep(state: RunState) -> None:
    from attnprog.engine.qa import load_qa
    from attnprog.engine.sweep import fractions_up_to, perplexity_sweep

    c = state.config
    options = dict(fractions=fractions_up_to(c.fraction), split="heldout", outputs=state.outputs,
                   qa_items=load_qa(None) if c.qa else None, qa_source="built-in sample",
                   batch_size=c.batch_size, seed=c.seed, heads=state.heads if c.heads else None)
    if c.ray:  # one task per fraction, each with its own model replica
        from attnprog.engine.distributed.sweep import sweep_on_ray

        # each task sweeps some fractions: the replaceable-share search is not split up
        result = sweep_on_ray(c.model, state.store, state.causal_table, address=c.ray,
                              device=state.device, share_limits=(), **options)
    else:
        result = perplexity_sweep(state.model, state.store, state.causal_table,
                                  tokenizer=state.tokenizer,
                                  orders=sweep_orders(c), costs=state.costs, **options)
    data = result.to_json()
    state.summary["sweep"] = data["ppl_increase"]
    state.detail = rundir.sweep_detail(result)
    state.detail["figures"] = {key: data[key] for key in rundir.SWEEP_FIGURES}
    state.detail["figures"].update(_protocol(state))
    state.sweep_text = result.to_text() + "\n\n" + _protocol_text(state)
    state.path(rundir.SWEEP_TEXT).write_text(state.sweep_text + "\n")
    state.path(rundir.SWEEP).write_text(json.dumps(state.summary["sweep"], indent=2))
    state.path(rundir.SWEEP_DETAIL).write_text(json.dumps(state.detail, indent=2))


def _protocol(state: RunState) -> dict:
    """The paper's protocol and our held-out figure's interval, on the explained heads."""
    from attnprog.engine.protocol import protocol_figures

    best_index = torch.as_tensor(state.table.best()[1])
    return protocol_figures(state.store, state.outputs, best_index, state.heads,
                            seed=state.config.seed)


def _protocol_text(state: RunState) -> str:
    figures = state.detail["figures"]
    paper, (low, high) = figures["paper_protocol_iou"], figures["mean_best_fit_iou_ci"]
    how = figures.get("paper_protocol", {})
    ours = (f"mean best-fit IoU, ours (chosen on selection, reported on held-out texts of "
            f"{heldout_tokens(state):.0f} tokens on average): "
            f"{heldout_best_fits(state).mean():.3f} [95 % interval over texts {low:.3f}, "
            f"{high:.3f}]")
    if paper is None:
        return ours + "\nthe paper's protocol: too few held-out texts for a draw"
    return (ours + f"\nthe paper's protocol (chosen and reported on the same "
            f"{how['texts_per_draw']} held-out texts, {how['draws']} draws): mean "
            f"{paper['mean']:.3f}, min {paper['min']:.3f}, max {paper['max']:.3f}")


def load_sweep(state: RunState) -> None:
    state.sweep_text = state.path(rundir.SWEEP_TEXT).read_text().rstrip()
    state.summary["sweep"] = json.loads(state.path(rundir.SWEEP).read_text())
    state.detail = json.loads(state.path(rundir.SWEEP_DETAIL).read_text())


def after_sweep(state: RunState) -> None:
    """Print the sweep, then write ``summary.json``: every figure is known now."""
    state.echo(state.sweep_text)
    state.summary.update(rundir.headline(heldout_best_fits(state).tolist(), state.library,
                                         state.summary["sweep"], state.detail))
    state.summary["tokens_per_text"] = heldout_tokens(state)
    state.path(rundir.SUMMARY).write_text(json.dumps(state.summary, indent=2))


# --- the report ----------------------------------------------------------------------------

REPORT_VERSION = 7  # bump when the page changes; 2: heads written L18.H3; 3: types and names;
# 4: the attention viewer, searchable grid, heads at a glance, replacement charts drawn in the page;
# 5: the paper column holds the corrected figures and the replaceable shares; 6: the length of
# the held-out texts and of the paper's; 7: the best fits on the first tokens of each text


def run_report(state: RunState) -> None:
    from attnprog.engine.run.report import write_report

    write_report(state.out, store=state.store)


def after_report(state: RunState) -> None:
    state.echo(f"  open {state.path(rundir.REPORT)} in a browser; `attnprog report {state.out}` "
               "rebuilds it")


STAGES = (
    Stage("extract", "extract attention", run_extract, files=(rundir.STORE,), after=after_extract),
    Stage("pool", "program pool", run_pool, key=pool_key,
          files=(rundir.POOL,), load=load_pool_file, after=after_pool),
    Stage("llm", "ask an LLM for programs", run_llm, key=llm_key, files=(rundir.LLM_POOL,),
          load=load_llm, after=after_llm, wanted=lambda c: bool(c.llm_model)),
    Stage("fit", "fit a program to every head", run_fit, key=fit_key, files=(rundir.FITTED,),
          load=load_fit, after=after_fit, wanted=lambda c: c.fit),
    Stage("evaluate", "evaluate programs", run_evaluate),
    Stage("rank", "rank programs against every head, check leaks", run_rank, key=rank_key,
          files=(rundir.TABLE, rundir.LEAK), load=load_rank, after=after_rank),
    Stage("library", "select a library (greedy coverage)", run_library, key=library_key,
          files=(rundir.LIBRARY,), load=load_library, after=after_library),
    Stage("heads", "type every head, name its program, find the shortest fit", run_heads,
          key=heads_key, files=(rundir.HEADS,), load=load_heads, after=after_heads),
    Stage("costs", "measure each head's cost replaced alone", run_costs, key=costs_key,
          files=(rundir.COSTS,), load=load_costs, after=after_costs,
          wanted=lambda c: "cost" in sweep_orders(c)),
    Stage("sweep", "replace heads: perplexity, KL and QA, with controls", run_sweep, key=sweep_key,
          files=(rundir.SWEEP_TEXT, rundir.SWEEP, rundir.SWEEP_DETAIL), load=load_sweep,
          after=after_sweep),
    Stage("report", "write the report", run_report,
          key=lambda s: (f"{s.keys['library']}|{s.keys['sweep']}|{s.keys['heads']}"
                         f"|report=v{REPORT_VERSION}"),
          files=(rundir.REPORT,),
          after=after_report, wanted=lambda c: c.report),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
