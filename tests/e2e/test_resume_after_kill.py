"""Killing `attnprog run` during ranking loses nothing finished: the re-run reads extraction and
the program pool back (stage markers in stages.json and manifest.json, file timestamps)."""

import json
import os
import signal
import subprocess
import sys
import time

ARGS = ("--model", "tiny-gpt2", "--limit", "30", "--max-tokens", "24", "--candidates", "3000",
        "--fraction", "0.25", "--no-qa", "--heads", "0.*,1.2")


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-c", "from attnprog.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout)


def stage_state(out, stage):
    try:
        return json.loads((out / "manifest.json").read_text())["stages"].get(stage, {}).get("state")
    except (OSError, ValueError, KeyError):
        return None  # not written yet, or caught mid-replace


def kill_during_ranking(out):
    process = subprocess.Popen(
        [sys.executable, "-c", "from attnprog.cli import main; main()", "run", "--out", str(out), *ARGS],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while stage_state(out, "rank") != "running":
        assert process.poll() is None, "the run ended before ranking started"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # its own session: the run and its sandbox workers
    process.wait()


def test_rerun_after_a_kill_during_ranking_reuses_extraction_and_the_pool(tmp_path):
    out = tmp_path / "run"
    kill_during_ranking(out)
    ledger = json.loads((out / "stages.json").read_text())
    assert {"extract", "pool"} <= set(ledger) and "rank" not in ledger
    stamps = {name: (out / name).stat().st_mtime_ns for name in ("attention.safetensors", "pool.jsonl")}

    rerun = run_cli("run", "--out", str(out), *ARGS)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["previous_stages"]["rank"]["state"] == "running"  # the killed run's last word
    assert manifest["stages"]["extract"]["state"] == "reused"
    assert manifest["stages"]["pool"]["state"] == "reused"
    assert manifest["stages"]["rank"]["state"] == "done"
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps
    assert "rank" in json.loads((out / "stages.json").read_text())

    # the heads subset: 0.* and 1.2 of the tiny model's 2 x 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heads"] == 5 and summary["store"]["heads"] == 8

    # --force redoes the named stage and every later one, nothing before it
    forced = run_cli("run", "--out", str(out), *ARGS, "--force", "sweep", "--no-report")
    assert forced.returncode == 0, forced.stderr[-3000:]
    states = {k: v["state"] for k, v in json.loads((out / "manifest.json").read_text())["stages"].items()}
    assert states == {"extract": "reused", "pool": "reused", "fit": "reused", "evaluate": "done",
                      "rank": "reused", "library": "reused", "heads": "reused", "costs": "reused",
                      "sweep": "done"}


def test_force_of_an_unknown_stage_names_the_stages(tmp_path):
    result = run_cli("run", "--out", str(tmp_path / "run"), *ARGS, "--force", "ranking")
    assert result.returncode == 2 and "extract, pool, llm, fit, evaluate, rank" in result.stderr
