"""End to end over a real socket: one `grpc-router serve` process running the real Arch-Router
engine on the tiny artifact, and a real fake OpenAI-compatible upstream on loopback. Tests that
need other settings reload the config with SIGHUP (which is itself under test)."""

from __future__ import annotations

import copy
import math
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from grpc_router.v1 import router_pb2 as pb
from tests.service.conftest import (
    ROUTES,
    ServerProcess,
    make_config,
    route_request,
    start_server,
    user,
)
from tests.service.fake_upstream import FakeUpstream

ROUTE_NAMES = [r["name"] for r in ROUTES]


class Live:
    """The module's server plus the config it runs, for reloads."""

    def __init__(self, server: ServerProcess, base: dict[str, Any]) -> None:
        self.server = server
        self.base = base

    def configure(self, **changes: Any) -> dict[str, Any]:
        cfg = copy.deepcopy(self.base)
        for key, value in changes.items():
            if key == "chain":
                for r in cfg["routes"]:
                    r["models"] = value
            elif isinstance(value, dict):
                cfg[key] = {**cfg.get(key, {}), **value}
            else:
                cfg[key] = value
        line = self.server.reload(cfg)
        assert line["event"] == "reloaded", line
        return cfg


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, arch_engine: dict[str, Any]
) -> Iterator[Live]:
    base = make_config(upstream.base_url, arch_engine)
    server = start_server(tmp_path_factory.mktemp("svc"), base)
    yield Live(server, base)
    assert server.stop() == 0


@pytest.fixture
def srv(live: Live) -> Iterator[ServerProcess]:
    live.configure()  # every test starts from the base config
    yield live.server


# -- Route ----------------------------------------------------------------------------------


def test_route_returns_a_configured_route_with_scores(srv: ServerProcess) -> None:
    resp = srv.stub.Route(
        route_request("Write a Python function that sorts a list.", request_id="rid-1"), timeout=30
    )
    assert resp.request_id == "rid-1"
    assert resp.engine == "arch-router"
    assert resp.route in ROUTE_NAMES
    assert resp.model == "ok_a"
    names = [s.route for s in resp.scores]
    assert names == [*ROUTE_NAMES, "other"]
    assert math.isclose(sum(s.probability for s in resp.scores), 1.0, abs_tol=1e-3)
    assert 0.0 <= resp.confidence <= 1.0
    if resp.fallback_used:
        assert resp.fallback_reason == pb.FALLBACK_REASON_OTHER
        assert resp.route == "general_chat" and resp.engine_route == "other"
    else:
        assert resp.engine_route == resp.route
        assert dict((s.route, s.probability) for s in resp.scores)[resp.route] == pytest.approx(
            resp.confidence, abs=1e-6
        )
    assert resp.timings.total_ms >= resp.timings.engine_ms > 0


def test_route_is_deterministic_and_skip_scores(srv: ServerProcess) -> None:
    req = route_request("translate 'good night' into Spanish")
    a = srv.stub.Route(req, timeout=30)
    b = srv.stub.Route(req, timeout=30)
    assert (a.route, a.engine_route) == (b.route, b.engine_route)
    assert a.confidence == pytest.approx(b.confidence, abs=1e-6)
    c = srv.stub.Route(route_request("translate 'good night' into Spanish", skip_scores=True))
    assert list(c.scores) == []
    assert c.route == a.route


def test_per_request_route_set_overrides_config(srv: ServerProcess) -> None:
    routes = [
        pb.RouteDefinition(name="weather", description="Questions about the weather forecast."),
        pb.RouteDefinition(name="music", description="Playing songs or finding music."),
    ]
    resp = srv.stub.Route(route_request("will it rain tomorrow?", routes=routes), timeout=30)
    assert [s.route for s in resp.scores] == ["weather", "music", "other"]
    assert resp.engine_route in ("weather", "music", "other")
    # Routes the config does not know map to the default model; "other" to the default route's.
    assert resp.model == ("ok_a" if resp.engine_route == "other" else "ok_default")


def test_request_id_generated_when_absent(srv: ServerProcess) -> None:
    resp = srv.stub.Route(route_request("hello there"), timeout=30)
    assert len(resp.request_id) >= 16
    metadata_rid = "from-metadata-7"
    resp2 = srv.stub.Route(
        route_request("hello there"), metadata=(("x-request-id", metadata_rid),), timeout=30
    )
    assert resp2.request_id == metadata_rid


# -- bad input ------------------------------------------------------------------------------


