"""`attnprog run` on a tiny model end to end: every artefact, every summary key, and the report
opened in a real headless Chromium."""

import base64
import io
import json
import re
import subprocess
import sys

import numpy as np
import torch

ARTEFACTS = ("manifest.json", "summary.json", "report.html", "config.json", "attention.safetensors",
             "pool.jsonl", "iou_table.safetensors", "library.json", "heads.json", "sweep.txt",
             "sweep.json", "sweep_detail.json", "stages.json")
SUMMARY_KEYS = ("mean_best_fit_iou", "median_best_fit_iou", "share_heads_iou_above_0_5",
                "share_heads_iou_above_0_75", "library_size", "library_mean_iou", "ppl_increase",
                "qa_accuracy", "head_types", "median_terms_needed")
STAGES = ("extract", "pool", "fit", "evaluate", "rank", "library", "heads", "costs", "sweep",
          "report")


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-c", "from attnprog.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_run_writes_every_artefact(tiny_run):
    out, _ = tiny_run
    missing = [name for name in ARTEFACTS if not (out / name).is_file()]
    assert not missing


def test_summary_holds_the_headline_figures_under_plain_keys(tiny_run):
    summary = json.loads((tiny_run[0] / "summary.json").read_text())
    assert all(summary.get(key) is not None for key in SUMMARY_KEYS), summary
    assert 0.0 <= summary["median_best_fit_iou"] <= 1.0 and summary["heads"] == 8
    assert 1 <= summary["library_size"] <= 8
    conditions = {"programs", "uniform", "random", "zero", "mean"}
    assert set(summary["ppl_increase"]["iou"]["0.25"]) == conditions
    assert set(summary["ppl_increase"]["cost"]["0.25"]) == conditions
    assert set(summary["qa_accuracy"]) == {"before", "after"}
    assert set(summary["qa_accuracy"]["after"]["0.25"]) == {"programs", "uniform", "random"}


def test_manifest_says_how_the_run_was_made(tiny_run):
    manifest = json.loads((tiny_run[0] / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["config"]["n_candidates"] == 100
    assert manifest["model"]["id"] == "tiny-gpt2-seed0" and manifest["model"]["layers"] == 2
    assert len(manifest["corpus"]["hash"]) == 16 and manifest["corpus"]["texts"] == 30
    assert manifest["packages"]["torch"] and manifest["device"]["requested"] == "auto"
    assert manifest["device"]["used"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert list(manifest["stages"]) == list(STAGES)
    assert all(stage["state"] == "done" and stage["seconds"] >= 0 for stage in manifest["stages"].values())


def test_report_renders_in_chromium(tiny_run, chromium, tmp_path):
    from PIL import Image

    page = tiny_run[0] / "report.html"
    shot = chromium.screenshot(page, tmp_path / "report.png")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1600, 1200)
    assert (pixels < 200).mean() > 0.02 and pixels.std() > 20  # text, tables and plots, not a blank page


def test_report_dom_holds_the_summary_figures(tiny_run, chromium):
    summary = json.loads((tiny_run[0] / "summary.json").read_text())
    dom = chromium.dump_dom(tiny_run[0] / "report.html")
    assert f'id="mean_best_fit_iou">{summary["mean_best_fit_iou"]:.3f}<' in dom
    assert f'id="library_size">{summary["library_size"]}<' in dom
    assert f'id="ppl_increase_0.25_iou">{summary["ppl_increase"]["iou"]["0.25"]["programs"]:+.1f} %<' in dom
    assert len(re.findall(r'<section class="head[ "]', dom)) == 8 and 'data-head="L1.H3"' in dom


def test_every_embedded_image_decodes_in_chromium(tiny_run, chromium, tmp_path):
    # the same page plus a script that counts images the browser decoded
    probe = tmp_path / "probe.html"
    script = ("<script>window.addEventListener('load', () => { const images = [...document.images];"
              "document.body.dataset.decoded = images.filter(i => i.complete && i.naturalWidth > 0).length"
              " + '/' + images.length; });</script></body>")
    probe.write_text((tiny_run[0] / "report.html").read_text().replace("</body>", script))
    decoded, total = re.search(r'data-decoded="(\d+)/(\d+)"', chromium.dump_dom(probe)).groups()
    assert int(total) == 1 and decoded == total  # the library curve; the rest is drawn by the script


def test_report_is_self_contained(tiny_run):
    from PIL import Image

    page = (tiny_run[0] / "report.html").read_text()
    assert not re.search(r"(src|href)=['\"](https?:)?//", page)  # nothing fetched from a network
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 1
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()


def test_report_command_rebuilds_the_page(tiny_run, tmp_path):
    result = run_cli("report", str(tiny_run[0]), "--out", str(tmp_path / "again.html"), "--texts", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "again.html" in result.stdout and (tmp_path / "again.html").stat().st_size > 10_000


def test_report_command_on_a_directory_without_a_run_says_what_to_do(tmp_path):
    result = run_cli("report", str(tmp_path))
    assert result.returncode == 2 and "attnprog run --out" in result.stderr
