"""Per-model circuit breakers, redaction of upstream bodies in logs and the `dropped` error
label, over a real server process and the real loopback upstream.

Each test starts its own server with its own model keys, and gives its upstream models names
no other test uses (`FakeUpstream.behave`), so the upstream's request counts are its own.
"""

from __future__ import annotations

import copy
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import grpc
import pytest

from grpc_router.dispatch.breaker import (
    CircuitBreakers,
    CircuitState,
    Permit,
    Verdict,
    retry_after_s,
)
from grpc_router.settings import CircuitBreakerConfig
from grpc_router.v1 import router_pb2 as pb
from tests.service.conftest import ServerProcess, make_config, route_request, start_server
from tests.service.fake_upstream import FakeUpstream

OPEN = "circuit open"


class Harness:
    """The module's server; each test reloads it with a config whose every route tries `chain`,
    and with model keys of its own (`models`)."""

    def __init__(self, server: ServerProcess, upstream: FakeUpstream, base: dict[str, Any]) -> None:
        self.srv = server
        self.upstream = upstream
        self.base = base
        self.cfg = base
        self.prefix = ""
        self.mark = 0

    def begin(self, prefix: str) -> None:
        """A test's start: back to the base config (which forgets every other model's
        breaker); log lines from here on."""
        assert self.srv.reload(self.base)["event"] == "reloaded"
        self.prefix = prefix
        self.mark = len(self.srv.lines)

    def config(
        self,
        models: dict[str, tuple[str, float]],
        chain: list[str],
        breaker: dict[str, Any] | None = None,
        **sections: Any,
    ) -> dict[str, Any]:
        """`models`: key -> (behaviour, timeout_s); the upstream model name is the key under
        this test's prefix, switched to behave as `behaviour`."""
        cfg = copy.deepcopy(self.base)
        for r in cfg["routes"]:
            r["models"] = chain
        for key, value in sections.items():
            cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
        for key, (behaviour, timeout_s) in models.items():
            self.upstream.behave(self.name(key), behaviour)
            cfg["models"][key] = {
                "base_url": self.upstream.base_url,
                "model": self.name(key),
                "timeout_s": timeout_s,
            }
        cfg["circuit_breaker"] = breaker or {}
        return cfg

    def name(self, key: str) -> str:
        return f"{self.prefix}-{key}"

    def hits(self, key: str) -> int:
        """Requests the upstream received for model key `key`."""
        return self.upstream.log.count(self.name(key))

    def start(self, *args: Any, **kw: Any) -> None:
        self.cfg = self.config(*args, **kw)
        assert self.srv.reload(self.cfg)["event"] == "reloaded"

    reload = start

    def dispatch(self, text: str = "hi", **kw: Any) -> pb.DispatchResponse:
        req = pb.DispatchRequest(route=route_request(text, **kw))
        resp: pb.DispatchResponse = self.srv.stub.Dispatch(req, timeout=60)
        return resp

    def stream(self, text: str = "hi") -> list[pb.DispatchChunk]:
        req = pb.DispatchRequest(route=route_request(text))
        return list(self.srv.stub.DispatchStream(req, timeout=60))

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.srv.metrics_port}/metrics"
        return str(urllib.request.urlopen(url, timeout=10).read().decode())

    def metric(self, name: str, **labels: str) -> float | None:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        found = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", self.metrics(), re.M)
        return float(found.group(1)) if found else None

    def logged(self) -> str:
        """This test's raw server output."""
        return "".join(self.srv.raw[self.mark :])

    def transitions(self, model: str) -> list[dict[str, Any]]:
        return [
            e
            for e in self.srv.lines[self.mark :]
            if e.get("event") == "circuit breaker" and e.get("model") == model
        ]

    def wait_transition(self, model: str, to: str, count: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            moves = [e for e in self.transitions(model) if e["to"] == to]
            if len(moves) >= count:
                return moves[count - 1]
            time.sleep(0.02)
        raise AssertionError(f"no transition of {model} to {to}: {self.transitions(model)}")

    def wait_call(self, request_id: str) -> dict[str, Any]:
        return self.srv.wait_for(
            lambda e: e.get("event") == "call" and e.get("request_id") == request_id,
            timeout=30,
            start=self.mark,
        )


@pytest.fixture(scope="module")
def harness(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, arch_engine: dict[str, Any]
) -> Iterator[Harness]:
    base = make_config(upstream.base_url, arch_engine)
    server = start_server(tmp_path_factory.mktemp("breaker"), base)
    yield Harness(server, upstream, base)
    assert server.stop() == 0


@pytest.fixture
def h(harness: Harness, request: pytest.FixtureRequest) -> Harness:
    harness.begin(f"brk-{request.node.name}")
    return harness


def attempts(resp: pb.DispatchResponse | pb.StreamEnd) -> list[tuple[str, str, int]]:
    return [(a.model, a.error, a.http_status) for a in resp.failed_attempts]


# -- opening, skipping, the whole chain open -----------------------------------------------


def test_dead_model_is_skipped_once_its_breaker_opens(h: Harness) -> None:
    h.start({"dead": ("hang", 1.0)}, ["dead", "ok_a"], {"consecutive_failures": 2})
    for _ in range(2):  # each costs the timeout
        resp = h.dispatch()
        assert resp.answered_by == "ok_a"
        [(model, error, status)] = attempts(resp)
        assert (model, status) == ("dead", 0) and error.startswith("timeout")
    assert h.hits("dead") == 2
    opened = h.wait_transition("dead", "open")
    assert opened["from"] == "closed" and opened["cooldown_s"] == 30
    assert opened["reason"] == "2 consecutive failures, last: timeout"

    t0 = time.monotonic()
    for _ in range(4):
        resp = h.dispatch()
        assert resp.answered_by == "ok_a" and resp.content == "ok-a says: hi"
        assert attempts(resp) == [("dead", OPEN, 0)]
    end = h.stream()[-1].end
    assert end.answered_by == "ok_a" and attempts(end) == [("dead", OPEN, 0)]
    # Five calls that skip the 1 s timeout (generous bound: they would take over 5 s).
    assert time.monotonic() - t0 < 4.0
    assert h.hits("dead") == 2  # the open model saw no further request

    assert h.metric("grpc_router_circuit_state", model="dead") == 1.0
    assert h.metric("grpc_router_circuit_state", model="ok_a") == 0.0
    assert h.metric("grpc_router_circuit_transitions_total", model="dead", to="open") == 1.0
    # Skips are not upstream errors: only the two timeouts count.
    assert h.metric("grpc_router_upstream_errors_total", model="dead", reason="timeout") == 2.0
    # Label values are configured model keys only.
    labels = set(re.findall(r'^grpc_router_circuit_state\{model="([^"]+)"\}', h.metrics(), re.M))
    assert labels == set(h.cfg["models"])


def test_every_model_open_fails_unavailable_without_calling_upstream(h: Harness) -> None:
    h.start(
        {"bad_a": ("fail-500", 5.0), "bad_b": ("fail-503", 5.0)},
        ["bad_a"],
        {"consecutive_failures": 1},
        default_model="bad_b",
    )
    with pytest.raises(grpc.RpcError) as err:
        h.dispatch()
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "bad_a: http 500" in err.value.details() and "bad_b: http 503" in err.value.details()
    for call in (h.dispatch, h.stream):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == (f"all upstream models failed: bad_a: {OPEN}; bad_b: {OPEN}")
    assert (h.hits("bad_a"), h.hits("bad_b")) == (1, 1)


def test_client_errors_do_not_open_the_breaker(h: Harness) -> None:
    h.start({"picky": ("fail-400", 5.0)}, ["picky", "ok_a"], {"consecutive_failures": 1})
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as err:
            h.dispatch()
        assert "picky: http 400" in err.value.details()
    assert h.hits("picky") == 3
    assert h.transitions("picky") == []
    assert h.metric("grpc_router_circuit_state", model="picky") == 0.0


# -- half-open probes ---------------------------------------------------------------------


def test_half_open_probe_doubles_cooldown_then_closes(h: Harness) -> None:
    h.start(
        {"flaky": ("fail-500", 5.0)},
        ["flaky", "ok_a"],
        {"consecutive_failures": 1, "cooldown_s": 1.0, "max_cooldown_s": 1.5},
    )
    assert attempts(h.dispatch()) == [("flaky", "http 500: " + _injected(500), 500)]
    assert h.wait_transition("flaky", "open")["cooldown_s"] == 1.0
    assert attempts(h.dispatch()) == [("flaky", OPEN, 0)]
    assert h.hits("flaky") == 1

    time.sleep(1.2)  # the probe fails: open again, the cooldown doubled (capped at 1.5)
    assert attempts(h.dispatch())[0][2] == 500
    assert h.hits("flaky") == 2
    assert h.wait_transition("flaky", "half_open")["from"] == "open"
    reopened = h.wait_transition("flaky", "open", 2)
    assert reopened["from"] == "half_open" and reopened["cooldown_s"] == 1.5
    assert reopened["reason"] == "probe failed: http_500"
    assert attempts(h.dispatch()) == [("flaky", OPEN, 0)]

    h.upstream.behave(h.name("flaky"), "ok")  # it recovers
    time.sleep(1.7)
    resp = h.dispatch()
    assert resp.answered_by == "flaky" and attempts(resp) == []
    closed = h.wait_transition("flaky", "closed")
    assert closed["from"] == "half_open" and closed["reason"] == "probe succeeded"
    assert h.metric("grpc_router_circuit_state", model="flaky") == 0.0
    counts = {
        to: h.metric("grpc_router_circuit_transitions_total", model="flaky", to=to)
        for to in ("open", "half_open", "closed")
    }
    assert counts == {"open": 2.0, "half_open": 2.0, "closed": 1.0}
    # Closed again: a new failure counts from zero, and the cooldown from the start.
    h.upstream.behave(h.name("flaky"), "fail-500")
    h.dispatch()
    assert h.wait_transition("flaky", "open", 3)["cooldown_s"] == 1.0


def test_half_open_lets_one_probe_through(h: Harness) -> None:
    h.start(
        {"slowpoke": ("fail-500", 5.0)},
        ["slowpoke", "ok_a"],
        {"consecutive_failures": 1, "cooldown_s": 1.0},
    )
    h.dispatch()
    h.wait_transition("slowpoke", "open")
    h.upstream.behave(h.name("slowpoke"), "slow-1500")  # healthy, but the probe takes a while
    time.sleep(1.2)
    results: list[pb.DispatchResponse] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(h.dispatch())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r.answered_by for r in results) == ["ok_a", "ok_a", "ok_a", "slowpoke"]
    assert all(attempts(r) == [("slowpoke", OPEN, 0)] for r in results if r.answered_by == "ok_a")
    assert h.hits("slowpoke") == 2  # the first failure and the one probe
    assert h.wait_transition("slowpoke", "closed")["reason"] == "probe succeeded"