def _invalid(srv: ServerProcess, req: pb.RouteRequest) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.Route(req, timeout=30)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    field = dict(err.value.trailing_metadata() or ()).get("x-invalid-field", "")
    return str(field), str(err.value.details())


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [user("hi")] * 65}, "messages"),
        ({"messages": [user("x" * 32_001)]}, "messages[0].content"),
        ({"messages": [pb.Message(role=pb.ROLE_ASSISTANT, content="hi")]}, "messages"),
        (
            {"messages": [user("hi"), pb.Message(role=pb.ROLE_UNSPECIFIED, content="x")]},
            "messages[1].role",
        ),
        ({"messages": [user("hi"), pb.Message(role=42, content="x")]}, "messages[1].role"),
        (
            {
                "messages": [user("hi")],
                "routes": [pb.RouteDefinition(name="Bad Name", description="d")],
            },
            "routes[0].name",
        ),
        (
            {
                "messages": [user("hi")],
                "routes": [
                    pb.RouteDefinition(name="a", description="d"),
                    pb.RouteDefinition(name="a", description="e"),
                ],
            },
            "routes[1].name",
        ),
        (
            {
                "messages": [user("hi")],
                "routes": [pb.RouteDefinition(name="other", description="d")],
            },
            "routes[0].name",
        ),
        (
            {
                "messages": [user("hi")],
                "routes": [pb.RouteDefinition(name=f"r{i}", description="d") for i in range(65)],
            },
            "routes",
        ),
        (
            {"messages": [user("hi")], "routes": [pb.RouteDefinition(name="a", description=" ")]},
            "routes[0].description",
        ),
    ],
    ids=[
        "no-messages",
        "too-many-messages",
        "content-too-long",
        "no-user-message",
        "unset-role",
        "unknown-role",
        "bad-route-name",
        "duplicate-route",
        "reserved-other",
        "too-many-routes",
        "empty-description",
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    srv: ServerProcess, request_kwargs: dict[str, Any], field: str
) -> None:
    got_field, details = _invalid(srv, pb.RouteRequest(**request_kwargs))
    assert got_field == field
    assert details.startswith(field + ":")


def test_request_over_max_message_bytes(live: Live) -> None:
    live.configure(limits={"max_message_bytes": 4096, "max_content_chars": 100_000})
    field, details = _invalid(live.server, route_request("y" * 5000))
    assert field == "request" and "max_message_bytes" in details


def test_bad_generation_params(srv: ServerProcess) -> None:
    req = pb.DispatchRequest(route=route_request("hi"), temperature=3.0)
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.Dispatch(req, timeout=30)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("temperature:")


# -- ListRoutes, health, reflection, metrics, logs ------------------------------------------


def test_list_routes(srv: ServerProcess) -> None:
    resp = srv.stub.ListRoutes(pb.ListRoutesRequest(), timeout=10)
    assert [r.name for r in resp.routes] == ROUTE_NAMES
    assert list(resp.routes[0].models) == ["ok_a"]
    assert resp.default_route == "general_chat" and resp.default_model == "ok_default"
    assert resp.engine == "arch-router"
    assert {m.key for m in resp.models} >= {"ok_a", "r429", "refused"}


def test_health_serving(srv: ServerProcess) -> None:
    assert srv.health() == health_pb2.HealthCheckResponse.SERVING
    assert srv.health("grpc_router.v1.RouterService") == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_services(srv: ServerProcess) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(srv.channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"grpc_router.v1.RouterService", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint(srv: ServerProcess) -> None:
    srv.stub.Route(route_request("summarise this text for me"), timeout=30)
    url = f"http://127.0.0.1:{srv.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for name in (
        "grpc_router_decision_seconds_bucket",
        "grpc_router_decisions_total",
        "grpc_router_engine_queue_depth",
        "grpc_router_in_flight_calls",
        "grpc_router_calls_total",
    ):
        assert name in text, name
    assert 'grpc_router_calls_total{code="OK",method="/grpc_router.v1.RouterService/Route"}' in text


def test_one_log_line_per_call_without_content(srv: ServerProcess) -> None:
    secret = "my-secret-medical-question-8731"
    mark = len(srv.lines)
    srv.stub.Route(route_request(secret, request_id="log-check-1"), timeout=30)
    line = srv.wait_for(
        lambda e: e.get("event") == "call" and e.get("request_id") == "log-check-1", start=mark
    )
    assert line["method"] == "/grpc_router.v1.RouterService/Route"
    assert line["status"] == "OK"
    for key in ("route", "model", "confidence", "engine_ms", "total_ms"):
        assert key in line
    assert secret not in "".join(srv.raw[mark:])


# -- fail-open / fail-closed ----------------------------------------------------------------


