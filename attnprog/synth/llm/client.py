"""The chat client: any OpenAI-compatible endpoint, with retries, a reply cache, usage and a cost cap.

Every request goes through :class:`ChatClient.complete`: a cached reply is returned without
touching the network; otherwise the request waits for one of ``concurrency`` slots, is
retried with exponential backoff on 429, 5xx, timeouts and refused connections, and its
reply is cached before it is returned. Endpoint problems that no retry fixes (a wrong key,
an unknown model, a server that never answers) raise :class:`LLMError` with what to do;
a problem with one request only raises :class:`RequestRejected`, which callers record and
get past. Once ``max_tokens_total`` tokens are spent, new requests raise
:class:`BudgetExhausted` (replies already cached are still served).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from attnprog.errors import LLMError
from attnprog.synth.llm.cache import ReplyCache, request_key

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class RequestRejected(LLMError):
    """The endpoint refused or garbled this one request (the next may succeed)."""


class BudgetExhausted(LLMError):
    """The run's token cap (``max_tokens_total``) is spent; no new request is sent."""


@dataclass
class LLMSettings:
    """Where to send requests and how. Empty ``base_url``/``api_key`` fall back to
    ``$OPENAI_BASE_URL``/``$OPENAI_API_KEY``."""

    model: str = ""
    base_url: str = ""
    api_key: str = ""
    temperature: float = 0.0
    max_tokens: int = 1024  # per reply
    max_tokens_total: int = 0  # cost cap for the whole run, prompt + completion (0: none)
    concurrency: int = 4
    timeout: float = 600.0  # seconds per request (a small model on a busy CPU takes minutes)
    retries: int = 4  # further tries after the first, on 429, 5xx, timeouts, refused connections
    backoff: float = 1.0  # seconds before the first retry, doubled each time (with jitter)
    cache_dir: str = ""  # "" : the default reply cache directory
    use_cache: bool = True

    def resolved(self) -> LLMSettings:
        """A copy with the environment's defaults filled in; LLMError when something is missing."""
        base_url = (self.base_url or os.environ.get("OPENAI_BASE_URL", "") or DEFAULT_BASE_URL).rstrip("/")
        api_key = self.api_key or os.environ.get("OPENAI_API_KEY", "")
        if not self.model:
            raise LLMError("no LLM model named: pass --model (the name the endpoint serves)")
        if not api_key:
            if base_url == DEFAULT_BASE_URL:
                raise LLMError("no API key for OpenAI: set OPENAI_API_KEY or pass --api-key "
                               "(or point --base-url / OPENAI_BASE_URL at a local server)")
            api_key = "unused"  # local servers ignore it, the openai client insists on one
        return LLMSettings(**{**asdict(self), "base_url": base_url, "api_key": api_key})

    def request_params(self) -> dict:
        """The parameters that change a reply (part of the cache key)."""
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}


@dataclass
class Reply:
    """One completion: its text, why it stopped, its token usage and where it came from."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    request_id: str
    model: str
    key: str
    cached: bool = False

    @property
    def truncated(self) -> bool:
        """True when the reply was cut off by the per-reply token limit."""
        return self.finish_reason == "length"


@dataclass
class Usage:
    """Requests and tokens of a run, in total and per tag (a head's label)."""

    requests: int = 0  # sent to the endpoint
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    per_tag: dict = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, reply: Reply, tag: str) -> None:
        entry = self.per_tag.setdefault(tag, {"requests": 0, "cache_hits": 0, "prompt_tokens": 0,
                                              "completion_tokens": 0})
        if reply.cached:
            self.cache_hits += 1
            entry["cache_hits"] += 1
            return
        self.requests += 1
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens
        entry["requests"] += 1
        entry["prompt_tokens"] += reply.prompt_tokens
        entry["completion_tokens"] += reply.completion_tokens

    def to_dict(self) -> dict:
        return {**asdict(self), "total_tokens": self.total_tokens}