# -- Retry-After ----------------------------------------------------------------------------


def test_retry_after_opens_the_breaker_for_that_long(h: Harness) -> None:
    h.start(
        {
            "short": ("retry-after-2", 5.0),
            "capped": ("retry-after-3600", 5.0),
            "dated": ("retry-date-120", 5.0),
        },
        ["short", "capped", "dated", "ok_a"],
        {"max_cooldown_s": 200},  # 5 failures in a row would be needed without Retry-After
    )
    resp = h.dispatch()
    assert resp.answered_by == "ok_a"
    assert [(m, s) for m, _, s in attempts(resp)] == [
        ("short", 429),
        ("capped", 429),
        ("dated", 429),
    ]
    for key, cooldown in (("short", 2.0), ("capped", 200.0)):
        opened = h.wait_transition(key, "open")
        assert (opened["reason"], opened["cooldown_s"]) == ("retry-after", cooldown)
    assert 117 <= h.wait_transition("dated", "open")["cooldown_s"] <= 120
    resp = h.dispatch()
    assert attempts(resp) == [("short", OPEN, 0), ("capped", OPEN, 0), ("dated", OPEN, 0)]
    assert [h.hits(k) for k in ("short", "capped", "dated")] == [1, 1, 1]
    # After its Retry-After the short one is probed (and, still limited, opened again).
    time.sleep(2.2)
    resp = h.dispatch()
    assert attempts(resp)[0][::2] == ("short", 429)
    assert h.hits("short") == 2

    # Not honoured: a 429 is one more failure in a row (state of kept models survives).
    h.reload(
        {"ignored": ("retry-after-600", 5.0)},
        ["ignored", "ok_a"],
        {"honor_retry_after": False, "consecutive_failures": 3},
    )
    for _ in range(3):
        assert attempts(h.dispatch())[0][:1] == ("ignored",)
    assert h.hits("ignored") == 3
    opened = h.wait_transition("ignored", "open")
    assert opened["reason"] == "3 consecutive failures, last: http_429"
    assert opened["cooldown_s"] == 30


