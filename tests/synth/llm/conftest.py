"""A scripted OpenAI-compatible HTTP server on loopback, for unit tests of error handling.

It answers each POST to /v1/chat/completions with the next scripted (status, body, delay)
and records every request body. The end-to-end test uses the real `transformers serve`.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


def chat_body(content: str, finish_reason: str = "stop", prompt_tokens: int = 10,
              completion_tokens: int = 5, request_id: str = "req-1") -> dict:
    """A chat-completion body as OpenAI-compatible servers send it."""
    return {
        "id": request_id, "object": "chat.completion", "created": 0, "model": "scripted",
        "choices": [{"index": 0, "finish_reason": finish_reason,
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


class ScriptedServer:
    def __init__(self):
        self.script = []  # (status, body, delay seconds); the last entry repeats
        self.requests = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server.lock:
                    server.requests.append(body)
                    script = server.script
                    status, reply, delay = script.pop(0) if len(script) > 1 else script[0]
                time.sleep(delay)
                data = json.dumps(reply(body) if callable(reply) else reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def reply(self, *entries):
        """Queue (status, body) or (status, body, delay) answers."""
        self.script.extend(e if len(e) == 3 else (*e, 0.0) for e in entries)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    server = ScriptedServer()
    yield server
    server.close()


@pytest.fixture
def chat():
    """``chat(content, finish_reason=...)``: a chat-completion body."""
    return chat_body