class ChatClient:
    """Chat completions against one endpoint and model, cached, retried, bounded and metered."""

    def __init__(self, settings: LLMSettings, *, sleep: Callable[[float], None] = time.sleep,
                 openai_client=None):
        self.settings = settings.resolved()
        self.usage = Usage()
        self.cache = ReplyCache(self.settings.cache_dir or None) if self.settings.use_cache else None
        self._sleep = sleep
        self._client = openai_client
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max(1, self.settings.concurrency))

    @property
    def model(self) -> str:
        return self.settings.model

    def _openai(self):
        if self._client is None:
            from openai import OpenAI

            self._client = OpenAI(base_url=self.settings.base_url, api_key=self.settings.api_key,
                                  max_retries=0, timeout=self.settings.timeout)
        return self._client

    def key(self, messages: list[dict]) -> str:
        """The cache key of ``messages`` sent with this client's model and parameters."""
        return request_key(self.settings.model, messages, self.settings.request_params())

    def complete(self, messages: list[dict], tag: str = "") -> Reply:
        """The reply to ``messages``: from the cache when there, else from the endpoint."""
        key = self.key(messages)
        record = self.cache.get(key) if self.cache else None
        if record is not None:
            reply = Reply(**{**record, "key": key, "cached": True})
        else:
            with self._lock:
                cap = self.settings.max_tokens_total
                if cap and self.usage.total_tokens >= cap:
                    raise BudgetExhausted(f"the token cap of {cap} (--max-tokens-total) is spent; "
                                          "what was done so far is kept; raise the cap to go on")
            with self._slots:
                reply = self._send(messages, key)
            if self.cache:
                record = {k: v for k, v in asdict(reply).items() if k not in ("key", "cached")}
                self.cache.put(key, record)
        with self._lock:
            self.usage.add(reply, tag)
        return reply

    def _send(self, messages: list[dict], key: str) -> Reply:
        """One request with retries; maps the openai client's errors to the package's."""
        import openai

        settings = self.settings
        for attempt in range(settings.retries + 1):
            try:
                response = self._openai().chat.completions.create(
                    model=settings.model, messages=messages, **settings.request_params())
                return _to_reply(response, key)
            except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                    openai.APIConnectionError) as err:
                if attempt == settings.retries:
                    raise LLMError(_give_up_message(err, settings)) from err
                with self._lock:
                    self.usage.retries += 1
                self._sleep(backoff_seconds(attempt, settings.backoff))
            except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
                raise LLMError(
                    f"the endpoint {settings.base_url} refused the API key ({err.status_code}): "
                    "set OPENAI_API_KEY or pass --api-key with a valid key") from err
            except openai.APIStatusError as err:
                detail = _detail(err)
                names_model = "model" in detail.lower() or f"'{settings.model}'" in detail
                if err.status_code == 404 or (err.status_code == 400 and names_model):
                    raise LLMError(
                        f"the endpoint {settings.base_url} does not serve model {settings.model!r} "
                        f"({err.status_code}: {detail}): pass --model with a name it serves") from err
                raise RequestRejected(
                    f"the endpoint rejected a request ({err.status_code}: {detail})") from err
            except openai.APIResponseValidationError as err:
                raise RequestRejected(f"the endpoint's reply is not a chat completion ({err})") from err
        raise AssertionError("unreachable")


def backoff_seconds(attempt: int, base: float, cap: float = 60.0) -> float:
    """Wait before retry ``attempt`` (0-based): ``base * 2**attempt``, capped, times 1 to 1.25
    so that parallel requests do not retry in lockstep."""
    return min(cap, base * 2**attempt) * (1.0 + 0.25 * random.random())


def _to_reply(response, key: str) -> Reply:
    choices = getattr(response, "choices", None) or []
    if not choices or getattr(choices[0], "message", None) is None:
        raise RequestRejected("the endpoint answered with no choices; is it a chat-completions API?")
    usage = getattr(response, "usage", None)
    return Reply(
        text=choices[0].message.content or "",
        finish_reason=str(choices[0].finish_reason or ""),
        prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        request_id=str(getattr(response, "_request_id", None) or getattr(response, "id", "") or ""),
        model=str(getattr(response, "model", "") or ""),
        key=key,
    )


def _detail(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") or inner.get("detail") if isinstance(inner, dict) else inner
        if message:
            return str(message)[:300]
    return str(getattr(err, "message", err))[:300]


def _give_up_message(err, settings: LLMSettings) -> str:
    import openai

    tries = settings.retries + 1
    if isinstance(err, openai.APITimeoutError):
        return (f"the endpoint {settings.base_url} did not answer within {settings.timeout:g} s, "
                f"{tries} times: raise --timeout or check the server")
    if isinstance(err, openai.APIConnectionError):
        return (f"could not reach the LLM endpoint at {settings.base_url} ({tries} tries): is the "
                "server running? Pass --base-url or set OPENAI_BASE_URL")
    if isinstance(err, openai.RateLimitError):
        return (f"the endpoint kept answering 429 (rate limited) after {tries} tries: lower "
                "--concurrency or wait, then re-run (finished replies are cached)")
    return (f"the endpoint kept failing ({err.status_code}: {_detail(err)}) after {tries} tries; "
            "re-run later (finished replies are cached)")
