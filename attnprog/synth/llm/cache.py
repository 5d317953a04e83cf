"""On-disk cache of LLM replies, keyed by a SHA-256 of (model, messages, parameters).

One small JSON file per request, written atomically, so a killed run resumes without
paying for a reply twice and a half-written file never poisons a later run. Location: the
``directory`` argument, else ``$ATTNPROG_CACHE_DIR/llm``, else the user cache dir + ``llm``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from attnprog.cachedir import cache_root


def default_llm_cache_dir() -> Path:
    """``llm/`` under attnprog's cache root (``$ATTNPROG_CACHE_DIR`` or the user cache dir)."""
    return cache_root() / "llm"


def request_key(model: str, messages: list[dict], params: dict) -> str:
    """SHA-256 (hex) of the request: the same model, messages and parameters give the same key."""
    canonical = json.dumps({"model": model, "messages": messages, "params": params},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ReplyCache:
    """Replies stored as ``<root>/<key[:2]>/<key>.json``; unreadable entries count as misses."""

    def __init__(self, directory: str | Path | None = None):
        self.root = Path(directory).expanduser() if directory else default_llm_cache_dir()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, key: str, record: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
        tmp.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)
