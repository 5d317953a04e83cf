"""The heads a surrogate replaces, read from a run directory as the sweep would pick them.

At a fraction and order ("cost": cheapest first by ``head_costs.json``; "iou": best fit
first), the first heads of that order, each with its best causal program: the causal table
of ``leak.json`` when the run has one, else each chosen program's leak is measured now and a
leaky one gives way to the head's next best program that does not leak.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from attnprog.engine.run import rundir
from attnprog.errors import AttnProgError, ProgramError, StoreError

ORDERS = ("cost", "iou")


@dataclass
class RunHeads:
    """What a surrogate needs from a run: the model and {(layer, head): Program}, in order."""

    model: str
    heads: dict
    order: str
    fraction: float
    n_candidates: int  # heads the fraction is a share of
    n_heads: int  # per layer
    max_tokens: int
    leak: str  # how the programs were checked for leaks
    swaps: dict = field(default_factory=dict)  # head label -> (leaky program, causal program)


def run_config(run_dir: Path):
    """The run's RunConfig (``config.json``), or StoreError when ``run_dir`` is no run."""
    from attnprog.engine.run.config import RunConfig

    path = Path(run_dir) / rundir.CONFIG
    if not path.is_file():
        raise StoreError(f"{run_dir} is not a run directory (no {rundir.CONFIG}): give a "
                         "directory written by `attnprog run`")
    known = {f.name for f in fields(RunConfig)}
    return RunConfig(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})


def check_run(run_dir: Path, fraction: float, order: str):
    """The run's RunConfig once ``run_dir`` can give the heads asked for: called before the
    model loads, so a wrong order or an unfinished run is refused in a second, not after it."""
    config = run_config(run_dir)
    if order not in ORDERS:
        raise AttnProgError(f"unknown head order {order!r}: use cost or iou")
    if not 0.0 <= fraction <= 1.0:
        raise AttnProgError(f"fraction must be between 0 and 1, got {fraction}")
    if not (run_dir / rundir.TABLE).is_file():
        raise StoreError(f"{run_dir} has no {rundir.TABLE}: finish the run first "
                         f"(attnprog run --out {run_dir})")
    if order == "cost" and not (run_dir / rundir.COSTS).is_file():
        raise StoreError(f"{run_dir} has no {rundir.COSTS} (the run swept the iou order only): "
                         "use order 'iou', or rerun with --order cost or both")
    return config


def run_heads(run_dir: Path, fraction: float, order: str, tokenizer) -> RunHeads:
    """The heads and programs a sweep of ``run_dir`` replaces at ``fraction`` in ``order``;
    ``tokenizer`` (the run's model's) tokenises texts for a leak check the run lacks."""
    from attnprog.engine.heads import parse_heads
    from attnprog.engine.rank import IoUTable
    from attnprog.engine.replace import best_fit

    run_dir = Path(run_dir)
    config = check_run(run_dir, fraction, order)
    table = IoUTable.load(run_dir / rundir.TABLE)
    leak = _load_leak(run_dir)
    if leak is not None:
        table = leak.causal_table(table)
    best_iou, best_index = best_fit(table)
    head_order = _head_order(run_dir, order, best_iou)
    if config.heads:
        chosen = parse_heads(config.heads, table.n_layers, table.n_heads)
        head_order = head_order[np.isin(head_order, chosen)]
    count = int(round(fraction * len(head_order)))
    chosen = [int(h) for h in head_order[:count]]
    result = RunHeads(config.model, {}, order, fraction, len(head_order), table.n_heads,
                      config.max_tokens, f"{rundir.LEAK} of the run")
    if leak is None:
        best_index = _check_now(run_dir, table, chosen, best_index, tokenizer, result)
    else:
        _refuse_unresolved(leak, chosen, table.n_heads)
    result.heads = {divmod(h, table.n_heads): table.programs[int(best_index[h])] for h in chosen}
    return result


def _load_leak(run_dir: Path):
    from attnprog.engine.leak import LeakCheck

    path = run_dir / rundir.LEAK
    return LeakCheck.load(path) if path.is_file() else None


