"""The synthesiser against a scripted endpoint: validation, re-prompts with the reason, refinement,
recorded failures, provenance, the token cap and endpoint failures."""

import numpy as np
import pytest

from attnprog.errors import LLMError
from attnprog.kernels.iou import pair_iou
from attnprog.synth.features import Sentence
from attnprog.synth.llm.client import ChatClient, LLMSettings
from attnprog.synth.llm.synthesiser import HeadTask, Synthesiser, SynthesisOptions

FIRST = ("```python\nimport numpy as np\n\ndef program(s):\n    m = np.zeros((s.n, s.n))\n"
         "    m[:, 0] = 1.0\n    return m\n```")
PREVIOUS = ("```python\nimport numpy as np\n\ndef program(s):\n    m = np.zeros((s.n, s.n))\n"
            "    m[0, 0] = 1.0\n    m[np.arange(1, s.n), np.arange(s.n - 1)] = 1.0\n    return m\n```")
FORBIDDEN = "```python\nimport os\n\ndef program(s):\n    return np.eye(s.n)\n```"
TWO_FUNCTIONS = "```python\ndef helper(s):\n    return 1\n\ndef program(s):\n    return np.eye(s.n)\n```"
HANGS = "```python\ndef program(s):\n    while True:\n        pass\n```"
MEMORY_BOMB = "```python\ndef program(s):\n    return np.ones((10**5, 10**5))[: s.n, : s.n]\n```"
CRASHES = "```python\ndef program(s):\n    return np.eye(s.n)[:, :1] / 0 + undefined_name\n```"


def previous_token_task(label: str = "L1H2") -> HeadTask:
    """A head that attends to the previous token, on a few texts."""
    def example(text):
        s = Sentence.from_text(text, bos="<s>")
        attention = np.zeros((s.n, s.n))
        attention[0, 0] = 1.0
        attention[np.arange(1, s.n), np.arange(s.n - 1)] = 1.0
        return s, attention

    texts = ["The cat sat on the mat.", "A dog ran home, fast.", "Birds sing at dawn."]
    return HeadTask(label, [example(t) for t in texts[:2]], [example(t) for t in texts[1:]])


def synthesiser(scripted, tmp_path, n=1, rounds=0, attempts=3, **settings):
    client = ChatClient(LLMSettings(model="scripted-model", base_url=scripted.base_url, retries=0,
                                    cache_dir=str(tmp_path / "cache"), **settings), sleep=lambda s: None)
    return Synthesiser(client, SynthesisOptions(n=n, rounds=rounds, attempts=attempts, summary_tokens=400),
                       score=pair_iou)


def test_a_valid_program_is_kept_with_its_provenance(scripted, chat, tmp_path):
    scripted.reply((200, chat(PREVIOUS, request_id="r-1")))
    result = synthesiser(scripted, tmp_path).synthesise_head(previous_token_task())
    (program,) = result.programs
    assert program.family == "llm"
    assert {k: program.provenance[k] for k in ("model", "request_id", "round", "parent", "head")} == {
        "model": "scripted-model", "request_id": "r-1", "round": 0, "parent": None, "head": "L1H2"}
    assert [c.ok for c in result.candidates] == [True]


def test_the_prompt_carries_the_heads_summary_and_n(scripted, chat, tmp_path):
    scripted.reply((200, chat(PREVIOUS)))
    synthesiser(scripted, tmp_path, n=3).synthesise_head(previous_token_task())
    user = scripted.requests[0]["messages"][-1]["content"]
    assert "head L1H2" in user and "' cat'[2] -> 'The'[1] (1.000)" in user and "Write 3 distinct" in user


def test_a_helper_function_beside_the_program_is_accepted(scripted, chat, tmp_path):
    scripted.reply((200, chat(TWO_FUNCTIONS)))
    result = synthesiser(scripted, tmp_path, attempts=1).synthesise_head(previous_token_task())
    assert [(c.ok, c.reason) for c in result.candidates] == [(True, "")] and len(result.programs) == 1


@pytest.mark.parametrize("bad, reason", [
    (FORBIDDEN, "import of `os` is not allowed"),
    (CRASHES, "on probe text 0"),
    (MEMORY_BOMB, "memory limit exceeded"),
    ("I think it attends to the previous token.", "no Python code block"),
    ("", "the reply was empty"),
])
def test_an_invalid_program_is_re_prompted_with_its_reason(scripted, chat, tmp_path, bad, reason):
    scripted.reply((200, chat(bad)), (200, chat(PREVIOUS)))
    result = synthesiser(scripted, tmp_path).synthesise_head(previous_token_task())
    first, second = result.candidates
    assert not first.ok and reason in first.reason
    assert second.ok and second.attempt == 2 and len(result.programs) == 1
    repair = scripted.requests[1]["messages"]
    assert repair[-2] == {"role": "assistant", "content": bad} and reason in repair[-1]["content"]


