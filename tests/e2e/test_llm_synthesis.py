"""LLM synthesis end to end against a real `transformers serve` on loopback, serving the
SmolLM2-135M-Instruct checkpoint that the model loader caches. The 135M model writes poor
code: these tests check the machinery (requests, parsing, re-prompts, ranking, usage,
the cache), not the model's skill."""

import json

import pytest

from attnprog.synth.llm.client import ChatClient

pytestmark = pytest.mark.slow

HEADS = [(0, 0), (3, 1)]
N, ATTEMPTS, ROUNDS, TEXTS, SUMMARY_TOKENS, MAX_TOKENS = 2, 2, 1, 1, 250, 96


@pytest.fixture(scope="module")
def server():
    """`transformers serve` on a free loopback port with the loader's checkpoint directory."""
    pytest.importorskip("fastapi", reason="needs transformers[serving] (make setup installs it)")
    from attnprog.engine.models import builtin_checkpoint
    from attnprog.synth.llm.server import local_server

    with local_server(builtin_checkpoint("smollm2-135m")) as (base_url, model):
        yield base_url, model


@pytest.fixture(scope="module")
def store(smollm2, builtin_corpus, tmp_path_factory):
    from attnprog.engine.extract import extract_attention

    model, tokenizer = smollm2
    attention = extract_attention(model, tokenizer, builtin_corpus.take(24), max_tokens=24,
                                  progress=False)
    path = tmp_path_factory.mktemp("llm") / "attention.safetensors"
    attention.save(path)
    return attention, path


class RecordingClient(ChatClient):
    """The real client, which also keeps the messages of every request it sends."""

    def __init__(self, settings):
        super().__init__(settings)
        self.sent = []

    def _send(self, messages, key):
        self.sent.append(messages)
        return super()._send(messages, key)


def settings(server, cache_dir):
    from attnprog.synth.llm.client import LLMSettings

    base_url, model = server
    # a loaded CPU server can take minutes per reply; a retried timeout would only start over
    return LLMSettings(model=model, base_url=base_url, temperature=0.0, max_tokens=MAX_TOKENS,
                       concurrency=1, cache_dir=str(cache_dir), timeout=3600.0)


@pytest.fixture(scope="module")
def first_run(server, store, tmp_path_factory):
    from attnprog.engine.synthesis import synthesize_into_pool
    from attnprog.synth.generator.golden import golden_programs
    from attnprog.synth.llm.synthesiser import SynthesisOptions
    from attnprog.synth.program import save_pool

    attention, _ = store
    work = tmp_path_factory.mktemp("llm-run")
    pool_path = work / "pool.jsonl"
    save_pool(golden_programs(), pool_path)
    client = RecordingClient(settings(server, work / "cache"))
    options = SynthesisOptions(n=N, rounds=ROUNDS, attempts=ATTEMPTS, summary_tokens=SUMMARY_TOKENS)
    added, report = synthesize_into_pool(attention, HEADS, client.settings, options, pool_path,
                                         n_texts=TEXTS, progress=False, client=client)
    return {"client": client, "added": added, "report": report, "pool": pool_path, "work": work,
            "options": options}


def test_requests_were_sent_to_the_server_and_answered(first_run):
    client = first_run["client"]
    assert client.usage.requests == len(client.sent) >= len(HEADS)
    assert client.usage.cache_hits == 0 and client.usage.retries == 0
    heads = {h["label"]: h for h in first_run["report"].heads}
    assert set(heads) == {"L0.H0", "L3.H1"}
    for head in heads.values():
        assert head["candidates"] and all(c["request_id"] for c in head["candidates"])


def test_every_reply_was_parsed_into_a_candidate_or_a_reason(first_run):
    for head in first_run["report"].heads:
        for candidate in head["candidates"]:
            assert candidate["ok"] or candidate["reason"]
            assert candidate["ok"] == bool(candidate["program_hash"])


def test_invalid_programs_were_re_prompted_with_their_error(first_run):
    sent = first_run["client"].sent
    failed = [c for h in first_run["report"].heads for c in h["candidates"]
              if not c["ok"] and c["attempt"] < ATTEMPTS and "not kept" not in c["reason"]]
    for candidate in failed:
        assert any(m[-1]["role"] == "user" and candidate["reason"] in m[-1]["content"]
                   and "does not work" in m[-1]["content"] for m in sent)
        position = (candidate["head"], candidate["round"], candidate["hypothesis"], candidate["attempt"] + 1)
        assert any((c["head"], c["round"], c["hypothesis"], c["attempt"]) == position
                   for h in first_run["report"].heads for c in h["candidates"])


def test_valid_programs_joined_the_pool_and_rank_with_the_rest(first_run, store):
    from attnprog.engine.pool import evaluate_pool, rank_table, ranking_subset
    from attnprog.synth.generator.golden import golden_programs
    from attnprog.synth.program import load_pool

    pool = load_pool(first_run["pool"])
    llm = [p for p in pool if p.family == "llm"]
    assert len(pool) == len(golden_programs()) + len(llm)
    assert {p.hash for p in llm} == {p.hash for p in first_run["added"]}
    for program in llm:
        assert program.provenance["model"] == first_run["client"].model
        assert program.provenance["request_id"] and program.provenance["head"] in ("L0.H0", "L3.H1")
    attention = ranking_subset(store[0], "selection", "heldout")
    table = rank_table(attention, evaluate_pool(attention, pool, progress=False))
    assert table.n_programs == len(pool)
    ranked = {p.hash for p in table.programs}
    assert all(p.hash in ranked for p in llm)


def test_usage_was_recorded_per_head_and_in_total(first_run):
    usage = first_run["report"].usage
    assert usage["requests"] == first_run["client"].usage.requests
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert set(usage["per_tag"]) == {"L0.H0", "L3.H1"}
    saved = json.loads((first_run["work"] / "pool.llm.json").read_text())
    assert saved["usage"]["total_tokens"] == usage["total_tokens"]


def test_a_second_run_is_served_from_the_cache_with_no_request(first_run, server, store, tmp_path):
    from typer.testing import CliRunner

    from attnprog.cli import app

    base_url, model = server
    pool_path = tmp_path / "again.jsonl"
    result = CliRunner().invoke(app, [
        "synthesize", "--store", str(store[1]), "--heads", "0.0,3.1", "--base-url", base_url,
        "--model", model, "--n", str(N), "--rounds", str(ROUNDS), "--attempts", str(ATTEMPTS),
        "--texts", str(TEXTS), "--summary-tokens", str(SUMMARY_TOKENS), "--max-tokens", str(MAX_TOKENS),
        "--temperature", "0", "--concurrency", "1", "--cache-dir", str(first_run["work"] / "cache"),
        "--out", str(pool_path),
    ])
    assert result.exit_code == 0, result.output
    first = first_run["client"].usage
    assert f"requests sent 0, served from cache {first.requests}," in result.output
    report = json.loads((tmp_path / "again.llm.json").read_text())
    assert report["usage"]["requests"] == 0
    added = [json.loads(line)["hash"] for line in pool_path.read_text().splitlines()]
    assert added == [p.hash for p in first_run["added"]]
