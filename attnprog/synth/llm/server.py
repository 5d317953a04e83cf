"""A local OpenAI-compatible server for a checkpoint directory: ``transformers serve`` on loopback.

Used by the end-to-end tests and the benchmark, and handy for trying LLM synthesis offline:
it starts ``transformers serve CHECKPOINT`` on a free port of 127.0.0.1 with the hub
offline, waits until the model answers a chat request, and stops the server afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from attnprog.errors import LLMError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_command(checkpoint: str | Path, port: int) -> list[str]:
    """The command line that serves ``checkpoint`` on 127.0.0.1:``port`` (CPU unless CUDA is there).

    It runs transformers' CLI with this interpreter, so the serving extra installed beside
    attnprog (in its virtual environment) is the one used.
    """
    args = ["serve", str(checkpoint), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if importlib.util.find_spec("transformers.cli.transformers") is not None:
        launcher = "import sys; from transformers.cli.transformers import main; sys.exit(main())"
        return [sys.executable, "-c", launcher, *args]
    executable = shutil.which("transformers")
    if executable is None:
        raise LLMError("no `transformers` command found: pip install 'transformers[serving]'")
    return [executable, *args]


@contextmanager
def local_server(checkpoint: str | Path, startup_timeout: float = 600.0, log_path: str | Path | None = None,
                 port: int = 0):
    """Run ``transformers serve`` for ``checkpoint`` on ``port`` (0: a free one); yields
    (base_url, model name). Stops it on exit."""
    if not (Path(checkpoint) / "config.json").is_file():
        raise LLMError(f"{checkpoint} is not a checkpoint directory (no config.json)")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise LLMError("`transformers serve` needs its serving extra: pip install "
                       "'transformers[serving]' (or `pip install -e .[serve]`)") from err
    port = port or free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("HF_HUB_CACHE", tempfile.mkdtemp(prefix="attnprog-hf-"))  # /v1/models scans it
    log = open(log_path or os.devnull, "wb")
    process = subprocess.Popen(serve_command(checkpoint, port), env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    base_url, model = f"http://127.0.0.1:{port}/v1", str(checkpoint)
    try:
        _wait_until_ready(process, base_url, model, startup_timeout)
        yield base_url, model
    finally:
        _stop(process)
        log.close()


def _wait_until_ready(process: subprocess.Popen, base_url: str, model: str, timeout: float) -> None:
    """Poll until a one-token chat request succeeds (the model is loaded), or fail clearly."""
    deadline = time.monotonic() + timeout
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 1}).encode()
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LLMError(f"`transformers serve` exited with status {process.returncode} before it "
                           "answered; run it by hand to see why")
        request = urllib.request.Request(f"{base_url}/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=max(1.0, deadline - time.monotonic())):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            time.sleep(1.0)
    raise LLMError(f"`transformers serve` did not answer within {timeout:g} s")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=15)
