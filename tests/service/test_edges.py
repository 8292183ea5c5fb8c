"""The server at its edges, over real sockets and real server processes: bytes that are no
message, unsafe request ids, the standard error details of INVALID_ARGUMENT, a full server that
still answers health and ListRoutes, clients that stall mid-message (raw HTTP/2), readiness under
overload, HTTP/2 keepalive and connection age, and draining on SIGTERM."""

from __future__ import annotations

import base64
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from grpc_router.v1 import router_pb2 as pb
from tests.service.conftest import ServerProcess, make_config, route_request, start_server
from tests.service.fake_upstream import FakeUpstream
from tests.service.h2client import H2Client, grpc_frame

SERVICE = "/grpc_router.v1.RouterService/"
READINESS = "grpc_router.readiness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LIMIT = 2  # server.max_concurrent_rpcs of the module's server


def _engine(encoder_artifact: Path) -> dict[str, Any]:
    return {"kind": "encoder", "encoder_artifact": str(encoder_artifact)}


@pytest.fixture(scope="module")
def srv(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, encoder_artifact: Path
) -> Iterator[ServerProcess]:
    """Every dispatch is slow (1.5 s upstream), two routing calls at most at once, and a 1 s
    keepalive."""
    cfg = make_config(
        upstream.base_url,
        _engine(encoder_artifact),
        chain=["slow"],
        server={"max_concurrent_rpcs": LIMIT, "keepalive_time_s": 1, "keepalive_timeout_s": 10},
    )
    server = start_server(tmp_path_factory.mktemp("edges"), cfg)
    yield server
    assert server.stop() == 0


def _calls_total(server: ServerProcess, method: str, code: str) -> float:
    """`grpc_router_calls_total{method,code}` as the metrics endpoint reports it."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "grpc_router_calls_total"
                and sample.labels.get("method") == SERVICE + method
                and sample.labels.get("code") == code
            ):
                return float(sample.value)
    return 0.0


def _call_line(server: ServerProcess, pred: Callable[[dict[str, Any]], bool], start: int) -> Any:
    return server.wait_for(lambda e: e.get("event") == "call" and pred(e), timeout=10, start=start)


def _bad_request(err: grpc.RpcError) -> error_details_pb2.BadRequest:
    """The BadRequest detail of an INVALID_ARGUMENT, checked against the call's status."""
    status = rpc_status.from_call(err)  # also checks code and message match the call's
    assert status is not None, "no grpc-status-details-bin"
    assert status.code == code_pb2.INVALID_ARGUMENT
    (detail,) = status.details
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad)
    return bad


