"""The CLI as a user runs it: a real subprocess, package errors printed without a traceback."""

import subprocess
import sys

import pytest

from attnprog.engine.store import AttentionStore


def run_cli(*args, env_extra=None):
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-c", "from attnprog.cli import main; main()", *args],
        capture_output=True, text=True, timeout=300, env=env,
    )


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "extract" in result.stdout and "models" in result.stdout


def test_models_lists_builtin_names_and_readiness():
    result = run_cli("models")
    assert result.returncode == 0
    assert "smollm2-135m" in result.stdout and "ready" in result.stdout


def test_unknown_model_prints_one_line_error_without_traceback(tmp_path):
    result = run_cli("extract", "--model", "nope", "--out", str(tmp_path / "s.safetensors"))
    assert result.returncode == 2
    assert "unknown model 'nope'" in result.stderr and "smollm2-135m" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_corpus_file_is_reported_without_traceback(tmp_path):
    result = run_cli("extract", "--model", "tiny-gpt2", "--corpus", str(tmp_path / "none.txt"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_extract_writes_a_store_and_reuses_it_on_rerun(tmp_path):
    out = tmp_path / "s.safetensors"
    args = ("extract", "--model", "tiny-llama", "--limit", "6", "--out", str(out))
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "wrote" in first.stdout and "reused" in second.stdout
    assert AttentionStore.load(out).n_texts == 6


@pytest.mark.slow
def test_extract_on_smollm2_reports_270_heads(tmp_path):
    result = run_cli("extract", "--limit", "4", "--out", str(tmp_path / "s.safetensors"))
    assert result.returncode == 0, result.stderr
    assert "270 heads" in result.stdout