def test_retry_after_values() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_s("7") == 7.0
    assert retry_after_s(" 2.5 ") == 2.5
    assert retry_after_s("-3") == 0.0
    assert retry_after_s(format_datetime(now + timedelta(seconds=90), usegmt=True), now=now) == 90
    assert retry_after_s(format_datetime(now - timedelta(seconds=90), usegmt=True), now=now) == 0
    for bad in (None, "", "soon", "nan", "inf"):
        assert retry_after_s(bad) is None


# -- reloads --------------------------------------------------------------------------------


def test_breaker_state_survives_reload_for_kept_models(h: Harness) -> None:
    models = {"gone": ("fail-500", 5.0)}
    h.start(models, ["gone", "ok_a"], {"consecutive_failures": 1, "cooldown_s": 60})
    h.dispatch()
    h.wait_transition("gone", "open")
    h.reload(models, ["gone", "ok_b"], {"consecutive_failures": 2, "cooldown_s": 30})
    resp = h.dispatch()
    assert resp.answered_by == "ok_b" and attempts(resp) == [("gone", OPEN, 0)]
    assert h.hits("gone") == 1

    # Removed: forgotten (its gauge goes); added again: closed, called again.
    h.reload({}, ["ok_b"], {"consecutive_failures": 2})
    assert h.metric("grpc_router_circuit_state", model="gone") is None
    h.reload(models, ["gone", "ok_b"], {"consecutive_failures": 2})
    assert h.metric("grpc_router_circuit_state", model="gone") == 0.0
    assert attempts(h.dispatch())[0][2] == 500
    assert h.hits("gone") == 2

    # Turned off: the open breaker closes and every call tries the model.
    h.dispatch()
    h.wait_transition("gone", "open", 2)
    h.reload(models, ["gone", "ok_b"], {"enabled": False, "consecutive_failures": 2})
    assert h.wait_transition("gone", "closed")["reason"] == "circuit breaker disabled"
    for _ in range(3):
        assert attempts(h.dispatch())[0][2] == 500
    assert h.hits("gone") == 6