def _expect_invalid(call: Callable[[], Any], field: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    err = raised.value
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, err.details()
    details = str(err.details())
    assert details.startswith(f"{field}: ")
    trailers = dict(err.trailing_metadata() or ())
    assert trailers.get("x-invalid-field") == field
    (violation,) = _bad_request(err).field_violations
    assert violation.field == field
    assert violation.description == details.removeprefix(f"{field}: ")
    return err


# -- bytes that are no message ---------------------------------------------------------------


def _corrupt(message: Any, marker: str) -> dict[str, bytes]:
    """Three undecodable variants of a message that holds `marker` in a string field."""
    raw = message.SerializeToString()
    assert marker.encode() in raw
    bad_utf8 = raw.replace(marker.encode(), b"\xff\xfe\xc3" + b"\x80" * (len(marker) - 3))
    return {
        "bad_utf8": bad_utf8,
        "truncated": raw[:-3],
        "garbage": bytes(range(0xF0, 0x100)) * 2,
    }


_MARKER = "marker-text-77"
_ROUTE_REQ = route_request("what is the weather", request_id="corrupt-1", session_id=_MARKER)
_DISPATCH_REQ = pb.DispatchRequest(route=route_request("translate hi"), user=_MARKER)
_UNDECODABLE = [
    (method, kind, payload)
    for method, msg in (
        ("Route", _ROUTE_REQ),
        ("Dispatch", _DISPATCH_REQ),
        ("DispatchStream", _DISPATCH_REQ),
    )
    for kind, payload in _corrupt(msg, _MARKER).items()
] + [
    ("ListRoutes", "truncated", b"\x0a\x05ab"),
    ("ListRoutes", "garbage", b"\xff" * 16),
]
_TYPES = {
    "Route": "RouteRequest",
    "Dispatch": "DispatchRequest",
    "DispatchStream": "DispatchRequest",
    "ListRoutes": "ListRoutesRequest",
}


@pytest.mark.parametrize(
    ("method", "kind", "payload"), _UNDECODABLE, ids=[f"{m}-{k}" for m, k, _ in _UNDECODABLE]
)
def test_undecodable_request_is_invalid_argument_logged_and_counted(
    srv: ServerProcess, method: str, kind: str, payload: bytes
) -> None:
    before = _calls_total(srv, method, "INVALID_ARGUMENT")
    mark = len(srv.lines)
    # A generic call: no serializer, the raw bytes go on the wire as the message.
    if method == "DispatchStream":
        stub: Any = srv.channel.unary_stream(SERVICE + method)
        call = lambda: list(stub(payload, metadata=(("x-request-id", f"u-{kind}"),), timeout=30))  # noqa: E731
    else:
        stub = srv.channel.unary_unary(SERVICE + method)
        call = lambda: stub(payload, metadata=(("x-request-id", f"u-{kind}"),), timeout=30)  # noqa: E731
    err = _expect_invalid(call, "request")
    assert err.details() == f"request: not a valid grpc_router.v1.{_TYPES[method]} message"
    assert dict(err.trailing_metadata() or ()).get("x-request-id") == f"u-{kind}"
    line = _call_line(srv, lambda e: e.get("request_id") == f"u-{kind}", mark)
    assert line["method"] == SERVICE + method and line["status"] == "INVALID_ARGUMENT"
    assert line["error"] == err.details()
    assert _calls_total(srv, method, "INVALID_ARGUMENT") == before + 1
    # The server is unharmed.
    assert srv.stub.ListRoutes(pb.ListRoutesRequest(), timeout=10).engine == "encoder"


def test_undecodable_request_over_raw_http2(srv: ServerProcess) -> None:
    client = H2Client("127.0.0.1", srv.port)
    try:
        stream = client.call(SERVICE + "Route", b"\x0a\xff\xff\xff\xff\x0f")
        assert stream.grpc_status == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert stream.grpc_message == "request: not a valid grpc_router.v1.RouteRequest message"
        status = status_pb2.Status.FromString(_b64(stream.meta[b"grpc-status-details-bin"]))
        bad = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad) and bad.field_violations[0].field == "request"
        # The same connection still serves a valid call.
        ok = client.call(SERVICE + "Route", route_request("hello there").SerializeToString())
        assert ok.grpc_status == 0
        assert pb.RouteResponse.FromString(ok.data[5:]).route
    finally:
        client.close()


def _b64(value: bytes) -> bytes:
    """A `-bin` header's value (unpadded base64)."""
    return base64.b64decode(value + b"=" * (-len(value) % 4))


# -- request ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rid",
    ["abc\r\nx-injected: 1", "abc\ndef", "café-1", "has space", "x" * 129, "tab\there"],
    ids=["crlf", "lf", "non-ascii", "space", "too-long", "tab"],
)
def test_unsafe_request_id_in_the_body(srv: ServerProcess, rid: str) -> None:
    mark = len(srv.lines)
    err = _expect_invalid(
        lambda: srv.stub.Route(route_request("hi", request_id=rid), timeout=30), "request_id"
    )
    trailers = dict(err.trailing_metadata() or ())
    # A generated id answers instead, and none of the caller's value reaches metadata.
    generated = trailers.get("x-request-id", "")
    assert len(generated) == 32 and generated.isalnum()
    line = _call_line(srv, lambda e: e.get("request_id") == generated, mark)
    assert line["status"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize("method", ["Dispatch", "DispatchStream"])
def test_unsafe_request_id_in_dispatch(srv: ServerProcess, method: str) -> None:
    req = pb.DispatchRequest(route=route_request("hi", request_id="bad\r\nid"))
    if method == "Dispatch":
        _expect_invalid(lambda: srv.stub.Dispatch(req, timeout=30), "request_id")
    else:
        _expect_invalid(lambda: list(srv.stub.DispatchStream(req, timeout=30)), "request_id")


def test_request_id_limit_is_inclusive(srv: ServerProcess) -> None:
    rid = "r" * 128  # limits.max_request_id_chars
    assert srv.stub.Route(route_request("hi", request_id=rid), timeout=30).request_id == rid
    resp = srv.stub.Route(route_request("hi"), metadata=(("x-request-id", rid),), timeout=30)
    assert resp.request_id == rid


def test_unsafe_request_id_header(srv: ServerProcess) -> None:
    long_id = "h" * 200
    err = _expect_invalid(
        lambda: srv.stub.Route(
            route_request("hi"), metadata=(("x-request-id", long_id),), timeout=30
        ),
        "request_id",
    )
    assert "x-request-id header" in str(err.details())
    assert dict(err.trailing_metadata() or ()).get("x-request-id") != long_id
    _expect_invalid(
        lambda: srv.stub.ListRoutes(
            pb.ListRoutesRequest(), metadata=(("x-request-id", "a b"),), timeout=30
        ),
        "request_id",
    )
    # What a gRPC library would refuse to send: CR/LF, control and non-ASCII bytes.
    client = H2Client("127.0.0.1", srv.port)
    try:
        for value in (b"caf\xc3\xa9", b"a\x01b", b"a\x7fb"):
            stream = client.call(
                SERVICE + "Route",
                route_request("hi").SerializeToString(),
                extra=[(b"x-request-id", value)],
            )
            assert stream.grpc_status == grpc.StatusCode.INVALID_ARGUMENT.value[0], value
            assert stream.grpc_message.startswith("request_id: the x-request-id header")
            assert stream.meta[b"x-invalid-field"] == b"request_id"
            assert value not in stream.meta.get(b"x-request-id", b"")
    finally:
        client.close()


# -- field errors in the standard form ---------------------------------------------------------


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"messages": []}, "messages"),
        (
            {"messages": [pb.Message(role=pb.ROLE_USER, content="x" * 32_001)]},
            "messages[0].content",
        ),
        (
            {
                "messages": [pb.Message(role=pb.ROLE_USER, content="hi")],
                "routes": [pb.RouteDefinition(name="Bad Name", description="d")],
            },
            "routes[0].name",
        ),
    ],
)
def test_invalid_argument_carries_bad_request(
    srv: ServerProcess, request_kwargs: dict[str, Any], field: str
) -> None:
    req = pb.RouteRequest(**request_kwargs)
    _expect_invalid(lambda: srv.stub.Route(req, timeout=30), field)
    dreq = pb.DispatchRequest(route=req)
    _expect_invalid(lambda: srv.stub.Dispatch(dreq, timeout=30), field)
    _expect_invalid(lambda: list(srv.stub.DispatchStream(dreq, timeout=30)), field)


