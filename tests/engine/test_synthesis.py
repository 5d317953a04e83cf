"""LLM synthesis on a store: heads, tasks, the pool kept across failures, replies from the cache,
the CLI's --print-prompt and the pipeline's LLM stage. Replies here are recorded ones put in the
cache; the end-to-end test against a real server is tests/e2e/test_llm_synthesis.py."""

import json

import pytest
from typer.testing import CliRunner

from attnprog.engine.extract import extract_attention
from attnprog.engine.synthesis import head_pairs, head_tasks, report_path, synthesize_into_pool
from attnprog.errors import AttnProgError, LLMError
from attnprog.synth.generator.golden import golden_programs
from attnprog.synth.llm.cache import ReplyCache
from attnprog.synth.llm.client import ChatClient, LLMSettings
from attnprog.synth.llm.synthesiser import SynthesisOptions, head_prompt
from attnprog.synth.program import load_pool, save_pool

PREVIOUS = ("```python\nimport numpy as np\n\ndef program(s):\n    m = np.zeros((s.n, s.n))\n"
            "    m[0, 0] = 1.0\n    m[np.arange(1, s.n), np.arange(s.n - 1)] = 1.0\n    return m\n```")
OPTIONS = SynthesisOptions(n=1, rounds=0, attempts=1, summary_tokens=300)


@pytest.fixture(scope="module")
def store(tiny_gpt2, builtin_corpus):
    model, tokenizer = tiny_gpt2
    return extract_attention(model, tokenizer, builtin_corpus.take(30), max_tokens=24, progress=False)


def unreachable(tmp_path, **extra) -> LLMSettings:
    from attnprog.synth.llm.server import free_port

    return LLMSettings(model="m", base_url=f"http://127.0.0.1:{free_port()}/v1", retries=0,
                       cache_dir=str(tmp_path / "cache"), **extra)


def record_replies(store, heads, settings, options, text=PREVIOUS):
    """Put a recorded reply for each head's first request into the reply cache."""
    client = ChatClient(settings)
    for task in head_tasks(store, heads, n_texts=4):
        key = client.key(head_prompt(task, options))
        ReplyCache(settings.cache_dir).put(key, {
            "text": text, "finish_reason": "stop", "prompt_tokens": 100, "completion_tokens": 20,
            "request_id": f"recorded-{task.label}", "model": "m"})


def test_heads_are_parsed_from_a_list_or_all(store):
    assert head_pairs("1.2, 0.3", store) == [(0, 3), (1, 2)]
    assert len(head_pairs("all", store)) == store.n_rows


@pytest.mark.parametrize("spec, message", [
    ("1-2", "not LAYER.HEAD"), ("5.0", "out of range"), (",", "no heads"),
])
def test_bad_heads_are_refused(store, spec, message):
    with pytest.raises(AttnProgError, match=message):
        head_pairs(spec, store)


def test_a_task_holds_the_heads_attention_on_synthesis_and_selection_texts(store):
    (task,) = head_tasks(store, [(1, 2)], n_texts=3)
    assert task.label == "L1.H2" and len(task.synthesis) == 3
    first = store.split_indices("synthesis")[0]
    sentence, attention = task.synthesis[0]
    assert sentence.text == store.texts[first]
    assert attention == pytest.approx(store.dense(store.row(1, 2), first).numpy())
    assert [s.text for s, _ in task.selection] == [store.texts[k] for k in store.split_indices("selection")]


def test_recorded_replies_fill_the_pool_without_a_request(store, tmp_path):
    settings = unreachable(tmp_path)
    record_replies(store, [(0, 1), (1, 2)], settings, OPTIONS)
    pool = tmp_path / "pool.jsonl"
    save_pool(golden_programs(), pool)
    added, report = synthesize_into_pool(store, [(0, 1), (1, 2)], settings, OPTIONS, pool, progress=False)
    assert len(added) == 1  # both heads got the same program: the pool keeps it once
    assert len(load_pool(pool)) == len(golden_programs()) + 1
    assert report.usage["requests"] == 0 and report.usage["cache_hits"] == 2
    saved = json.loads(report_path(pool).read_text())
    assert {h["label"] for h in saved["heads"]} == {"L0.H1", "L1.H2"}


def test_an_unreachable_endpoint_keeps_the_existing_pool(store, tmp_path):
    pool = tmp_path / "pool.jsonl"
    save_pool(golden_programs(), pool)
    with pytest.raises(LLMError, match="could not reach the LLM endpoint"):
        synthesize_into_pool(store, [(0, 1)], unreachable(tmp_path), OPTIONS, pool, progress=False)
    assert [p.hash for p in load_pool(pool)] == [p.hash for p in golden_programs()]


