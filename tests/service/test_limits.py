"""Client-controlled work is bounded: examples per route and characters per example, and a
request's own route names never become metric label values."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from grpc_router.v1 import router_pb2 as pb
from tests.service.conftest import ServerProcess, make_config, start_server
from tests.service.fake_upstream import FakeUpstream


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, encoder_artifact: Path
) -> Iterator[ServerProcess]:
    engine: dict[str, Any] = {"kind": "encoder", "encoder_artifact": str(encoder_artifact)}
    cfg = make_config(
        upstream.base_url, engine, limits={"max_examples": 4, "max_example_chars": 40}
    )
    srv = start_server(tmp_path_factory.mktemp("limits"), cfg)
    yield srv
    assert srv.stop() == 0


def _route(server: ServerProcess, routes: list[pb.RouteDefinition]) -> pb.RouteResponse:
    req = pb.RouteRequest(
        messages=[pb.Message(role=pb.ROLE_USER, content="book me a table for two")],
        routes=routes,
    )
    reply: pb.RouteResponse = server.stub.Route(req, timeout=30)
    return reply


@pytest.mark.parametrize(
    ("examples", "field"),
    [
        (["a", "b", "c", "d", "e"], "routes[1].examples"),
        (["fine", "x" * 41], "routes[1].examples[1]"),
    ],
)
def test_override_examples_are_bounded(
    server: ServerProcess, examples: list[str], field: str
) -> None:
    routes = [
        pb.RouteDefinition(name="dining", description="Restaurant bookings."),
        pb.RouteDefinition(name="travel", description="Trips.", examples=examples),
    ]
    with pytest.raises(grpc.RpcError) as err:
        _route(server, routes)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(f"{field}: ")


def test_request_defined_routes_share_one_label(server: ServerProcess) -> None:
    for i in range(40):
        routes = [
            pb.RouteDefinition(name=f"dining_{i}", description="Restaurant table bookings."),
            pb.RouteDefinition(name=f"weather_{i}", description="Weather forecasts."),
        ]
        assert _route(server, routes).route.startswith("dining_")
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    decisions = [
        line for line in body.splitlines() if line.startswith("grpc_router_decisions_total{")
    ]
    assert not any("dining_" in line for line in body.splitlines())
    assert any('route="request_defined"' in line for line in decisions)
    assert len(decisions) <= 4  # configured routes and the default route at most