def _head_order(run_dir: Path, order: str, best_iou: np.ndarray) -> np.ndarray:
    """Head indices in replacement order, as the sweep orders them."""
    if order == "iou":
        return np.argsort(-best_iou, kind="stable")  # best fit first
    from attnprog.engine.head_costs import HeadCosts

    path = run_dir / rundir.COSTS
    if not path.is_file():
        raise StoreError(f"{run_dir} has no {rundir.COSTS} (the run swept the iou order only): "
                         "use order 'iou', or rerun with --order cost or both")
    costs = HeadCosts.load(path)
    if len(costs.costs) != len(best_iou):
        raise StoreError(f"{rundir.COSTS} has {len(costs.costs)} heads, the IoU table "
                         f"{len(best_iou)}: rerun the costs stage (attnprog run --force costs)")
    return costs.order()  # cheapest first


def _refuse_unresolved(leak, chosen: list[int], n_heads: int) -> None:
    from attnprog.engine.heads import head_label

    left = [head_label(h, n_heads) for h in chosen if h in set(leak.unresolved)]
    if left:
        raise ProgramError(f"heads {', '.join(left)} have no causal program in the run (their "
                           "programs read later tokens): use a smaller fraction, or give "
                           "Surrogate a mapping without them")


def _check_now(run_dir: Path, table, chosen: list[int], best_index, tokenizer,
               result: RunHeads) -> np.ndarray:
    """Best program indices once the chosen heads' leaky programs are out (a run without
    ``leak.json``): leaks measured on a few of the run's held-out texts, as the rank stage
    would; ProgramError when a head has no causal program among its best."""
    from attnprog.engine.heads import head_label
    from attnprog.engine.leak import MAX_ROUNDS
    from attnprog.engine.program_rows import outputs_by_path
    from attnprog.synth.runtime.leak import is_leaky, program_leaks

    sentences = _leak_sentences(run_dir, tokenizer, result.max_tokens)
    leaks: dict[str, float] = {}
    iou, best = table.iou.clone(), np.array(best_index, copy=True)
    leaky: list[int] = []
    for _ in range(MAX_ROUNDS):
        todo = list({p.hash: p for p in (table.programs[int(best[h])] for h in chosen)
                     if p.hash not in leaks}.values())
        if todo:
            leaks.update(zip([p.hash for p in todo],
                             program_leaks(todo, sentences, outputs_by_path).tolist(),
                             strict=True))
        leaky = [h for h in chosen if is_leaky(leaks[table.programs[int(best[h])].hash])]
        if not leaky:
            break
        iou[[int(best[h]) for h in leaky], :] = -1.0  # never a best fit again
        best[chosen] = iou[:, chosen].max(dim=0).indices.numpy()
    if leaky:
        raise ProgramError(f"heads {', '.join(head_label(h, table.n_heads) for h in leaky)} have "
                           "no causal program among their best: use a smaller fraction")
    n_leaky = sum(map(is_leaky, leaks.values()))
    result.leak = (f"measured now ({rundir.LEAK} missing): {n_leaky} of {len(leaks)} programs "
                   f"checked on {len(sentences)} held-out texts read later tokens")
    result.swaps = {head_label(h, table.n_heads): (table.programs[int(best_index[h])].hash,
                                                   table.programs[int(best[h])].hash)
                    for h in chosen if int(best[h]) != int(best_index[h])}
    return best


def _leak_sentences(run_dir: Path, tokenizer, max_tokens: int) -> list:
    """A few held-out texts of the run's store (its metadata only), tokenised by ``tokenizer``;
    the built-in probe texts when the store is gone."""
    from safetensors import safe_open

    from attnprog.engine.leak import LEAK_TEXTS
    from attnprog.synth.features import probe_sentences, sentences_from_texts

    path = run_dir / rundir.STORE
    texts = [s.text for s in probe_sentences()]
    if path.is_file():
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
        stored, splits = json.loads(metadata.get("texts", "[]")), json.loads(metadata.get("splits", "[]"))
        texts = [t for t, s in zip(stored, splits, strict=False) if s == "heldout"] or texts
    return sentences_from_texts(texts[:LEAK_TEXTS], tokenizer, max_length=max_tokens or None)
