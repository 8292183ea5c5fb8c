"""A real OpenAI-compatible HTTP server on loopback for the service tests.

The upstream `model` name picks the behaviour, so a config can mix healthy and broken models:
  "ok-<anything>"   answers (JSON, or SSE when "stream": true) with "<model> says: <last user text>"
  "fail-429"        HTTP 429;   "fail-500" HTTP 500;   "fail-400" HTTP 400
  "hang"            accepts the request and never answers (records when the client goes away)
  "drop"            closes the connection without a response
  "drop-mid"        streams one token, then closes the connection
  "slow-<ms>"       like ok, but waits <ms> before answering
  "echo-<status>"   HTTP <status> whose error body quotes the last user text (as real APIs do)
  "retry-after-<s>" HTTP 429 with `Retry-After: <s>` (seconds)
  "retry-date-<s>"  HTTP 429 with `Retry-After` an HTTP date <s> seconds ahead
  "reset"           resets the connection (TCP RST) without a response
Any other name behaves as set with `FakeUpstream.behave(name, behaviour)` (switchable at run
time), else as "ok". Every request is recorded (model, headers, body) for assertions.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    model: str
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class UpstreamLog:
    requests: list[Recorded] = field(default_factory=list)
    hangs_abandoned: int = 0
    behaviours: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def models(self) -> list[str]:
        with self.lock:
            return [r.model for r in self.requests]

    def count(self, model: str) -> int:
        """Requests received for the upstream model name `model`."""
        with self.lock:
            return sum(1 for r in self.requests if r.model == model)

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()
            self.hangs_abandoned = 0


def _last_user(body: dict[str, Any]) -> str:
    users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
    return str(users[-1]) if users else ""


def _answer(model: str, body: dict[str, Any]) -> str:
    return f"{model} says: {_last_user(body)}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        model = str(body.get("model", ""))
        log = self.server.log
        with log.lock:
            log.requests.append(
                Recorded(model, body, {k.lower(): v for k, v in self.headers.items()})
            )
            how = log.behaviours.get(model, model)
        if not self.path.endswith("/chat/completions"):
            self._json(404, {"error": {"message": "not found"}})
        elif how.startswith("fail-"):
            status = int(how.removeprefix("fail-"))
            self._json(status, {"error": {"message": f"injected {status}"}})
        elif how.startswith("echo-"):
            status = int(how.removeprefix("echo-"))
            message = f"cannot process this prompt: {_last_user(body)}"
            self._json(status, {"error": {"message": message}})
        elif how.startswith("retry-after-"):
            wait = how.removeprefix("retry-after-")
            self._json(429, {"error": {"message": "slow down"}}, {"retry-after": wait})
        elif how.startswith("retry-date-"):
            when = formatdate(time.time() + int(how.removeprefix("retry-date-")), usegmt=True)
            self._json(429, {"error": {"message": "slow down"}}, {"retry-after": when})
        elif how == "hang":
            self._hang()
        elif how == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif how == "reset":
            self.close_connection = True
            # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        else:
            if how.startswith("slow-"):
                time.sleep(int(how.removeprefix("slow-")) / 1000)
            if body.get("stream"):
                self._stream(model, body, how)
            else:
                self._complete(model, body)

    def _json(
        self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _complete(self, model: str, body: dict[str, Any]) -> None:
        text = _answer(model, body)
        self._json(
            200,
            {
                "id": "cmpl-1",
                "object": "chat.completion",
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
            },
        )

    def _event(self, payload: dict[str, Any] | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _stream(self, model: str, body: dict[str, Any], how: str) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        self.close_connection = True
        words = _answer(model, body).split(" ")
        for i, word in enumerate(words):
            token = word if i == 0 else " " + word
            self._event({"choices": [{"index": 0, "delta": {"content": token}}]})
            if how == "drop-mid":
                self.connection.shutdown(socket.SHUT_RDWR)
                return
        self.wfile.write(b": keep-alive comment\n\n")
        self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        usage = {
            "prompt_tokens": 7,
            "completion_tokens": len(words),
            "total_tokens": 7 + len(words),
        }
        self._event({"choices": [], "usage": usage})
        self._event("[DONE]")

    def _hang(self) -> None:
        # Wait until the client closes its side (readable + EOF), up to a minute.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.connection], [], [], 0.1)
            if ready and not self.connection.recv(1, socket.MSG_PEEK):
                with self.server.log.lock:
                    self.server.log.hangs_abandoned += 1
                break
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    log: UpstreamLog


class FakeUpstream:
    """Start with `with FakeUpstream() as up: up.base_url ...`."""

    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.log = UpstreamLog()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    @property
    def log(self) -> UpstreamLog:
        return self._server.log

    def behave(self, model: str, behaviour: str) -> None:
        """Make upstream model name `model` behave like `behaviour` (a name above) from the next
        request on: an upstream that can be switched from failing to healthy."""
        with self._server.log.lock:
            self._server.log.behaviours[model] = behaviour

    def __enter__(self) -> FakeUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
