"""The head-replacement sweep with its fractions as independent Ray tasks, one model each.

Each task loads its own replica of the model (one GPU per task on a GPU cluster) and runs
:func:`attnprog.engine.sweep.perplexity_sweep` for one fraction; the driver puts the rows
together in the order asked for. Heads, best fits and the random baseline's picks depend only
on the table and the seed, never on which fractions a call runs, so every row is the one the
single-process sweep computes (up to the float rounding of a different thread count).
A task whose worker is lost is run again by Ray. Every control, KL and interval of a row is
computed within its task; the replaceable-share search spans fractions, so pass
``share_limits=()`` (the run does): each task would otherwise repeat it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from attnprog.engine.store import AttentionStore
from attnprog.engine.sweep import STANDARD_FRACTIONS, SweepResult

from .cluster import connect, resources


def sweep_fraction(model_spec: str, device: str, store: AttentionStore, table, fractions: list,
                   options: dict) -> SweepResult:
    """One task's work: load the model here and run the sweep for ``fractions``."""
    from attnprog.engine.models import load_model
    from attnprog.engine.sweep import perplexity_sweep

    model, tokenizer = load_model(model_spec, device=device)
    return perplexity_sweep(model, store, table, fractions=fractions, tokenizer=tokenizer,
                            progress=False, **options)


def sweep_on_ray(
    model_spec: str,
    store: AttentionStore,
    table,
    *,
    address: str = "auto",
    fractions: Sequence[float] = STANDARD_FRACTIONS,
    device: str = "auto",
    cpus_per_task: int = 1,
    **options,
) -> SweepResult:
    """:func:`perplexity_sweep` with one Ray task per fraction; the same SweepResult.

    ``model_spec`` is what :func:`load_model` takes (each task loads its own replica);
    ``device`` "auto" gives each task a GPU when the cluster has them. ``options`` go to
    ``perplexity_sweep`` (split, outputs, qa_items, qa_source, seed, batch_size, impl).
    """
    ray = connect(address)
    if device == "auto":
        device = "cuda" if resources()["GPU"] >= 1 else "cpu"
    gpus = 1 if device.startswith("cuda") else 0
    task = ray.remote(sweep_fraction).options(num_cpus=cpus_per_task, num_gpus=gpus, max_retries=2)
    # the sweep reads texts and token ids from the store, never its attention: leave it here
    slim = dataclasses.replace(store, attn_packed=store.attn_packed[:, :0].cpu())
    store_ref, table_ref = ray.put(slim), ray.put(table)
    options_ref = ray.put(options)  # program outputs can be large: sent once, read by all
    fractions = list(fractions)
    replaced = [f for f in fractions if f > 0] or fractions[:1]
    # the unreplaced row (fraction 0) is the base run that every task does anyway
    with_base = [[0.0, f] if (i == 0 and f > 0 and 0.0 in fractions) else [f]
                 for i, f in enumerate(replaced)]
    refs = [task.remote(model_spec, "cuda" if gpus else device, store_ref, table_ref, part,
                        options_ref) for part in with_base]
    parts = ray.get(refs)
    rows = {row.fraction: row for part in parts for row in part.rows}
    first = parts[0]
    return dataclasses.replace(first, rows=[rows[f] for f in fractions])
