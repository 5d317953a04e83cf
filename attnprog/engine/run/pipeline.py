"""``attnprog run``: a loop over the stages, each read back from the run directory when its
inputs did not change, so an interrupted run continues where it stopped."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from attnprog.engine.models import resolve_device
from attnprog.engine.run import rundir
from attnprog.engine.run.config import RunConfig
from attnprog.engine.run.stages import STAGE_NAMES, STAGES, RunState, Stage


def run_pipeline(config: RunConfig, echo: Callable[[str], None] = print,
                 force: str | None = None) -> dict:
    """Run every stage ``config`` asks for; return the summary (also ``summary.json``).

    ``force`` names a stage (see ``STAGE_NAMES``) to redo, with every stage after it.
    """
    out = Path(config.out)
    config.check()  # a bad option is refused before the directory is made
    rundir.check_run_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    ledger = rundir.Ledger(out, STAGE_NAMES)
    if force:
        ledger.forget_from(force)
    (out / rundir.CONFIG).write_text(json.dumps(asdict(config), indent=2))
    state = RunState(config, out, echo, rundir.RunRecord(out, config),
                     device=resolve_device(config.device), redo_extract=force == "extract")
    state.summary["config"] = asdict(config)
    echo(f"device: {describe_device(state.device)}")
    if config.ray:
        from attnprog.engine.distributed.cluster import connect, describe

        connect(config.ray)
        echo(describe())
    chosen = [stage for stage in STAGES if stage.wanted(config)]
    for number, stage in enumerate(chosen, 1):
        start = time.perf_counter()
        echo(f"[{number}/{len(chosen)} {stage.title}]")
        with state.record.stage(stage.name) as entry:
            entry["state"] = run_stage(stage, state, ledger)
        echo(f"  done in {time.perf_counter() - start:.1f} s")
    written = [name for name in rundir.RUN_FILES if (out / name).is_file()]
    echo(f"run directory: {out} ({', '.join(written)})")
    return state.summary


def run_stage(stage: Stage, state: RunState, ledger: rundir.Ledger) -> str:
    """Read ``stage`` back when its key and files are unchanged, else run it and record its
    key; returns the manifest state, "reused" or "done"."""
    if stage.key is None:  # the stage decides itself (extraction checks the store it finds)
        reused = bool(stage.run(state))
        if reused:
            state.echo(f"  reused {', '.join(str(state.path(name)) for name in stage.files)}")
        if stage.name in state.keys:
            ledger.record(stage.name, state.keys[stage.name])
    else:
        key = state.keys[stage.name] = stage.key(state)
        files = [state.path(name) for name in stage.files]
        reused = ledger.done(stage.name, key, files)
        if reused:
            stage.load(state)
            state.echo(f"  reused {', '.join(map(str, files))}")
        else:
            why = ledger.why(stage.name, key, files)
            if why:
                state.echo(f"  {why}")
            stage.run(state)
            ledger.record(stage.name, key)
    stage.after(state)
    return "reused" if reused else "done"


def describe_device(device: str) -> str:
    """The device a run uses, with the GPU's name, and how to choose another."""
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))}); --device cpu to stay off it"
    return f"{device} (no CUDA GPU found)" if not torch.cuda.is_available() else device