def test_dispatch_option_error_carries_bad_request(srv: ServerProcess) -> None:
    req = pb.DispatchRequest(route=route_request("hi"), temperature=7.0)
    err = _expect_invalid(lambda: srv.stub.Dispatch(req, timeout=30), "temperature")
    assert "temperature" in str(err.details())


# -- a full server ----------------------------------------------------------------------------


class _Dispatches:
    """`n` slow Dispatch calls in threads; `wait_upstream` returns once all reached the
    upstream (so the server has admitted them)."""

    def __init__(self, server: ServerProcess, upstream: FakeUpstream, n: int, tag: str) -> None:
        self.upstream, self.tag = upstream, tag
        self.results: list[Any] = [None] * n
        self.threads = [
            threading.Thread(target=self._run, args=(server, i), daemon=True) for i in range(n)
        ]
        for t in self.threads:
            t.start()

    def _run(self, server: ServerProcess, i: int) -> None:
        req = pb.DispatchRequest(route=route_request(f"{self.tag} {i}"))
        try:
            self.results[i] = server.stub.Dispatch(req, timeout=60)
        except grpc.RpcError as e:
            self.results[i] = e

    def reached(self) -> int:
        with self.upstream.log.lock:
            return sum(
                1 for r in self.upstream.log.requests if self.tag in str(r.body.get("messages", ""))
            )

    def wait_upstream(self, n: int | None = None, timeout: float = 30) -> None:
        n = len(self.threads) if n is None else n
        deadline = time.monotonic() + timeout
        while self.reached() < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.reached() == n, "calls did not reach the upstream"

    def join(self) -> list[Any]:
        for t in self.threads:
            t.join(60)
        return self.results


def test_full_server_still_answers_health_and_list_routes(
    srv: ServerProcess, upstream: FakeUpstream
) -> None:
    health = health_pb2_grpc.HealthStub(srv.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=READINESS), timeout=60)
    assert next(watch).status == SERVING
    busy = _Dispatches(srv, upstream, LIMIT, "saturate-4411")
    busy.wait_upstream()
    assert next(watch).status == NOT_SERVING

    mark = len(srv.lines)
    before = _calls_total(srv, "Route", "RESOURCE_EXHAUSTED")
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.Route(
            route_request("one too many"), metadata=(("x-request-id", "over-1"),), timeout=10
        )
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "server.max_concurrent_rpcs" in str(err.value.details())
    line = _call_line(srv, lambda e: e.get("request_id") == "over-1", mark)
    assert line["status"] == "RESOURCE_EXHAUSTED"
    assert _calls_total(srv, "Route", "RESOURCE_EXHAUSTED") == before + 1

    # Liveness, readiness, ListRoutes and reflection-free tooling are never refused.
    for _ in range(5):
        assert srv.health("") == SERVING
        assert srv.health(READINESS) == NOT_SERVING
        assert srv.stub.ListRoutes(pb.ListRoutesRequest(), timeout=10).routes
    extra_watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    assert next(extra_watch).status == SERVING
    extra_watch.cancel()

    results = busy.join()
    assert all(isinstance(r, pb.DispatchResponse) for r in results), results
    assert next(watch).status == SERVING
    watch.cancel()
    assert srv.health(READINESS) == SERVING
    assert srv.stub.Route(route_request("room again"), timeout=10).route


