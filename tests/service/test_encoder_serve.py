"""The server with the encoder engine (the offline default of `make serve`): a real MiniLM
artifact behind the same gRPC contract."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from grpc_router.v1 import router_pb2 as pb
from tests.service.conftest import ServerProcess, make_config, route_request, start_server
from tests.service.fake_upstream import FakeUpstream


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, encoder_artifact: Path
) -> Iterator[ServerProcess]:
    engine: dict[str, Any] = {"kind": "encoder", "encoder_artifact": str(encoder_artifact)}
    cfg = make_config(upstream.base_url, engine, chain=["ok_a"])
    srv = start_server(tmp_path_factory.mktemp("encoder"), cfg)
    yield srv
    assert srv.stop() == 0


@pytest.mark.parametrize(
    ("text", "route"),
    [
        ("Translate 'where is the train station' into French.", "translation"),
    ],
)
def test_encoder_routes_clear_requests(server: ServerProcess, text: str, route: str) -> None:
    resp = server.stub.Route(route_request(text), timeout=30)
    assert resp.engine == "encoder"
    assert resp.route == route and not resp.fallback_used
    assert sum(s.probability for s in resp.scores) == pytest.approx(1.0, abs=1e-3)
    assert server.stub.ListRoutes(pb.ListRoutesRequest(), timeout=10).engine == "encoder"


def test_encoder_with_request_route_set(server: ServerProcess) -> None:
    routes = [
        pb.RouteDefinition(name="weather", description="Questions about the weather forecast."),
        pb.RouteDefinition(name="music", description="Playing songs or finding music."),
    ]
    resp = server.stub.Route(
        route_request("Will it rain in Paris tomorrow?", routes=routes), timeout=30
    )
    assert resp.engine_route == "weather" and resp.model == "ok_default"
    assert [s.route for s in resp.scores] == ["weather", "music", "other"]


def test_encoder_dispatch_stream(server: ServerProcess) -> None:
    chunks = list(
        server.stub.DispatchStream(
            pb.DispatchRequest(route=route_request("translate thank you into Italian")), timeout=30
        )
    )
    assert chunks[0].decision.engine == "encoder"
    assert chunks[-1].end.answered_by == "ok_a"