def test_engine_timeout_fails_open_then_closed(live: Live) -> None:
    live.configure(routing={"engine_timeout_s": 1e-6})
    resp = live.server.stub.Route(route_request("write a sorting function"), timeout=30)
    assert resp.fallback_used and resp.fallback_reason == pb.FALLBACK_REASON_ENGINE_TIMEOUT
    assert resp.route == "general_chat" and resp.model == "ok_a"
    assert resp.engine == "" and resp.fallback_detail
    live.configure(routing={"engine_timeout_s": 1e-6, "fail_open": False})
    with pytest.raises(grpc.RpcError) as err:
        live.server.stub.Route(route_request("write a sorting function"), timeout=30)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE


def test_threshold_falls_back_to_default_route(live: Live) -> None:
    live.configure(routing={"threshold": 1.0})
    resp = live.server.stub.Route(route_request("translate this into German"), timeout=30)
    assert resp.route == "general_chat" and resp.fallback_used
    assert resp.fallback_reason in (pb.FALLBACK_REASON_BELOW_THRESHOLD, pb.FALLBACK_REASON_OTHER)


# -- Dispatch -------------------------------------------------------------------------------


def test_dispatch_answers_with_preferred_model(srv: ServerProcess, upstream: FakeUpstream) -> None:
    upstream.log.clear()
    resp = srv.stub.Dispatch(
        pb.DispatchRequest(
            route=route_request("hello!"), temperature=0.2, max_tokens=32, stop=["\n\n"], seed=7
        ),
        timeout=30,
    )
    assert resp.answered_by == "ok_a"
    assert resp.content == "ok-a says: hello!"
    assert resp.finish_reason == "stop"
    assert resp.usage.total_tokens == 12
    assert list(resp.failed_attempts) == []
    assert resp.decision.route in ROUTE_NAMES
    sent = upstream.log.requests[-1].body
    assert sent["temperature"] == 0.2 and sent["max_tokens"] == 32
    assert sent["stop"] == ["\n\n"] and sent["seed"] == 7
    assert "top_p" not in sent


def test_dispatch_retries_next_models_then_default(live: Live, upstream: FakeUpstream) -> None:
    live.configure(chain=["r429", "r500", "refused", "drop", "ok_b"])
    resp = live.server.stub.Dispatch(pb.DispatchRequest(route=route_request("hi")), timeout=30)
    assert resp.answered_by == "ok_b"
    assert [(a.model, a.http_status) for a in resp.failed_attempts] == [
        ("r429", 429),
        ("r500", 500),
        ("refused", 0),
        ("drop", 0),
    ]
    assert "connect" in resp.failed_attempts[2].error
    # The route's models all fail: the default model answers.
    live.configure(chain=["r500", "r429"])
    resp = live.server.stub.Dispatch(pb.DispatchRequest(route=route_request("hi")), timeout=30)
    assert resp.answered_by == "ok_default"
    assert [a.model for a in resp.failed_attempts] == ["r500", "r429"]


def test_dispatch_timeout_moves_on(live: Live) -> None:
    cfg = copy.deepcopy(live.base)
    cfg["models"]["hang"]["timeout_s"] = 0.5
    for r in cfg["routes"]:
        r["models"] = ["hang", "ok_b"]
    assert live.server.reload(cfg)["event"] == "reloaded"
    resp = live.server.stub.Dispatch(pb.DispatchRequest(route=route_request("hi")), timeout=30)
    assert resp.answered_by == "ok_b"
    assert resp.failed_attempts[0].model == "hang"
    assert "timeout" in resp.failed_attempts[0].error


def test_dispatch_all_failed_is_unavailable(live: Live) -> None:
    live.configure(chain=["r500"], default_model="r429")
    with pytest.raises(grpc.RpcError) as err:
        live.server.stub.Dispatch(pb.DispatchRequest(route=route_request("hi")), timeout=30)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "r500: http 500" in err.value.details() and "r429: http 429" in err.value.details()


def test_non_retryable_upstream_error_stops(live: Live) -> None:
    live.configure(chain=["r400", "ok_b"])
    with pytest.raises(grpc.RpcError) as err:
        live.server.stub.Dispatch(pb.DispatchRequest(route=route_request("hi")), timeout=30)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "r400: http 400" in err.value.details()


def test_dispatch_stream(live: Live) -> None:
    live.configure(chain=["r429", "ok_a"])
    chunks = list(
        live.server.stub.DispatchStream(
            pb.DispatchRequest(route=route_request("tell me a story", request_id="s-1")),
            timeout=30,
        )
    )
    assert chunks[0].WhichOneof("chunk") == "decision"
    assert chunks[0].decision.request_id == "s-1"
    deltas = [c.delta for c in chunks[1:-1]]
    assert all(c.WhichOneof("chunk") == "delta" for c in chunks[1:-1])
    assert len(deltas) > 1 and "".join(deltas) == "ok-a says: tell me a story"
    end = chunks[-1].end
    assert end.answered_by == "ok_a" and end.finish_reason == "stop"
    assert end.usage.completion_tokens == len(deltas)
    assert [a.model for a in end.failed_attempts] == ["r429"]


