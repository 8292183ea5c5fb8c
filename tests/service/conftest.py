"""Service test harness: a real `grpc-router serve` subprocess on a free loopback port, a real
fake OpenAI-compatible upstream, and helpers to reconfigure (SIGHUP) and stop (SIGTERM) it."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_router.v1 import router_pb2 as pb
from grpc_router.v1 import router_pb2_grpc as pb_grpc
from tests.service.fake_upstream import FakeUpstream

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0

# Behaviour of each upstream model key (see fake_upstream for what the names do).
UPSTREAM_MODELS = {
    "ok_a": "ok-a",
    "ok_b": "ok-b",
    "ok_default": "ok-default",
    "r429": "fail-429",
    "r500": "fail-500",
    "r400": "fail-400",
    "hang": "hang",
    "drop": "drop",
    "drop_mid": "drop-mid",
    "slow": "slow-1500",
}

ROUTES = [
    {
        "name": "code_generation",
        "description": "Writing new code, functions or scripts from a specification.",
        "examples": ["write a python function that reverses a list"],
    },
    {
        "name": "translation",
        "description": "Translating text between human languages.",
        "examples": ["translate good morning into French"],
    },
    {
        "name": "general_chat",
        "description": "Greetings, small talk and anything else.",
        "examples": ["hello, how are you"],
    },
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_config(
    upstream_url: str,
    engine: dict[str, Any],
    *,
    chain: list[str] | None = None,
    default_model: str = "ok_default",
    **sections: Any,
) -> dict[str, Any]:
    """A config where every route uses `chain`, so dispatch outcomes do not depend on which
    route the (random-weight) engine picks."""
    chain = chain or ["ok_a"]
    models: dict[str, Any] = {
        key: {"base_url": upstream_url, "model": name, "timeout_s": 2.0}
        for key, name in UPSTREAM_MODELS.items()
    }
    # Nothing listens on port 9 of loopback: connection refused.
    models["refused"] = {"base_url": "http://127.0.0.1:9/v1", "model": "x", "timeout_s": 2.0}
    models["hang"]["timeout_s"] = 30.0
    cfg: dict[str, Any] = {
        "routes": [{**r, "models": chain} for r in ROUTES],
        "models": models,
        "default_route": "general_chat",
        "default_model": default_model,
        "engine": engine,
        "server": {"host": "127.0.0.1", "port": 0, "grace_s": 10},
        "metrics": {"host": "127.0.0.1", "port": free_port()},
        "logging": {"level": "info"},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


class ServerProcess:
    """`grpc-router serve` in a subprocess; its JSON log lines are collected."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "grpc_router.cli", "serve", "--config", str(config_path)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0
        self.metrics_port = 0
        self._channel: grpc.Channel | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.append(line)
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                self.lines.append(event)

    def wait_for(
        self,
        pred: Callable[[dict[str, Any]], bool],
        timeout: float = START_TIMEOUT_S,
        start: int = 0,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.lines[start:]:
                if pred(event):
                    return event
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no matching log line; server output:\n{''.join(self.raw[-40:])}")

    def wait_event(
        self, name: str, timeout: float = START_TIMEOUT_S, start: int = 0
    ) -> dict[str, Any]:
        return self.wait_for(lambda e: e.get("event") == name, timeout, start)

    def start(self, *, wait_serving: bool = True) -> ServerProcess:
        listening = self.wait_event("listening")
        self.port = int(listening["port"])
        self.metrics_port = int(listening.get("metrics_port") or 0)
        if wait_serving:
            self.wait_event("serving")
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.target)
        return self._channel

    @property
    def stub(self) -> pb_grpc.RouterServiceStub:
        return pb_grpc.RouterServiceStub(self.channel)

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)

    def reload(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """Write `cfg`, send SIGHUP, return the server's 'reloaded' or 'reload refused' line."""
        mark = len(self.lines)
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.proc.send_signal(signal.SIGHUP)
        return self.wait_for(
            lambda e: e.get("event") in ("reloaded", "reload refused; keeping the running config"),
            timeout=30,
            start=mark,
        )

    def stop(self, timeout: float = 60) -> int:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return int(self.proc.returncode)


def start_server(
    tmp: Path, cfg: dict[str, Any], *, env: dict[str, str] | None = None, wait_serving: bool = True
) -> ServerProcess:
    path = tmp / "routes.yaml"
    path.write_text(yaml.safe_dump(cfg))
    server = ServerProcess(path, env)
    try:
        return server.start(wait_serving=wait_serving)
    except BaseException:
        server.stop(5)
        raise


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=text)


def route_request(*texts: str, **kw: Any) -> pb.RouteRequest:
    return pb.RouteRequest(messages=[user(t) for t in texts], **kw)


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


@pytest.fixture(scope="session")
def arch_engine(tiny_artifacts: Path) -> dict[str, Any]:
    """The `engine:` section running the real Arch-Router engine on the tiny artifact."""
    return {"kind": "arch-router", "arch_router_artifact": str(tiny_artifacts)}
