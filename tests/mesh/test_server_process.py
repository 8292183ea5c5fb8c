"""ext_proc through the real server process: `grpc-router serve --config` with ext_proc enabled,
checked as a mesh would: gRPC health of the ext_proc service, then Envoy-like Process streams."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_router.serving.extproc import SERVICE_NAME
from tests.mesh.harness import (
    ProcessStream,
    header_mutations,
    http_body,
    http_headers,
    two_route_config,
)

CLI = Path(sys.executable).parent / "grpc-router"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = _free_port()
    config = two_route_config(
        engine={
            "kind": "arch-router",
            "arch_router_artifact": str(tiny_artifacts),
            "arch_router": {"variant": "int4", "provider": "cpu", "intra_op_threads": 1},
        },
        server={"host": "127.0.0.1", "port": port},
        metrics={"port": None},
        ext_proc={"enabled": True, "rewrite_model": True},
    )
    path = tmp_path_factory.mktemp("serve") / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = path.with_suffix(".log").open("w+")
    proc = subprocess.Popen(
        [str(CLI), "serve", "--config", str(path)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.seek(0)
        assert code == 0, log.read()[-4000:]


def _wait_serving(channel: grpc.Channel, service: str, timeout: float = 180) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        try:
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
        except grpc.RpcError:
            status = None
        if status == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.2)
    raise AssertionError(f"{service!r} not SERVING after {timeout}s (last: {status})")


def test_server_serves_ext_proc_and_its_health(served: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{served}") as channel:
        # What a Kubernetes gRPC probe and Envoy's gRPC health check ask.
        _wait_serving(channel, SERVICE_NAME)
        _wait_serving(channel, "")

        body = {"model": "auto", "messages": [{"role": "user", "content": "Write a bash loop."}]}
        stream = ProcessStream(channel)
        stream.send(http_headers("/v1/chat/completions"))
        common = stream.send(http_body(body)).request_body.response
        stream.finish()
        headers = header_mutations(common)
        assert headers["x-router-route"] in {"code_generation", "general_chat"}
        expected_model = {"code_generation": "coder", "general_chat": "general"}
        assert headers["x-router-model"] == expected_model[headers["x-router-route"]]
        rewritten = json.loads(common.body_mutation.body)
        assert rewritten["model"] in {"qwen2.5-coder-7b", "qwen2.5-7b"}
        assert headers["content-length"] == str(len(common.body_mutation.body))
        assert common.clear_route_cache

        stream = ProcessStream(channel)
        response = stream.send(http_headers("/healthz", method="GET"))
        stream.finish()
        assert not response.request_headers.response.HasField("header_mutation")