# -- streams --------------------------------------------------------------------------------


def test_stream_counts_only_failures_before_the_first_token(h: Harness) -> None:
    h.start(
        {"early": ("fail-502", 5.0), "late": ("drop-mid", 5.0)},
        ["early", "late", "ok_a"],
        {"consecutive_failures": 1},
    )
    for i in range(2):
        got: list[pb.DispatchChunk] = []
        with pytest.raises(grpc.RpcError) as err:
            for chunk in h.srv.stub.DispatchStream(
                pb.DispatchRequest(route=route_request("hi")), timeout=60
            ):
                got.append(chunk)
        # A failure after the first token is the caller's: no retry, the stream fails.
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert got[1].delta == h.name("late")
        expected = "early: http 502" if i == 0 else f"early: {OPEN}"
        assert expected in err.value.details()
    assert (h.hits("early"), h.hits("late")) == (1, 2)
    assert h.transitions("late") == []  # it answered before dropping: still closed
    assert h.metric("grpc_router_upstream_errors_total", model="late", reason="dropped") == 2.0


# -- error labels -------------------------------------------------------------------------


def test_reset_connection_is_counted_as_dropped(h: Harness) -> None:
    h.start(
        {"reset": ("reset", 5.0), "closed": ("drop", 5.0)},
        ["reset", "closed", "ok_a"],
        {"consecutive_failures": 2},
    )
    resp = h.dispatch()
    assert resp.answered_by == "ok_a"
    errors = dict((m, e) for m, e, _ in attempts(resp))
    assert errors["reset"].startswith("connection dropped") and "ReadError" in errors["reset"]
    assert errors["closed"].startswith("connection dropped")
    for key in ("reset", "closed"):
        assert h.metric("grpc_router_upstream_errors_total", model=key, reason="dropped") == 1.0
    assert h.metric("grpc_router_upstream_errors_total", model="reset", reason="other") is None
    h.dispatch()  # dropped connections count against the breaker
    assert h.wait_transition("reset", "open")["reason"] == "2 consecutive failures, last: dropped"


