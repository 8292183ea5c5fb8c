"""Process lifecycle: config errors at start-up, SIGTERM draining, TLS and mTLS."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_router.v1 import router_pb2 as pb
from grpc_router.v1 import router_pb2_grpc as pb_grpc
from tests.service.conftest import REPO, make_config, route_request, start_server
from tests.service.fake_upstream import FakeUpstream


def _serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "grpc_router.cli", "serve", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bad_config_lists_every_error_with_file_and_key(tmp_path: Path) -> None:
    cfg: dict[str, Any] = {
        "routes": [
            {"name": "Code Gen", "description": "code", "models": ["gpt"]},
            {"name": "chat", "description": "", "models": ["nope"]},
            {"name": "chat", "description": "chat", "models": ["gpt"]},
        ],
        "models": {"gpt": {"base_url": "api.example.com", "model": "x", "timeout_s": -1}},
        "default_route": "chat",
        "default_model": "missing",
        "server": {"port": 70000, "grace_s": "soon"},
        "limits": {"max_mesages": 3},
        "engine": {"kind": "quantum"},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = _serve(path)
    assert result.returncode == 2
    err = result.stderr
    for key in (
        "routes.0.name",
        "routes.1.description",
        "routes.1.models.0: unknown model 'nope'",
        "routes.2.name: duplicate route name 'chat'",
        "models.gpt.base_url",
        "models.gpt.timeout_s",
        "default_model: unknown model 'missing'",
        "server.port",
        "server.grace_s",
        "limits.max_mesages",
        "engine.kind",
    ):
        assert f"{path}: {key}" in err, key
    assert "Traceback" not in err


def test_unreadable_and_malformed_config(tmp_path: Path) -> None:
    result = _serve(tmp_path / "absent.yaml")
    assert result.returncode == 2 and "absent.yaml: (file): cannot read" in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("routes:\n  - name: a\n   description: [unclosed\n")
    result = _serve(broken)
    assert result.returncode == 2 and "YAML syntax error" in result.stderr
    assert "line " in result.stderr


def test_sigterm_drains_in_flight_calls(
    tmp_path: Path, upstream: FakeUpstream, arch_engine: dict[str, Any]
) -> None:
    # 6 dispatches fill the server: the next routing call is refused (health and ListRoutes
    # stay outside the limit).
    server_cfg = {"grace_s": 20, "max_concurrent_rpcs": 6}
    cfg = make_config(upstream.base_url, arch_engine, chain=["slow"], server=server_cfg)
    server = start_server(tmp_path, cfg)
    health = health_pb2_grpc.HealthStub(server.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

    upstream.log.clear()
    results: list[Any] = []

    def call(i: int) -> None:
        try:
            r = server.stub.Dispatch(
                pb.DispatchRequest(route=route_request(f"in flight {i}")), timeout=60
            )
            results.append(r)
        except grpc.RpcError as e:
            results.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(upstream.log.requests) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(upstream.log.requests) == 6, "calls did not reach the upstream"
    with pytest.raises(grpc.RpcError) as full:
        server.stub.Route(route_request("one too many"), timeout=10)
    assert full.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.stub.ListRoutes(pb.ListRoutesRequest(), timeout=10).routes

    server.proc.send_signal(15)
    # Health flips at once, while the calls are still in flight.
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    # New calls are refused (on a fresh connection, as a new client would make).
    with grpc.insecure_channel(server.target) as fresh, pytest.raises(grpc.RpcError) as err:
        pb_grpc.RouterServiceStub(fresh).Route(route_request("late"), timeout=5)
    # UNAVAILABLE from the interceptor or gRPC's stopped server; a call that races the start of
    # gRPC's stop can be cancelled by gRPC core before any handler sees it.
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)

    for t in threads:
        t.join(60)
    assert all(isinstance(r, pb.DispatchResponse) for r in results), results
    assert sorted(r.content for r in results) == sorted(
        f"slow-1500 says: in flight {i}" for i in range(6)
    )
    assert server.proc.wait(60) == 0
    server.stop()
    assert any(e.get("event") == "stopped" for e in server.lines)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("certs")
    p = {
        n: d / n
        for n in (
            "ca.key",
            "ca.pem",
            "server.key",
            "server.pem",
            "client.key",
            "client.pem",
            "other-ca.key",
            "other-ca.pem",
            "rogue.key",
            "rogue.pem",
        )
    }
    ext = d / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for ca in ("ca", "other-ca"):
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN=test {ca}",
            "-keyout",
            str(p[f"{ca}.key"]),
            "-out",
            str(p[f"{ca}.pem"]),
        )
    for leaf, ca in (("server", "ca"), ("client", "ca"), ("rogue", "other-ca")):
        csr = d / f"{leaf}.csr"
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={leaf}",
            "-keyout",
            str(p[f"{leaf}.key"]),
            "-out",
            str(csr),
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(p[f"{ca}.pem"]),
            "-CAkey",
            str(p[f"{ca}.key"]),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(ext),
            "-out",
            str(p[f"{leaf}.pem"]),
        )
    return p


def test_mtls(
    tmp_path: Path, upstream: FakeUpstream, arch_engine: dict[str, Any], certs: dict[str, Path]
) -> None:
    tls = {"cert": "certs/server.pem", "key": "certs/server.key", "client_ca": "certs/ca.pem"}
    (tmp_path / "certs").mkdir()
    for name in ("server.pem", "server.key", "ca.pem"):
        (tmp_path / "certs" / name).write_bytes(certs[name].read_bytes())
    cfg = make_config(upstream.base_url, arch_engine, server={"tls": tls, "grace_s": 1})
    server = start_server(tmp_path, cfg)
    listening = server.wait_event("listening")
    assert listening["tls"] is True and listening["mtls"] is True
    try:

        def route_with(creds: grpc.ChannelCredentials) -> pb.RouteResponse:
            with grpc.secure_channel(server.target, creds) as ch:
                return pb_grpc.RouterServiceStub(ch).Route(route_request("hi"), timeout=20)

        ok = grpc.ssl_channel_credentials(
            certs["ca.pem"].read_bytes(),
            certs["client.key"].read_bytes(),
            certs["client.pem"].read_bytes(),
        )
        assert route_with(ok).route
        for creds in (
            grpc.ssl_channel_credentials(certs["ca.pem"].read_bytes()),  # no client cert
            grpc.ssl_channel_credentials(
                certs["ca.pem"].read_bytes(),
                certs["rogue.key"].read_bytes(),
                certs["rogue.pem"].read_bytes(),
            ),  # client cert from an untrusted CA
        ):
            with pytest.raises(grpc.RpcError) as err:
                route_with(creds)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(server.target) as plain, pytest.raises(grpc.RpcError):
            pb_grpc.RouterServiceStub(plain).Route(route_request("hi"), timeout=5)
        # The client CLI speaks mTLS too.
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_router.cli",
                "route",
                "hello",
                "--target",
                server.target,
                "--ca",
                str(certs["ca.pem"]),
                "--cert",
                str(certs["client.pem"]),
                "--key",
                str(certs["client.key"]),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert '"route"' in out.stdout
    finally:
        assert server.stop() == 0


def test_missing_tls_file_is_a_config_error(tmp_path: Path, upstream: FakeUpstream) -> None:
    cfg = make_config(
        upstream.base_url,
        {"kind": "encoder"},
        server={"tls": {"cert": "nope.pem", "key": "nope.key"}},
    )
    path = tmp_path / "tls.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = _serve(path)
    assert result.returncode == 2
    assert f"{path}: server.tls.cert: file not found" in result.stderr
    assert f"{path}: server.tls.key: file not found" in result.stderr


def test_engine_that_cannot_load(
    tmp_path: Path, upstream: FakeUpstream, arch_engine: dict[str, Any]
) -> None:
    """A corrupt artifact: health stays NOT_SERVING, Route fails open to the default route, and
    fail-closed answers UNAVAILABLE."""
    broken = tmp_path / "broken-artifact"
    shutil.copytree(arch_engine["arch_router_artifact"], broken)
    for model in broken.rglob("*.onnx"):
        model.write_bytes(b"not an onnx model")
    engine = {**arch_engine, "arch_router_artifact": str(broken)}
    cfg = make_config(upstream.base_url, engine, server={"grace_s": 1})
    server = start_server(tmp_path, cfg, wait_serving=False)
    try:
        server.wait_event("engine failed to start; health stays NOT_SERVING")
        assert server.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        resp = server.stub.Route(route_request("write some code"), timeout=20)
        assert resp.fallback_used and resp.fallback_reason == pb.FALLBACK_REASON_ENGINE_ERROR
        assert resp.route == "general_chat" and resp.model == "ok_a" and resp.fallback_detail
        answer = server.stub.Dispatch(pb.DispatchRequest(route=route_request("hi")), timeout=20)
        assert answer.answered_by == "ok_a" and answer.decision.fallback_used
        cfg["routing"] = {"fail_open": False}
        assert server.reload(cfg)["event"] == "reloaded"
        with pytest.raises(grpc.RpcError) as err:
            server.stub.Route(route_request("write some code"), timeout=20)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        assert server.stop() == 0


def test_port_in_use_says_what_to_do(
    tmp_path: Path, upstream: FakeUpstream, arch_engine: dict[str, Any]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = make_config(upstream.base_url, arch_engine, server={"port": port})
        path = tmp_path / "busy.yaml"
        path.write_text(yaml.safe_dump(cfg))
        result = _serve(path)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "change server.port" in result.stderr
