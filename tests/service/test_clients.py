"""The client CLI (`grpc-router route`) and the Node example client against a live server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service.conftest import REPO, ROUTES, ServerProcess, make_config, start_server
from tests.service.fake_upstream import FakeUpstream

NODE_DIR = REPO / "examples" / "node"
ROUTE_NAMES = [r["name"] for r in ROUTES]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, arch_engine: dict[str, Any]
) -> Iterator[ServerProcess]:
    cfg = make_config(upstream.base_url, arch_engine, chain=["r500", "ok_b"])
    srv = start_server(tmp_path_factory.mktemp("clients"), cfg)
    yield srv
    assert srv.stop() == 0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "grpc_router.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_route_text(server: ServerProcess) -> None:
    out = _cli("route", "write a bash script", "--target", server.target, "--request-id", "c1")
    assert out.returncode == 0, out.stderr
    decision = json.loads(out.stdout)
    assert decision["request_id"] == "c1"
    assert decision["route"] in ROUTE_NAMES
    assert decision["model"] == "r500"
    assert [s["route"] for s in decision["scores"]] == [*ROUTE_NAMES, "other"]


def test_cli_route_file_with_route_override(server: ServerProcess, tmp_path: Path) -> None:
    conv = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "book a table for two"},
            {"role": "assistant", "content": "which restaurant?"},
            {"role": "user", "content": "the italian one"},
        ],
        "routes": [
            {"name": "restaurants", "description": "Booking restaurant tables."},
            {"name": "flights", "description": "Searching and booking flights."},
        ],
    }
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(conv))
    out = _cli("route", "--file", str(path), "--target", server.target)
    assert out.returncode == 0, out.stderr
    decision = json.loads(out.stdout)
    assert [s["route"] for s in decision["scores"]] == ["restaurants", "flights", "other"]


def test_cli_route_errors_say_what_to_do(server: ServerProcess, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"role": "robot", "content": "x"}]))
    out = _cli("route", "--file", str(bad), "--target", server.target)
    assert out.returncode != 0 and "messages[0].role must be one of" in out.stderr
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps([{"role": "assistant", "content": "x"}]))
    out = _cli("route", "--file", str(empty), "--target", server.target)
    assert out.returncode == 1 and "INVALID_ARGUMENT: messages:" in out.stderr
    out = _cli("route", "hi", "--target", "127.0.0.1:9", "--timeout", "3")
    assert out.returncode == 1
    assert "Is a server running at 127.0.0.1:9?" in out.stderr or "DEADLINE" in out.stderr


def _node(*args: str) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: install Node.js >= 18 to test the Node client")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("examples/node/node_modules is missing: run `make node`")
    return subprocess.run(
        [node, str(NODE_DIR / "client.js"), *args],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_node_client_route(server: ServerProcess) -> None:
    out = _node(
        "route", "translate hello into French", "--target", server.target, "--request-id", "node-1"
    )
    assert out.returncode == 0, out.stderr
    decision = json.loads(out.stdout)
    assert decision["request_id"] == "node-1"
    assert decision["route"] in ROUTE_NAMES
    assert decision["engine"] == "arch-router"


def test_node_client_dispatch_stream(server: ServerProcess) -> None:
    out = _node("stream", "tell me a joke", "--target", server.target)
    assert out.returncode == 0, out.stderr
    chunks = [json.loads(line) for line in out.stdout.splitlines()]
    assert "decision" in chunks[0] and chunks[0]["decision"]["route"] in ROUTE_NAMES
    text = "".join(c["delta"] for c in chunks[1:-1])
    assert text == "ok-b says: tell me a joke"
    end = chunks[-1]["end"]
    assert end["answered_by"] == "ok_b"
    assert [a["model"] for a in end["failed_attempts"]] == ["r500"]
