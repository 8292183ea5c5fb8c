"""ListRoutes over a real `grpc-router serve` process with the encoder: the fitted `other`
thresholds (set level and per route) and the fit's log line; a fixed threshold in the config;
per-request route sets with examples."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from grpc_router.v1 import router_pb2 as pb
from tests.service.conftest import ROUTES, ServerProcess, make_config, route_request, start_server
from tests.service.fake_upstream import FakeUpstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


def serve(tmp: Path, upstream: FakeUpstream, artifact: Path, **encoder: Any) -> ServerProcess:
    engine: dict[str, Any] = {"kind": "encoder", "encoder_artifact": str(artifact)}
    if encoder:
        engine["encoder"] = encoder
    return start_server(tmp, make_config(upstream.base_url, engine))


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, encoder_artifact: Path
) -> Iterator[ServerProcess]:
    srv = serve(tmp_path_factory.mktemp("list"), upstream, encoder_artifact)
    yield srv
    assert srv.stop() == 0


def test_list_routes_reports_fitted_thresholds(server: ServerProcess) -> None:
    resp = server.stub.ListRoutes(pb.ListRoutesRequest(), timeout=30)
    assert resp.engine == "encoder"
    assert resp.other_threshold_mode == "auto" and resp.other_threshold_source == "examples"
    assert resp.HasField("other_threshold") and 0.0 < resp.other_threshold < 1.0
    assert [r.name for r in resp.routes] == [r["name"] for r in ROUTES]
    for route in resp.routes:
        # Each configured route has one example: a threshold of its own.
        assert route.HasField("other_threshold") and 0.0 < route.other_threshold < 1.0
        assert route.other_threshold_examples == 1
    # The same values as the fit's log line, logged once for the configured route set.
    fitted = server.wait_event("encoder route set fitted")
    assert fitted["threshold"] == pytest.approx(resp.other_threshold, abs=1e-4)
    assert fitted["route_thresholds"] == {
        r.name: pytest.approx(r.other_threshold, abs=1e-4) for r in resp.routes
    }


def test_request_route_sets_with_examples(server: ServerProcess) -> None:
    routes = [
        pb.RouteDefinition(
            name="weather",
            description="Questions about the weather forecast.",
            examples=["will it rain tomorrow", "how hot is it in Rome"],
        ),
        pb.RouteDefinition(
            name="music",
            description="Playing songs or finding music.",
            examples=["play some jazz", "skip this song"],
        ),
    ]
    mark = len(server.lines)
    resp = server.stub.Route(
        route_request("is it going to snow in Oslo?", routes=routes), timeout=30
    )
    assert resp.engine_route == "weather"
    off = server.stub.Route(route_request("what's the capital of Peru", routes=routes), timeout=30)
    assert off.engine_route == "other" and off.fallback_used
    fitted = server.wait_for(
        lambda e: e.get("event") == "encoder route set fitted" and e.get("routes") == 2, start=mark
    )
    assert fitted["source"] == "examples" and set(fitted["route_thresholds"]) == {
        "weather",
        "music",
    }
    # ListRoutes still reports the configured set, not the request's.
    listed = server.stub.ListRoutes(pb.ListRoutesRequest(), timeout=30)
    assert [r.name for r in listed.routes] == [r["name"] for r in ROUTES]
    assert all(r.other_threshold_examples == 1 for r in listed.routes)


def test_fixed_threshold_in_config(
    tmp_path: Path, upstream: FakeUpstream, encoder_artifact: Path
) -> None:
    srv = serve(tmp_path, upstream, encoder_artifact, other_threshold=0.3)
    try:
        resp = srv.stub.ListRoutes(pb.ListRoutesRequest(), timeout=30)
        assert (resp.other_threshold_mode, resp.other_threshold_source) == ("fixed", "config")
        assert resp.other_threshold == pytest.approx(0.3)
        assert [r.other_threshold for r in resp.routes] == pytest.approx([0.3] * len(ROUTES))
        assert all(r.other_threshold_examples == 0 for r in resp.routes)
    finally:
        assert srv.stop() == 0
