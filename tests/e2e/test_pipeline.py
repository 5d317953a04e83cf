"""`attnprog run` end to end on SmolLM2-135M, and the small commands around it."""

import json
import subprocess
import sys

import pytest


def run_cli(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "-c", "from attnprog.cli import main; main()", *args],
        capture_output=True, text=True, timeout=timeout,
    )


def test_generate_writes_golden_and_generator_programs(tmp_path):
    out = tmp_path / "pool.jsonl"
    result = run_cli("generate", "--out", str(out), "--candidates", "50")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    providers = {r["provenance"].get("generator") for r in records}
    assert providers == {"golden", "dsl"} and len(records) >= 50


def test_check_accepts_a_good_program(tmp_path):
    path = tmp_path / "prev.py"
    path.write_text("import numpy as np\n\ndef prev(s):\n    m = np.zeros((s.n, s.n))\n"
                    "    m[np.arange(1, s.n), np.arange(s.n - 1)] = 1\n    return m\n")
    result = run_cli("check", str(path))
    assert result.returncode == 0 and "ok (prev)" in result.stdout


def test_check_names_a_forbidden_import(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("import os\n\ndef program(s):\n    return os.getcwd()\n")
    result = run_cli("check", str(path))
    assert result.returncode == 2
    assert "import of `os` is not allowed" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_run_prints_every_stage_and_the_sweep_with_both_baselines_then_resumes(tmp_path):
    args = ("run", "--out", str(tmp_path / "run"), "--limit", "30", "--max-tokens", "48",
            "--candidates", "300", "--fraction", "0.1", "--no-qa")
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    for stage in ("1/10", "2/10", "3/10", "4/10", "5/10", "6/10", "7/10", "8/10", "9/10", "10/10"):
        assert f"[{stage}" in first.stdout
    assert "uniform" in first.stdout and "random" in first.stdout
    assert "10 % (27)" in first.stdout  # 10 % of 270 heads, rounded
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["store"]["heads"] == 270
    assert summary["ppl_increase"]["iou"]["0"]["programs"] == 0.0
    assert set(summary["ppl_increase"]) == {"iou", "cost"}  # both orders by default
    assert summary["leak"]["leaky_fitted"] == 0 and summary["leak"]["checked"] >= 270  # causal fits
    assert (tmp_path / "run" / "leak.json").is_file()
    assert summary["best_fit_iou"]["median"] == pytest.approx(summary["median_best_fit_iou"])
    by_length = summary["best_fit_iou_by_length"]  # whole texts of at most 48 tokens at 64
    assert list(by_length) == ["10", "20", "32", "64"]
    assert by_length["64"] == pytest.approx(summary["best_fit_iou"]["mean"], abs=1e-4)
    assert 0 < summary["tokens_per_text"] <= 48  # the held-out texts' length goes with the IoU
    assert f"held-out texts of {summary['tokens_per_text']:.0f} tokens on average" in first.stdout

    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    # read back: every stage with a file (all but 4/10, evaluate)
    for stage in ("[1/10", "[2/10", "[3/10", "[5/10", "[6/10", "[7/10", "[8/10", "[9/10", "[10/10"):
        assert "reused" in second.stdout.split(stage)[1].split("done in")[0]
    sweep_table = first.stdout.split("Head replacement")[1].split("done in")[0]
    assert sweep_table in second.stdout  # the same table, printed again


@pytest.mark.slow
def test_run_with_other_settings_redoes_the_stages_they_change(tmp_path):
    args = ("run", "--out", str(tmp_path / "run"), "--limit", "24", "--max-tokens", "32",
            "--fraction", "0.05", "--no-qa")
    assert run_cli(*args, "--candidates", "100").returncode == 0
    changed = run_cli(*args, "--candidates", "200")
    assert changed.returncode == 0, changed.stderr
    assert "reused" in changed.stdout.split("[1/10")[1].split("[2/10")[0]
    for stage in ("[2/10", "[5/10", "[6/10", "[7/10", "[8/10", "[9/10", "[10/10"):
        assert "reused" not in changed.stdout.split(stage)[1].split("done in")[0]


def _two_program_table(path):
    import torch

    from attnprog.engine.rank import IoUTable
    from attnprog.synth.generator.golden import golden_programs

    programs = golden_programs()[:2]
    iou = torch.tensor([[0.2, 0.9, 0.1, 0.3], [0.8, 0.1, 0.2, 0.4]])  # [P, L*H] with 2 x 2 heads
    IoUTable(iou=iou, programs=programs, split="selection", n_layers=2, n_heads=2).save(path)
    return programs


def test_show_prints_a_heads_best_program_source_first(tmp_path):
    programs = _two_program_table(tmp_path / "t.safetensors")
    result = run_cli("show", "--table", str(tmp_path / "t.safetensors"), "0.1", "--top", "1")
    assert result.returncode == 0, result.stderr
    assert "IoU 0.900" in result.stdout and programs[0].source.strip() in result.stdout


def test_show_refuses_a_head_outside_the_model(tmp_path):
    _two_program_table(tmp_path / "t.safetensors")
    result = run_cli("show", "--table", str(tmp_path / "t.safetensors"), "5.0")
    assert result.returncode == 2 and "2 layers x 2 heads" in result.stderr