def test_dispatch_stream_drop_after_first_token_errors(live: Live) -> None:
    live.configure(chain=["drop_mid", "ok_a"])
    got: list[pb.DispatchChunk] = []
    with pytest.raises(grpc.RpcError) as err:
        for chunk in live.server.stub.DispatchStream(
            pb.DispatchRequest(route=route_request("hi")), timeout=30
        ):
            got.append(chunk)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert got[0].WhichOneof("chunk") == "decision" and got[1].delta == "drop-mid"


def test_client_going_away_cancels_upstream(live: Live, upstream: FakeUpstream) -> None:
    live.configure(chain=["hang"])
    upstream.log.clear()
    with pytest.raises(grpc.RpcError) as err:
        live.server.stub.Dispatch(pb.DispatchRequest(route=route_request("hi")), timeout=1.5)
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while upstream.log.hangs_abandoned < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.log.hangs_abandoned == 1
    # A cancelled stream also closes the upstream connection.
    call = live.server.stub.DispatchStream(
        pb.DispatchRequest(route=route_request("hi")), timeout=30
    )
    first = next(call)
    assert first.WhichOneof("chunk") == "decision"
    time.sleep(0.3)
    call.cancel()
    deadline = time.monotonic() + 10
    while upstream.log.hangs_abandoned < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.log.hangs_abandoned == 2


def test_api_key_from_env_is_sent_and_never_logged(live: Live, upstream: FakeUpstream) -> None:
    # The server process was started without ROUTER_TEST_KEY: the attempt fails clearly, and
    # the next model answers.
    cfg = copy.deepcopy(live.base)
    cfg["models"]["ok_a"]["api_key_env"] = "ROUTER_TEST_KEY"
    cfg["models"]["ok_a"]["headers"] = {"x-team": "search"}
    for r in cfg["routes"]:
        r["models"] = ["ok_a", "ok_b"]
    assert live.server.reload(cfg)["event"] == "reloaded"
    resp = live.server.stub.Dispatch(pb.DispatchRequest(route=route_request("hi")), timeout=30)
    assert resp.answered_by == "ok_b"
    assert "ROUTER_TEST_KEY" in resp.failed_attempts[0].error


# -- reload ---------------------------------------------------------------------------------


def test_sighup_reload_swaps_and_bad_reload_is_refused(live: Live) -> None:
    cfg = live.configure(default_route="translation")
    assert live.server.stub.ListRoutes(pb.ListRoutesRequest()).default_route == "translation"
    bad = copy.deepcopy(cfg)
    bad["routes"][0]["models"] = ["no_such_model"]
    bad["default_model"] = "missing_too"
    line = live.server.reload(bad)
    assert line["event"] == "reload refused; keeping the running config"
    assert "routes.0.models.0: unknown model 'no_such_model'" in line["errors"]
    assert "default_model: unknown model 'missing_too'" in line["errors"]
    # Still serving the last good config.
    assert live.server.stub.ListRoutes(pb.ListRoutesRequest()).default_route == "translation"
    resp = live.server.stub.Route(route_request("hi"), timeout=30)
    assert resp.model == "ok_a"


def test_concurrent_calls(srv: ServerProcess) -> None:
    errors: list[BaseException] = []
    results: list[str] = []

    def call(i: int) -> None:
        try:
            r = srv.stub.Route(route_request(f"question number {i}"), timeout=60)
            results.append(r.route)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 12 and set(results) <= set(ROUTE_NAMES)


def test_upstream_and_fallback_metrics(live: Live) -> None:
    live.configure(chain=["r429", "refused", "ok_a"], routing={"threshold": 1.0})
    live.server.stub.Dispatch(pb.DispatchRequest(route=route_request("hi")), timeout=30)
    url = f"http://127.0.0.1:{live.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'grpc_router_upstream_errors_total{model="r429",reason="http_429"}' in text
    assert 'grpc_router_upstream_errors_total{model="refused",reason="connect"}' in text
    assert 'grpc_router_upstream_seconds_count{model="ok_a"}' in text
    assert "grpc_router_fallbacks_total{reason=" in text


def test_content_logged_only_when_debug_content_logging_is_on(live: Live) -> None:
    live.configure(logging={"level": "debug", "log_content": True})
    mark = len(live.server.lines)
    live.server.stub.Route(route_request("visible-text-5521", request_id="dbg-1"), timeout=30)
    line = live.server.wait_for(
        lambda e: e.get("event") == "call" and e.get("request_id") == "dbg-1", start=mark
    )
    assert line["messages"] == [["user", "visible-text-5521"]]