def test_an_unreachable_endpoint_keeps_the_report_of_an_earlier_call(store, tmp_path):
    pool = tmp_path / "pool.jsonl"
    settings = unreachable(tmp_path)
    record_replies(store, [(0, 1)], settings, OPTIONS)
    synthesize_into_pool(store, [(0, 1)], settings, OPTIONS, pool, progress=False)
    earlier = json.loads(report_path(pool).read_text())
    del earlier["earlier"]  # calls before it: none
    with pytest.raises(LLMError, match="could not reach the LLM endpoint"):
        synthesize_into_pool(store, [(1, 2)], settings, OPTIONS, pool, progress=False)
    saved = json.loads(report_path(pool).read_text())
    assert saved["heads"] == [] and saved["earlier"] == [earlier]


def test_each_call_into_a_pool_adds_its_report_to_the_earlier_ones(store, tmp_path):
    pool = tmp_path / "pool.jsonl"
    settings = unreachable(tmp_path)
    record_replies(store, [(0, 1), (1, 2)], settings, OPTIONS)
    synthesize_into_pool(store, [(0, 1)], settings, OPTIONS, pool, progress=False)
    synthesize_into_pool(store, [(1, 2)], settings, OPTIONS, pool, progress=False)
    saved = json.loads(report_path(pool).read_text())
    assert [h["label"] for h in saved["heads"]] == ["L1.H2"]
    assert [[h["label"] for h in call["heads"]] for call in saved["earlier"]] == [["L0.H1"]]


def test_print_prompt_shows_the_prompt_and_sends_nothing(store, tmp_path):
    from attnprog.cli import app

    path = tmp_path / "attention.safetensors"
    store.save(path)
    result = CliRunner().invoke(app, ["synthesize", "--store", str(path), "--heads", "1.2", "--model", "m",
                                      "--base-url", unreachable(tmp_path).base_url, "--print-prompt"])
    assert result.exit_code == 0, result.output
    assert "--- system ---" in result.output and "head L1.H2" in result.output
    assert "Write 4 distinct hypotheses" in result.output


def test_the_cli_reports_an_unreachable_endpoint_in_one_line(store, tmp_path):
    import subprocess
    import sys

    path = tmp_path / "attention.safetensors"
    store.save(path)
    result = subprocess.run(
        [sys.executable, "-c", "from attnprog.cli import main; main()", "synthesize", "--store", str(path),
         "--heads", "1.2", "--model", "m", "--base-url", unreachable(tmp_path).base_url,
         "--out", str(tmp_path / "pool.jsonl"), "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: could not reach the LLM endpoint")


def test_the_pipeline_adds_llm_programs_as_a_stage(tmp_path, monkeypatch):
    from attnprog.engine.corpus import builtin_corpus
    from attnprog.engine.models import load_model
    from attnprog.engine.run.pipeline import RunConfig, run_pipeline

    monkeypatch.setenv("ATTNPROG_CACHE_DIR", str(tmp_path / "cache"))
    config = RunConfig(out=str(tmp_path / "run"), model="tiny-gpt2", limit=30, max_tokens=24,
                       n_candidates=0, fraction=0.0, qa=False, llm_model="m",
                       llm_base_url=unreachable(tmp_path).base_url, llm_heads="1.2", llm_n=1, llm_rounds=0)
    # the pipeline's own store: extract it the same way, on the same device (the prompt quotes
    # attention weights, ordered by weight: CUDA's rounding may reorder near-equal ones), then
    # record the reply for its prompt
    model, tokenizer = load_model("tiny-gpt2", device=config.device)
    store = extract_attention(model, tokenizer, builtin_corpus().take(30), max_tokens=24, progress=False)
    settings = LLMSettings(model="m", base_url=config.llm_base_url)
    record_replies(store, [(1, 2)], settings, SynthesisOptions(n=1, rounds=0))
    lines = []
    summary = run_pipeline(config, echo=lines.append)
    text = "\n".join(lines)
    assert "LLM m: 1 valid programs for 1 heads; 0 requests, 1 from cache" in text
    assert summary["programs"] == len(golden_programs()) + 1
    again = []
    run_pipeline(config, echo=again.append)
    assert any("reused" in line and "llm_pool.jsonl" in line for line in again)


def test_show_prints_an_llm_programs_provenance(tmp_path):
    import torch

    from attnprog.cli import app
    from attnprog.engine.rank import IoUTable
    from attnprog.synth.program import Program

    program = Program(PREVIOUS.split("```python\n")[1].split("```")[0], family="llm", provenance={
        "generator": "llm", "model": "smol", "request_id": "req-9", "round": 1, "parent": "abc123",
        "head": "L0H1"})
    table = IoUTable(iou=torch.tensor([[0.5, 0.7]]), programs=[program], split="selection",
                     n_layers=1, n_heads=2)
    table.save(tmp_path / "table.safetensors")
    result = CliRunner().invoke(app, ["show", "--table", str(tmp_path / "table.safetensors"), "0.1"])
    assert result.exit_code == 0, result.output
    assert "# provenance: model smol, request_id req-9, round 1, parent abc123, head L0H1" in result.output