# -- content never reaches the logs ----------------------------------------------------------


def _injected(status: int) -> str:
    return f'{{"error": {{"message": "injected {status}"}}}}'


def test_upstream_error_bodies_are_not_logged(h: Harness) -> None:
    secret = "my-secret-prompt-4417"
    h.start({"echo": ("echo-500", 5.0)}, ["echo", "ok_a"], {"consecutive_failures": 1})
    resp = h.dispatch(secret, request_id="echo-1")
    assert resp.answered_by == "ok_a"
    [(model, error, status)] = attempts(resp)
    assert (model, status) == ("echo", 500) and secret in error  # the caller gets it all
    h.wait_call("echo-1")
    h.wait_transition("echo", "open")
    assert secret not in h.logged()


def test_unavailable_message_is_redacted_in_logs(h: Harness) -> None:
    secret = "my-secret-prompt-5128"
    h.start({"echo": ("echo-400", 5.0)}, ["echo"])
    with pytest.raises(grpc.RpcError) as err:
        h.dispatch(secret, request_id="echo-2")
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE and secret in err.value.details()
    line = h.wait_call("echo-2")
    assert line["error"] == "all upstream models failed: echo: http 400"
    assert secret not in h.logged()


def test_invalid_route_name_is_not_logged(h: Harness) -> None:
    secret = "My-Secret-Route-7730"
    h.start({}, ["ok_a"])
    routes = [pb.RouteDefinition(name=secret, description="anything")]
    with pytest.raises(grpc.RpcError) as err:
        h.srv.stub.Route(route_request("hi", routes=routes, request_id="bad-1"), timeout=30)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and secret in err.value.details()
    h.wait_call("bad-1")
    assert secret not in h.logged()


def test_bodies_are_logged_when_content_logging_is_on(h: Harness) -> None:
    secret = "visible-prompt-9902"
    h.start({"echo": ("echo-400", 5.0)}, ["echo"], logging={"log_content": True})
    with pytest.raises(grpc.RpcError):
        h.dispatch(secret, request_id="echo-3")
    line = h.wait_call("echo-3")
    assert secret in line["error"]


# -- the breaker on its own (a fake clock) ----------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_unit_semantics() -> None:
    clock = Clock()
    cfg = CircuitBreakerConfig(consecutive_failures=2, cooldown_s=10, max_cooldown_s=25)
    b = CircuitBreakers(cfg, ["m"], clock=clock)

    def fail(permit: Permit | None) -> None:
        assert permit is not None
        b.settle(permit, Verdict.FAILURE, "http_500")

    fail(b.admit("m"))
    b.settle(b.admit("m") or Permit("m", None), Verdict.SUCCESS)  # a success resets the count
    fail(b.admit("m"))
    assert b.state("m") is CircuitState.CLOSED
    late = b.admit("m")  # admitted while closed, settled after it opened: ignored
    fail(b.admit("m"))
    assert b.state("m") is CircuitState.OPEN and b.admit("m") is None
    fail(late)
    clock.now += 10
    probe = b.admit("m")
    assert probe is not None and probe.probe and b.state("m") is CircuitState.HALF_OPEN
    assert b.admit("m") is None  # one probe at a time
    b.settle(probe, Verdict.NEUTRAL)  # e.g. the caller went away: the next call probes
    fail(b.admit("m"))  # re-opens for 20 s
    clock.now += 19.9
    assert b.admit("m") is None
    clock.now += 0.2
    fail(b.admit("m"))  # 40 s, capped at 25
    clock.now += 24.9
    assert b.admit("m") is None
    clock.now += 0.2
    probe = b.admit("m")
    assert probe is not None
    b.settle(probe, Verdict.SUCCESS)
    b.settle(probe, Verdict.FAILURE)  # settled once: ignored
    assert b.state("m") is CircuitState.CLOSED
    # Retry-After opens at once, for that long; unknown models are not tracked.
    b.settle(b.admit("m") or Permit("m", None), Verdict.FAILURE, "http_429", retry_after=3)
    assert b.state("m") is CircuitState.OPEN
    clock.now += 3.1
    assert b.admit("m") is not None
    assert b.admit("other") == Permit("other", None)