def test_a_hanging_program_fails_with_a_timeout(scripted, chat, tmp_path):
    scripted.reply((200, chat(HANGS)))
    result = synthesiser(scripted, tmp_path, attempts=1).synthesise_head(previous_token_task())
    assert result.programs == [] and "timeout" in result.candidates[0].reason


def test_a_reply_cut_off_by_the_token_limit_is_re_prompted_to_be_shorter(scripted, chat, tmp_path):
    cut = "```python\ndef program(s):\n    m = np.zeros((s.n,"
    scripted.reply((200, chat(cut, finish_reason="length")), (200, chat(PREVIOUS)))
    result = synthesiser(scripted, tmp_path, max_tokens=32).synthesise_head(previous_token_task())
    assert "cut off at the token limit (32 tokens)" in result.candidates[0].reason
    assert "write a shorter program" in scripted.requests[1]["messages"][-1]["content"]
    assert len(result.programs) == 1


def test_attempts_are_bounded_and_every_failure_is_recorded(scripted, chat, tmp_path):
    scripted.reply((200, chat(FORBIDDEN)))
    result = synthesiser(scripted, tmp_path, attempts=3).synthesise_head(previous_token_task())
    assert result.programs == [] and len(scripted.requests) == 3
    assert [(c.attempt, c.ok) for c in result.candidates] == [(1, False), (2, False), (3, False)]


def test_n_hypotheses_in_one_reply_are_each_validated(scripted, chat, tmp_path):
    scripted.reply((200, chat(f"One:\n{FIRST}\nTwo:\n{PREVIOUS}\nThree:\n{FORBIDDEN}")), (200, chat(FIRST)))
    result = synthesiser(scripted, tmp_path, n=3, attempts=2).synthesise_head(previous_token_task())
    assert [c.hypothesis for c in result.candidates] == [0, 1, 2, 2]
    assert len(result.programs) == 2  # the repaired third equals the first: kept once


def test_refinement_keeps_a_child_that_scores_better(scripted, chat, tmp_path):
    scripted.reply((200, chat(FIRST)), (200, chat(PREVIOUS, request_id="r-child")))
    result = synthesiser(scripted, tmp_path, rounds=1).synthesise_head(previous_token_task())
    parent, child = result.programs
    assert child.provenance["round"] == 1 and child.provenance["parent"] == parent.hash
    refine = scripted.requests[1]["messages"][-1]["content"]
    assert "mean IoU" in refine and "under-predicted" in refine and "Where it fits worst" in refine


def test_refinement_drops_a_child_that_does_not_score_better(scripted, chat, tmp_path):
    scripted.reply((200, chat(PREVIOUS)), (200, chat(FIRST)))
    result = synthesiser(scripted, tmp_path, rounds=1).synthesise_head(previous_token_task())
    assert len(result.programs) == 1
    assert "not kept: selection IoU" in result.candidates[-1].reason


def test_the_token_cap_ends_the_head_early_and_keeps_what_it_has(scripted, chat, tmp_path):
    scripted.reply((200, chat(FIRST, prompt_tokens=500, completion_tokens=100)))
    result = synthesiser(scripted, tmp_path, rounds=2, max_tokens_total=100).synthesise_head(
        previous_token_task())
    assert len(result.programs) == 1 and "token cap of 100" in result.error
    assert len(scripted.requests) == 1


def test_an_endpoint_failure_stops_the_run_after_saving_finished_heads(scripted, chat, tmp_path):
    scripted.reply((200, chat(PREVIOUS)), (401, {"error": {"message": "bad key"}}))
    done = []
    worker = synthesiser(scripted, tmp_path, concurrency=1)
    with pytest.raises(LLMError, match="refused the API key"):
        worker.synthesise([previous_token_task("L0H0"), previous_token_task("L0H1")],
                          on_result=done.append, progress=False)
    assert [r.label for r in done] == ["L0H0"] and len(done[0].programs) == 1


def test_a_second_run_is_served_from_the_cache(scripted, chat, tmp_path):
    scripted.reply((200, chat(FORBIDDEN)), (200, chat(PREVIOUS)))
    first = synthesiser(scripted, tmp_path).synthesise_head(previous_token_task())
    again = synthesiser(scripted, tmp_path)
    second = again.synthesise_head(previous_token_task())
    assert len(scripted.requests) == 2 and again.client.usage.requests == 0
    assert [p.hash for p in second.programs] == [p.hash for p in first.programs]
    assert all(c.cached for c in second.candidates)
