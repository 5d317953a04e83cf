"""The chat client: retries with backoff, clear errors for endpoint problems, cache, usage, cost cap."""

import pytest

from attnprog.errors import LLMError
from attnprog.synth.llm.client import (
    BudgetExhausted,
    ChatClient,
    LLMSettings,
    RequestRejected,
    backoff_seconds,
)

MESSAGES = [{"role": "user", "content": "write a program"}]


def client_for(url, tmp_path, sleeps=None, **overrides):
    options = {"model": "m", "retries": 3, "backoff": 0.5, "timeout": 5.0, **overrides}
    settings = LLMSettings(base_url=url, cache_dir=str(tmp_path / "cache"), **options)
    return ChatClient(settings, sleep=(sleeps.append if sleeps is not None else lambda s: None))


def test_a_reply_carries_text_finish_reason_usage_and_request_id(scripted, chat, tmp_path):
    scripted.reply((200, chat("hello", prompt_tokens=7, completion_tokens=3, request_id="abc")))
    reply = client_for(scripted.base_url, tmp_path).complete(MESSAGES)
    assert (reply.text, reply.finish_reason) == ("hello", "stop")
    assert (reply.prompt_tokens, reply.completion_tokens) == (7, 3)
    assert reply.request_id and not reply.cached


def test_the_request_sends_model_messages_and_parameters(scripted, chat, tmp_path):
    scripted.reply((200, chat("x")))
    client_for(scripted.base_url, tmp_path, temperature=0.0, max_tokens=77).complete(MESSAGES)
    sent = scripted.requests[0]
    assert (sent["model"], sent["messages"]) == ("m", MESSAGES)
    assert (sent["temperature"], sent["max_tokens"]) == (0.0, 77)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_429_and_5xx_are_retried_with_exponential_backoff(scripted, chat, tmp_path, status):
    scripted.reply((status, {"error": {"message": "busy"}}), (status, {"error": {"message": "busy"}}),
                   (200, chat("done")))
    sleeps = []
    client = client_for(scripted.base_url, tmp_path, sleeps)
    assert client.complete(MESSAGES).text == "done"
    assert len(scripted.requests) == 3 and client.usage.retries == 2
    assert 0.5 <= sleeps[0] <= 0.625 and 1.0 <= sleeps[1] <= 1.25


def test_backoff_doubles_and_is_capped():
    for attempt, expected in enumerate([1.0, 2.0, 4.0, 5.0, 5.0]):
        assert expected <= backoff_seconds(attempt, 1.0, cap=5.0) <= 1.25 * expected


def test_a_timeout_is_retried_then_reported(scripted, chat, tmp_path):
    scripted.reply((200, chat("late"), 2.0))
    client = client_for(scripted.base_url, tmp_path, timeout=0.3, retries=1)
    with pytest.raises(LLMError, match="did not answer within 0.3 s"):
        client.complete(MESSAGES)
    assert client.usage.retries == 1


def test_a_server_that_keeps_failing_gives_up_with_one_message(scripted, tmp_path):
    scripted.reply((502, {"error": {"message": "bad gateway"}}))
    with pytest.raises(LLMError, match="kept failing .*after 4 tries"):
        client_for(scripted.base_url, tmp_path).complete(MESSAGES)


def test_an_unreachable_endpoint_says_to_check_the_server(tmp_path):
    from attnprog.synth.llm.server import free_port

    client = client_for(f"http://127.0.0.1:{free_port()}/v1", tmp_path, retries=1)
    with pytest.raises(LLMError, match="could not reach the LLM endpoint .* is the server running"):
        client.complete(MESSAGES)


def test_a_wrong_key_is_not_retried(scripted, tmp_path):
    scripted.reply((401, {"error": {"message": "Incorrect API key"}}))
    with pytest.raises(LLMError, match="refused the API key \\(401\\).*OPENAI_API_KEY"):
        client_for(scripted.base_url, tmp_path).complete(MESSAGES)
    assert len(scripted.requests) == 1


@pytest.mark.parametrize("status, detail", [
    (404, "The model `smol-x` does not exist"),
    (400, "Server is pinned to '/ckpt/smol'; requested 'smol-x'."),  # transformers serve's answer
])
def test_an_unknown_model_names_the_model(scripted, tmp_path, status, detail):
    scripted.reply((status, {"error": {"message": detail}}))
    with pytest.raises(LLMError, match="does not serve model 'smol-x'"):
        client_for(scripted.base_url, tmp_path, model="smol-x").complete(MESSAGES)


def test_another_4xx_rejects_only_that_request(scripted, tmp_path):
    scripted.reply((422, {"error": {"message": "prompt too long"}}))
    with pytest.raises(RequestRejected, match="prompt too long"):
        client_for(scripted.base_url, tmp_path).complete(MESSAGES)


def test_a_reply_without_choices_is_rejected(scripted, tmp_path):
    scripted.reply((200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []}))
    with pytest.raises(RequestRejected, match="no choices"):
        client_for(scripted.base_url, tmp_path).complete(MESSAGES)


def test_a_repeated_request_is_served_from_the_cache(scripted, chat, tmp_path):
    scripted.reply((200, chat("once", request_id="first")))
    client_for(scripted.base_url, tmp_path).complete(MESSAGES)
    again = client_for(scripted.base_url, tmp_path)  # a new run, same cache directory
    reply = again.complete(MESSAGES)
    assert reply.cached and reply.text == "once" and reply.request_id == "first"
    assert len(scripted.requests) == 1 and again.usage.requests == 0 and again.usage.cache_hits == 1


def test_changed_parameters_miss_the_cache(scripted, chat, tmp_path):
    scripted.reply((200, chat("a")))
    client_for(scripted.base_url, tmp_path, temperature=0.0).complete(MESSAGES)
    client_for(scripted.base_url, tmp_path, temperature=0.7).complete(MESSAGES)
    assert len(scripted.requests) == 2


def test_usage_is_counted_per_tag_and_in_total(scripted, chat, tmp_path):
    scripted.reply((200, chat("a", prompt_tokens=10, completion_tokens=5)))
    client = client_for(scripted.base_url, tmp_path)
    client.complete(MESSAGES, tag="L1H2")
    client.complete([{"role": "user", "content": "other"}], tag="L3H4")
    assert client.usage.total_tokens == 30
    assert client.usage.per_tag["L1H2"]["completion_tokens"] == 5
    assert client.usage.per_tag["L3H4"]["requests"] == 1


def test_the_token_cap_stops_new_requests_but_serves_cached_ones(scripted, chat, tmp_path):
    scripted.reply((200, chat("a", prompt_tokens=60, completion_tokens=40)))
    client = client_for(scripted.base_url, tmp_path, max_tokens_total=100)
    client.complete(MESSAGES)
    with pytest.raises(BudgetExhausted, match="token cap of 100"):
        client.complete([{"role": "user", "content": "more"}])
    assert client.complete(MESSAGES).cached
    assert len(scripted.requests) == 1


def test_openai_without_a_key_is_refused_before_any_request(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(LLMError, match="no API key"):
        ChatClient(LLMSettings(model="gpt-4o"))


def test_base_url_and_key_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    settings = LLMSettings(model="m").resolved()
    assert (settings.base_url, settings.api_key) == ("http://127.0.0.1:9/v1", "sk-test")