def test_stalled_http2_streams_hold_no_slot(srv: ServerProcess) -> None:
    """Ten streams send HEADERS and half a message, then stall: with max_concurrent_rpcs 2,
    real calls and health checks are still served, and a stalled call, once completed, is
    served too."""
    client = H2Client("127.0.0.1", srv.port)
    try:
        frame = grpc_frame(route_request("stalled call").SerializeToString())
        half = len(frame) // 2
        stalled = []
        for _ in range(10):
            sid = client.open(SERVICE + "Route")
            client.send(sid, frame[:half])
            stalled.append(sid)
        client.pump(lambda: False, 0.5)
        assert not any(client.streams[s].done for s in stalled)

        for i in range(2 * LIMIT + 1):
            assert srv.stub.Route(route_request(f"real call {i}"), timeout=10).route
        dreq = pb.DispatchRequest(route=route_request("real dispatch"))
        assert srv.stub.Dispatch(dreq, timeout=30).content == "slow-1500 says: real dispatch"
        assert srv.health("") == SERVING
        assert srv.health(READINESS) == SERVING

        client.send(stalled[0], frame[half:], end=True)
        done = client.streams[stalled[0]]
        assert client.pump(lambda: done.done, 30)
        assert done.grpc_status == 0
        assert pb.RouteResponse.FromString(done.data[5:]).route
        assert not any(client.streams[s].done for s in stalled[1:])
    finally:
        client.close()


def test_keepalive_pings_reach_a_stalled_connection(srv: ServerProcess) -> None:
    """server.keepalive_time_s: 1, and pings go on while the streams send nothing."""
    client = H2Client("127.0.0.1", srv.port)
    try:
        sid = client.open(SERVICE + "Route")
        client.send(sid, grpc_frame(b"\x0a\x02hi")[:3])
        client.pump(lambda: False, 1.5)  # settle: settings, flow-control pings
        seen = client.pings
        assert client.pump(lambda: client.pings >= seen + 3, 30), client.pings - seen
    finally:
        client.close()


def test_connection_age_closes_stalled_connections(
    tmp_path: Path, upstream: FakeUpstream, encoder_artifact: Path
) -> None:
    cfg = make_config(
        upstream.base_url,
        _engine(encoder_artifact),
        server={"max_connection_age_s": 1, "max_connection_age_grace_s": 1},
    )
    server = start_server(tmp_path, cfg)
    try:
        client = H2Client("127.0.0.1", server.port)
        sid = client.open(SERVICE + "Route")
        client.send(sid, grpc_frame(route_request("stall").SerializeToString())[:8])
        assert client.pump(lambda: client.closed, 30), "the connection was not closed"
        assert client.goaway
        client.close()
        # New connections are served as ever.
        assert server.stub.Route(route_request("hello"), timeout=10).route
    finally:
        assert server.stop() == 0


# -- readiness and the engine queue -----------------------------------------------------------


def test_readiness_follows_the_engine_queue(
    tmp_path: Path, upstream: FakeUpstream, arch_engine: dict[str, Any]
) -> None:
    """The Arch-Router batcher holds a lone request for max_wait_us (3 s) waiting for a batch:
    one queued request reaches overload_queue_depth 1."""
    engine = {**arch_engine, "arch_router": {"max_batch_size": 8, "max_wait_us": 3_000_000}}
    cfg = make_config(upstream.base_url, engine, server={"overload_queue_depth": 1})
    server = start_server(tmp_path, cfg)
    try:
        assert server.health(READINESS) == SERVING
        result: list[Any] = []
        t = threading.Thread(
            target=lambda: result.append(
                server.stub.Route(route_request("queued request 5150"), timeout=60)
            )
        )
        t.start()
        deadline = time.monotonic() + 10
        while server.health(READINESS) != NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.health(READINESS) == NOT_SERVING
        assert server.health("") == SERVING  # liveness stays up while busy
        t.join(60)
        assert result and result[0].engine == "arch-router"
        assert server.health(READINESS) == SERVING
    finally:
        assert server.stop() == 0


