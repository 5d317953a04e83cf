"""`attnprog run --ray auto` on one machine: a local Ray cluster gives the single-machine run."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("ray")


def run_cli(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "-c", "from attnprog.cli import main; main()", *args],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.slow
def test_run_with_ray_auto_equals_the_single_machine_run(tmp_path):
    from attnprog.engine.rank import IoUTable

    # on the CPU both ways: bit-equal tables need the same kernels and program rows (on a GPU the
    # single-machine run makes generator rows with torch, Ray's shards get numpy's, which agree
    # to 1e-6 only) and the same fits (CUDA's atomic sums make two GPU fits differ in rounding)
    args = ("--model", "tiny-gpt2", "--limit", "24", "--max-tokens", "32", "--candidates", "60",
            "--fraction", "0.25", "--no-qa", "--device", "cpu")
    # the Ray sweep replaces heads in IoU order only, so the single-machine run does the same
    here = run_cli("run", "--out", str(tmp_path / "here"), "--order", "iou", *args)
    assert here.returncode == 0, here.stderr
    spread = run_cli("run", "--out", str(tmp_path / "ray"), "--ray", "auto", *args)
    assert spread.returncode == 0, spread.stderr
    assert "Ray cluster: 1 node(s)" in spread.stdout

    table = IoUTable.load(tmp_path / "ray" / "iou_table.safetensors")
    assert table.meta["ray"]["shards"] >= 1
    expected = IoUTable.load(tmp_path / "here" / "iou_table.safetensors")
    assert torch.equal(table.iou, expected.iou)
    assert torch.equal(table.heldout_iou, expected.heldout_iou)
    ours = json.loads((tmp_path / "ray" / "sweep.json").read_text())
    theirs = json.loads((tmp_path / "here" / "sweep.json").read_text())
    assert ours.keys() == theirs.keys() == {"iou"}
    for fraction, row in theirs["iou"].items():
        for condition, increase in row.items():
            assert ours["iou"][fraction][condition] == pytest.approx(increase, abs=1e-3)


def test_ray_at_an_unreachable_address_is_a_one_line_error(tmp_path):
    result = run_cli("rank", "--store", str(tmp_path / "missing.safetensors"), "--pool",
                     str(tmp_path / "pool.jsonl"), "--ray", "127.0.0.1:1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no Ray cluster answers at 127.0.0.1:1" in result.stderr
