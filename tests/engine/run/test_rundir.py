"""The run directory: where a run may write."""

import json

import pytest
from typer.testing import CliRunner

from attnprog.cli import app
from attnprog.engine.run import rundir
from attnprog.engine.run.rundir import check_run_dir
from attnprog.errors import StoreError


def test_a_new_or_empty_directory_is_accepted(tmp_path):
    check_run_dir(tmp_path / "new")
    check_run_dir(tmp_path)


def test_an_earlier_runs_directory_is_accepted(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "manifest.json").write_text("{}")
    check_run_dir(tmp_path)


def test_a_directory_holding_only_stage_outputs_is_accepted(tmp_path):
    (tmp_path / "attention.safetensors").write_bytes(b"")  # e.g. from attnprog extract
    (tmp_path / "pool.jsonl").write_text("")
    (tmp_path / "pool.llm.json").write_text("{}")  # attnprog synthesize's report
    (tmp_path / "iou_table.safetensors.partial").write_bytes(b"")  # an interrupted command's
    (tmp_path / ".DS_Store").write_bytes(b"")
    check_run_dir(tmp_path)


def test_a_directory_of_other_files_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # e.g. a checkpoint
    with pytest.raises(StoreError, match="not a run directory"):
        check_run_dir(tmp_path)


def test_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="is a file"):
        check_run_dir(tmp_path / "notes.txt")


def test_run_into_a_checkpoint_folder_stops_before_writing_anything(tmp_path):
    checkpoint = {"model_type": "llama", "hidden_size": 576}
    (tmp_path / "config.json").write_text(json.dumps(checkpoint))
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path), "--model", "tiny-gpt2"])
    assert isinstance(result.exception, StoreError) and "not a run directory" in str(result.exception)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    assert json.loads((tmp_path / "config.json").read_text()) == checkpoint


# --- the ledger (stages.json) ------------------------------------------------------------------


def test_a_version_1_ledger_is_read_with_its_keys(tmp_path):
    from attnprog.engine.run.rundir import Ledger

    (tmp_path / "stages.json").write_text(json.dumps({"pool": "candidates=100"}))
    (tmp_path / "pool.jsonl").write_text("")
    ledger = Ledger(tmp_path, ("extract", "pool"))
    assert ledger.version == 1 and ledger.done("pool", "candidates=100", [tmp_path / "pool.jsonl"])


def test_the_ledger_is_written_with_its_version(tmp_path):
    from attnprog.engine.run.rundir import LEDGER_VERSION, Ledger

    Ledger(tmp_path, ("pool",)).record("pool", "candidates=100")
    saved = json.loads((tmp_path / "stages.json").read_text())
    assert saved == {"version": LEDGER_VERSION, "pool": "candidates=100"}


def test_a_changed_input_is_named_in_one_line(tmp_path):
    from attnprog.engine.run.rundir import Ledger

    ledger = Ledger(tmp_path, ("rank",))
    ledger.record("rank", "model|corpus|candidates=100")
    why = ledger.why("rank", "model|corpus|candidates=200", [])
    assert why == "redoing rank: its inputs changed (candidates=100 -> candidates=200)"


def test_a_changed_corpus_is_named_as_the_corpus(tmp_path):
    """Keys hold the corpus as a bare hash: a new --corpus printed "its inputs changed
    (dcf390e5a2aaae2b -> 373b4751a8160f49)", which does not say what changed."""
    from attnprog.engine.run.rundir import Ledger

    ledger = Ledger(tmp_path, ("rank",))
    ledger.record("rank", "tiny-gpt2-seed0|dcf390e5a2aaae2b|candidates=100")
    why = ledger.why("rank", "tiny-gpt2-seed0|373b4751a8160f49|candidates=100", [])
    assert why == ("redoing rank: its inputs changed "
                   "(corpus=dcf390e5a2aaae2b -> corpus=373b4751a8160f49)")


def test_an_input_dropped_from_a_key_is_named_without_a_dangling_arrow(tmp_path):
    """--no-fit on a fitted run printed "its inputs changed (fit=v5,terms=12 -> )"."""
    from attnprog.engine.run.rundir import Ledger

    ledger = Ledger(tmp_path, ("rank",))
    ledger.record("rank", "model|candidates=100|fit=v5,terms=12")
    assert ledger.why("rank", "model|candidates=100", []) == (
        "redoing rank: its inputs changed (no longer fit=v5,terms=12)")


def test_a_missing_file_is_named(tmp_path):
    from attnprog.engine.run.rundir import Ledger

    ledger = Ledger(tmp_path, ("library",))
    ledger.record("library", "k")
    assert ledger.why("library", "k", [tmp_path / "library.json"]) == "redoing library: library.json missing"
    assert ledger.why("sweep", "k", []) == ""  # never finished here: nothing to explain


def test_headline_holds_the_sweeps_figures_under_their_own_keys():
    figures = {"kl": {"cost": {"0.25": {"zero": 0.1}}},
               "ppl_increase_ci": {"cost": {"0.25": {"zero": [1.0, 2.0]}}},
               "replaceable_share": {"16": {"selection": 0.4, "heldout": 0.38}},
               "paper_protocol_iou": {"mean": 0.7, "min": 0.6, "max": 0.8}}
    sweep = {"cost": {"0.25": {"zero": 9.0}}}
    summary = rundir.headline([0.5, 0.6], sweep=sweep, detail={"figures": figures})
    assert summary["ppl_increase"] == sweep
    for key, value in figures.items():
        assert summary[key] == value
    assert set(rundir.SWEEP_FIGURES) <= set(figures)
