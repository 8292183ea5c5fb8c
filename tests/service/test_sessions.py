"""Sessions, the decision cache and the routing view, over a real server process.

The encoder engine (real MiniLM) decides, so the routes asked for are the ones its words fit:
code for the code turns, translation for the translation turns.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from grpc_router.v1 import router_pb2 as pb
from tests.service.conftest import ServerProcess, make_config, start_server
from tests.service.fake_upstream import FakeUpstream

CODE = "Write a Python function that reverses a linked list."
TRANSLATE = "Translate 'where is the train station' into French, please."


def msg(role: int, text: str, kind: int = pb.MESSAGE_KIND_UNSPECIFIED) -> pb.Message:
    return pb.Message(role=role, content=text, kind=kind)  # type: ignore[arg-type]


def user(text: str) -> pb.Message:
    return msg(pb.ROLE_USER, text)


def assistant(text: str) -> pb.Message:
    return msg(pb.ROLE_ASSISTANT, text)


def tool_call(text: str) -> pb.Message:
    return msg(pb.ROLE_ASSISTANT, text, pb.MESSAGE_KIND_TOOL_CALL)


def tool_result(text: str) -> pb.Message:
    return msg(pb.ROLE_TOOL, text)


def call(
    server: ServerProcess, messages: list[pb.Message], session: str = "", **kw: Any
) -> pb.RouteResponse:
    req = pb.RouteRequest(messages=messages, session_id=session, **kw)
    reply: pb.RouteResponse = server.stub.Route(req, timeout=30)
    return reply


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    body = urllib.request.urlopen(
        f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5
    ).read()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.compile(rf"^{name}(?:\{{{re.escape(want)}\}})? (\S+)$", re.M)
    found = pattern.search(body.decode())
    return float(found.group(1)) if found else 0.0


def _server(
    tmp: pytest.TempPathFactory, upstream: FakeUpstream, artifact: Path, **sections: Any
) -> ServerProcess:
    engine: dict[str, Any] = {"kind": "encoder", "encoder_artifact": str(artifact)}
    cfg = make_config(upstream.base_url, engine, **sections)
    return start_server(tmp.mktemp("sessions"), cfg)


@pytest.fixture(scope="module")
def sticky(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, encoder_artifact: Path
) -> Iterator[ServerProcess]:
    srv = _server(
        tmp_path_factory,
        upstream,
        encoder_artifact,
        session={"policy": "sticky", "switch_margin": 0.3, "max_switches": 1},
    )
    yield srv
    assert srv.stop() == 0


def test_an_agent_loop_pays_for_its_user_turn_once(sticky: ServerProcess) -> None:
    convo = [user(CODE)]
    first = call(sticky, convo, "agent-1")
    assert first.decision_source == pb.DECISION_SOURCE_ENGINE
    assert first.session_status == pb.SESSION_STATUS_NEW
    assert first.route == "code_generation"
    before = metric(sticky, "grpc_router_decision_sources_total", source="engine")
    for step in range(10):
        convo += [tool_call(f"run_tests(step={step})"), tool_result(f"3 passed, {step} failed")]
        reply = call(sticky, convo, "agent-1")
        assert reply.decision_source == pb.DECISION_SOURCE_SESSION
        assert reply.session_status == pb.SESSION_STATUS_CONTINUED
        assert reply.route == first.route and reply.model == first.model
        assert reply.engine_route == ""  # no model ran
    assert metric(sticky, "grpc_router_decision_sources_total", source="engine") == before
    assert metric(sticky, "grpc_router_decision_sources_total", source="session") >= 10


def test_without_a_session_a_tool_step_is_a_cache_hit(sticky: ServerProcess) -> None:
    convo = [user(TRANSLATE)]
    first = call(sticky, convo)
    assert first.session_status == pb.SESSION_STATUS_UNSPECIFIED
    convo += [tool_call("lookup('gare')"), tool_result("la gare"), assistant("Checking.")]
    convo += [msg(pb.ROLE_USER, "<system-reminder>Todo list is empty.</system-reminder>")]
    again = call(sticky, convo)
    assert again.decision_source == pb.DECISION_SOURCE_CACHE
    assert (again.route, again.confidence) == (first.route, first.confidence)
    assert [s.route for s in again.scores] == [s.route for s in first.scores]
    assert again.engine_route == first.engine_route


def test_a_sticky_session_holds_then_switches_once(sticky: ServerProcess) -> None:
    convo = [user(CODE)]
    first = call(sticky, convo, "chat-7")
    assert first.route == "code_generation" and not first.pinned
    # A clear new intent beats the held route by more than the margin: one switch allowed.
    convo += [assistant("Here it is."), user(TRANSLATE)]
    moved = call(sticky, convo, "chat-7")
    assert moved.engine_route == "translation"
    assert moved.switched and not moved.pinned and moved.route == "translation"
    # The budget is spent: the next clear change of intent is held, with its counterfactual.
    convo += [assistant("Voilà."), user(CODE)]
    held = call(sticky, convo, "chat-7", skip_scores=True)
    assert held.engine_route == "code_generation"
    assert held.pinned and not held.switched and held.route == "translation"
    assert list(held.scores) == []  # the caller asked for none, although the engine scored
    assert metric(sticky, "grpc_router_session_events_total", event="switched") >= 1
    assert metric(sticky, "grpc_router_session_events_total", event="held") >= 1


def test_a_bad_session_id_names_the_field(sticky: ServerProcess) -> None:
    for bad in ("x" * 129, "has space", "caf\u00e9"):
        with pytest.raises(grpc.RpcError) as err:
            call(sticky, [user(CODE)], bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "session_id" in (err.value.details() or "")
        status = rpc_status.from_call(err.value)
        if status is not None:  # the standard error details, where the server sends them
            assert "session_id" in status.message


def test_the_session_id_may_come_as_metadata(sticky: ServerProcess) -> None:
    req = pb.RouteRequest(messages=[user(CODE)])
    first = sticky.stub.Route(req, metadata=(("x-session-id", "meta-1"),), timeout=30)
    assert first.session_status == pb.SESSION_STATUS_NEW
    req.messages.append(tool_result("ok"))
    again = sticky.stub.Route(req, metadata=(("x-session-id", "meta-1"),), timeout=30)
    assert again.decision_source == pb.DECISION_SOURCE_SESSION


def test_no_user_text_after_stripping_is_invalid(sticky: ServerProcess) -> None:
    only_notes = [msg(pb.ROLE_USER, "<system-reminder>be brief</system-reminder>")]
    with pytest.raises(grpc.RpcError) as err:
        call(sticky, only_notes)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages" in (err.value.details() or "")


def test_pin_policy_and_expiry(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, encoder_artifact: Path
) -> None:
    srv = _server(
        tmp_path_factory,
        upstream,
        encoder_artifact,
        session={"policy": "pin", "ttl_s": 1.0},
    )
    try:
        convo = [user(CODE)]
        assert call(srv, convo, "p").route == "code_generation"
        convo += [assistant("Done."), user(TRANSLATE)]
        pinned = call(srv, convo, "p")
        assert pinned.pinned and pinned.route == "code_generation"
        assert pinned.engine_route == "translation"  # what a switch would have been
        time.sleep(1.5)
        convo += [assistant("Ok."), user(TRANSLATE + " Also 'thank you'.")]
        fresh = call(srv, convo, "p")
        assert fresh.session_status == pb.SESSION_STATUS_EXPIRED
        assert fresh.route == "translation" and not fresh.pinned
        assert metric(srv, "grpc_router_session_events_total", event="expired") == 1
    finally:
        assert srv.stop() == 0


def test_sessions_off_decides_every_turn(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, encoder_artifact: Path
) -> None:
    srv = _server(tmp_path_factory, upstream, encoder_artifact, session={"policy": "off"})
    try:
        convo = [user(CODE)]
        first = call(srv, convo, "s")
        assert first.session_status == pb.SESSION_STATUS_UNSPECIFIED
        convo += [assistant("Here."), user(TRANSLATE)]
        second = call(srv, convo, "s")
        assert second.route == "translation" and not second.pinned and not second.switched
    finally:
        assert srv.stop() == 0