def test_readiness_not_serving_before_the_engine_is_ready(
    tmp_path: Path, upstream: FakeUpstream, encoder_artifact: Path
) -> None:
    cfg = make_config(
        upstream.base_url, {"kind": "encoder", "encoder_artifact": str(tmp_path / "absent")}
    )
    server = start_server(tmp_path, cfg, wait_serving=False)
    try:
        server.wait_for(lambda e: "engine failed to start" in str(e.get("event")), timeout=60)
        assert server.health(READINESS) == NOT_SERVING
        assert server.health("") == NOT_SERVING
    finally:
        assert server.stop() == 0


# -- drain ------------------------------------------------------------------------------------


def test_sigterm_ends_late_calls_unavailable_never_cancelled(
    tmp_path: Path, upstream: FakeUpstream, encoder_artifact: Path
) -> None:
    """Calls still running server.grace_s after SIGTERM end UNAVAILABLE (which retry policies
    retry), each logged and counted; none ends CANCELLED."""
    cfg = make_config(
        upstream.base_url, _engine(encoder_artifact), chain=["slow"], server={"grace_s": 0.5}
    )
    server = start_server(tmp_path, cfg)
    busy = _Dispatches(server, upstream, 6, "drain-late-3321")
    streams: list[Any] = []

    def stream(i: int) -> None:
        chunks: list[Any] = []
        try:
            req = pb.DispatchRequest(route=route_request(f"drain-late-3321 stream {i}"))
            for chunk in server.stub.DispatchStream(req, timeout=60):
                chunks.append(chunk)
            streams.append(chunks)
        except grpc.RpcError as e:
            streams.append((chunks, e))

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    busy.wait_upstream(8)
    mark = len(server.lines)
    server.proc.send_signal(signal.SIGTERM)
    results = busy.join()
    for t in threads:
        t.join(60)
    assert server.proc.wait(60) == 0

    codes = [r.code() if isinstance(r, grpc.RpcError) else grpc.StatusCode.OK for r in results]
    for s in streams:
        if isinstance(s, tuple):
            chunks, e = s
            assert chunks and chunks[0].HasField("decision")  # sent before the upstream answered
            codes.append(e.code())
        else:
            codes.append(grpc.StatusCode.OK)
    assert grpc.StatusCode.CANCELLED not in codes, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert codes.count(grpc.StatusCode.UNAVAILABLE) == 8, codes  # 1.5 s upstream > 0.5 s grace
    for r in results:
        assert "server shutting down" in r.details()
    server.stop()
    calls = [e for e in server.lines[mark:] if e.get("event") == "call"]
    assert sorted(e["status"] for e in calls) == ["UNAVAILABLE"] * 8, calls
    assert all("server.grace_s" in e["error"] for e in calls)
    drained = [e for e in server.lines if str(e.get("event")).startswith("drain:")]
    assert drained and drained[0]["calls"] == 8


def test_sigterm_lets_calls_finish_within_grace(
    tmp_path: Path, upstream: FakeUpstream, encoder_artifact: Path
) -> None:
    cfg = make_config(
        upstream.base_url, _engine(encoder_artifact), chain=["slow"], server={"grace_s": 20}
    )
    server = start_server(tmp_path, cfg)
    busy = _Dispatches(server, upstream, 4, "drain-ok-7781")
    busy.wait_upstream()
    server.proc.send_signal(signal.SIGTERM)
    results = busy.join()
    assert server.proc.wait(60) == 0
    assert sorted(r.content for r in results) == sorted(
        f"slow-1500 says: drain-ok-7781 {i}" for i in range(4)
    )
    server.stop()
    assert not any(str(e.get("event")).startswith("drain:") for e in server.lines)


def test_open_health_watch_does_not_hold_shutdown(
    tmp_path: Path, upstream: FakeUpstream, encoder_artifact: Path
) -> None:
    cfg = make_config(upstream.base_url, _engine(encoder_artifact), server={"grace_s": 30})
    server = start_server(tmp_path, cfg)
    health = health_pb2_grpc.HealthStub(server.channel)
    watches = [
        health.Watch(health_pb2.HealthCheckRequest(service=name), timeout=120)
        for name in ("", READINESS, "grpc_router.v1.RouterService")
    ]
    for w in watches:
        assert next(w).status == SERVING
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    for w in watches:
        assert [r.status for r in w] == [NOT_SERVING]  # then the stream ends, status OK
        assert w.code() is grpc.StatusCode.OK
    assert server.proc.wait(60) == 0
    assert time.monotonic() - t0 < 10, "an open Watch held the process"
    server.stop()
