"""ext_proc end to end: an Envoy-like client, a real grpc.aio server, the real router core and the
real Arch-Router engine (the tiny random-weight export from `tiny_artifacts`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from grpc_router.core.router import Router
from grpc_router.engines.arch_router.engine import ArchRouterEngine
from grpc_router.engines.artifact import read_manifest
from grpc_router.errors import RouterError
from grpc_router.settings import AppConfig, ArchRouterSettings, ExtProcSettings, parse_config
from grpc_router.types import (
    DecisionSource,
    Message,
    MessageKind,
    Role,
    RouteOutcome,
    RouteRequest,
    SessionStatus,
)
from tests.mesh.harness import (
    LoopThread,
    ProcessStream,
    header_mutations,
    http_body,
    http_headers,
    metric,
    response_phases,
    start_ext_proc_server,
    wait_for_metric,
)

VARIANT = "int4"  # weight-only: exact, and the default CPU variant
OPENAI = "/v1/chat/completions"
ANTHROPIC = "/v1/messages"
RESPONSES = "/v1/responses"
PASS = "grpc_router_extproc_pass_through_total"
FAILURES = "grpc_router_extproc_failures_total"
REQUESTS = "grpc_router_extproc_requests_total"


def router_config(*, fail_open: bool = True, **sections: Any) -> AppConfig:
    data = {
        "routes": [
            {
                "name": "code_generation",
                "description": "Writing or fixing code, scripts and SQL.",
                "models": ["local_coder"],
            },
            {
                "name": "translation",
                "description": "Translating text between human languages.",
                "models": ["gpt_4o"],
            },
            {
                "name": "general_chat",
                "description": "Anything else: conversation and general questions.",
                "models": ["local_general"],
            },
        ],
        "models": {
            # Never called: ext_proc only routes.
            "local_coder": {"base_url": "http://127.0.0.1:9/v1", "model": "qwen2.5-coder-7b"},
            "gpt_4o": {"base_url": "http://127.0.0.1:9/v1", "model": "gpt-4o"},
            "local_general": {"base_url": "http://127.0.0.1:9/v1", "model": "qwen2.5-7b"},
        },
        "default_route": "general_chat",
        "default_model": "local_general",
        "routing": {"fail_open": fail_open, "engine_timeout_s": 30},
        **sections,
    }
    return parse_config(data, Path("test-config.yaml"))


class Mesh:
    """Servers sharing one loop; each `serve` call is one Envoy-facing ext_proc endpoint."""

    def __init__(self, loop: LoopThread) -> None:
        self.loop = loop
        self._servers: list[grpc.aio.Server] = []
        self._channels: list[grpc.Channel] = []

    def serve(self, router: Router, **settings: Any) -> grpc.Channel:
        server, port = self.loop.run(
            start_ext_proc_server(router, ExtProcSettings(enabled=True, **settings))
        )
        self._servers.append(server)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._channels.append(channel)
        return channel

    def route(self, router: Router, messages: tuple[Message, ...]) -> RouteOutcome:
        return self.loop.run(router.route(RouteRequest(messages=messages)))

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        for server in self._servers:
            self.loop.run(server.stop(None))


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def engine(loop: LoopThread, tiny_artifacts: Path) -> Iterator[ArchRouterEngine]:
    settings = ArchRouterSettings(variant=VARIANT, provider="cpu", intra_op_threads=1)
    engine = ArchRouterEngine(tiny_artifacts, settings)
    loop.run(engine.start())
    yield engine
    loop.run(engine.close())


@pytest.fixture(scope="module")
def broken_engine(
    loop: LoopThread, tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory
) -> ArchRouterEngine:
    """A real engine whose artifact fails its hash check: start() fails, decide() raises."""
    root = tmp_path_factory.mktemp("broken") / "tiny"
    shutil.copytree(tiny_artifacts, root)
    variant_dir = root / VARIANT
    model = variant_dir / read_manifest(variant_dir).model_file
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    engine = ArchRouterEngine(root, ArchRouterSettings(variant=VARIANT, provider="cpu"))
    with pytest.raises(RouterError):
        loop.run(engine.start())
    return engine


@pytest.fixture(scope="module")
def mesh(loop: LoopThread) -> Iterator[Mesh]:
    m = Mesh(loop)
    yield m
    m.close()


@pytest.fixture(scope="module")
def router(engine: ArchRouterEngine) -> Router:
    return Router(router_config(), engine)


@pytest.fixture(scope="module")
def channel(mesh: Mesh, router: Router) -> grpc.Channel:
    return mesh.serve(router)


def chat_body(text: str = "Write a SQL query that joins orders and customers.") -> dict[str, Any]:
    return {
        "model": "auto",
        "temperature": 0.2,
        "stream": True,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "text", "text": text}]},
        ],
    }


def expected_messages(text: str = "Write a SQL query that joins orders and customers.") -> tuple:
    return (
        Message(Role.SYSTEM, "You are a helpful assistant."),
        Message(Role.USER, text),
    )


def assert_untouched(response: pb.ProcessingResponse, phase: str) -> None:
    assert response.WhichOneof("response") == phase
    if phase.endswith("trailers"):
        assert not getattr(response, phase).HasField("header_mutation")
        return
    common = getattr(response, phase).response
    assert common.status == pb.CommonResponse.CONTINUE
    assert not common.HasField("header_mutation")
    assert not common.HasField("body_mutation")
    assert not common.clear_route_cache


def assert_routed_headers(headers: dict[str, str], outcome: RouteOutcome) -> None:
    assert headers["x-router-route"] == outcome.route
    assert headers["x-router-model"] == outcome.model
    assert float(headers["x-router-confidence"]) == pytest.approx(outcome.confidence, abs=1e-4)


# -- routed chat calls ----------------------------------------------------------------------


def test_openai_chat_gets_route_headers_and_every_other_phase_continues(
    mesh: Mesh, router: Router, channel: grpc.Channel
) -> None:
    expected = mesh.route(router, expected_messages())
    assert expected.route in {"code_generation", "translation", "general_chat"}
    before = metric(REQUESTS, outcome="routed")

    stream = ProcessStream(channel)
    assert_untouched(stream.send(http_headers(OPENAI)), "request_headers")
    response = stream.send(http_body(chat_body()))
    assert response.WhichOneof("response") == "request_body"
    common = response.request_body.response
    assert common.status == pb.CommonResponse.CONTINUE
    assert common.clear_route_cache
    assert not common.HasField("body_mutation")  # rewrite_model is off
    headers = header_mutations(common)
    assert_routed_headers(headers, expected)
    assert set(headers) == {"x-router-route", "x-router-model", "x-router-confidence"} | (
        {"x-router-fallback"} if expected.fallback_used else set()
    )
    for phase, request in response_phases():
        assert_untouched(stream.send(request), phase)
    stream.finish()
    assert metric(REQUESTS, outcome="routed") == before + 1


def test_body_rewrite_writes_the_upstream_model_and_content_length(
    mesh: Mesh, router: Router
) -> None:
    channel = mesh.serve(router, rewrite_model=True)
    text = "Traduis « bonjour » en japonais, s'il te plaît."
    expected = mesh.route(router, expected_messages(text))
    original = chat_body(text)

    stream = ProcessStream(channel)
    stream.send(http_headers(OPENAI, extra={"content-length": "999"}))
    common = stream.send(http_body(original)).request_body.response
    stream.finish()

    new_body = common.body_mutation.body
    rewritten = json.loads(new_body)
    upstream = router.config.models[expected.model].model
    assert rewritten["model"] == upstream != original["model"]
    assert {k: v for k, v in rewritten.items() if k != "model"} == {
        k: v for k, v in original.items() if k != "model"
    }
    headers = header_mutations(common)
    assert headers["content-length"] == str(len(new_body))
    assert headers["x-router-model"] == expected.model
    assert common.clear_route_cache


def test_anthropic_messages_route_on_system_and_content_blocks(
    mesh: Mesh, router: Router, channel: grpc.Channel
) -> None:
    body = {
        "model": "claude-sonnet",
        "max_tokens": 256,
        "system": [{"type": "text", "text": "You are a senior engineer."}],
        "messages": [
            {"role": "user", "content": "My script crashes."},
            {"role": "assistant", "content": [{"type": "text", "text": "Show me the trace."}]},
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "data": "AAAA"}},
                    {"type": "text", "text": "KeyError: 'id' in line 3"},
                ],
            },
        ],
    }
    expected = mesh.route(
        router,
        (
            Message(Role.SYSTEM, "You are a senior engineer."),
            Message(Role.USER, "My script crashes."),
            Message(Role.ASSISTANT, "Show me the trace."),
            Message(Role.USER, "KeyError: 'id' in line 3"),
        ),
    )
    stream = ProcessStream(channel)
    stream.send(http_headers(ANTHROPIC + "?beta=true"))
    common = stream.send(http_body(body)).request_body.response
    stream.finish()
    assert_routed_headers(header_mutations(common), expected)
    assert common.clear_route_cache


def test_client_supplied_router_headers_are_removed(channel: grpc.Channel) -> None:
    stream = ProcessStream(channel)
    response = stream.send(http_headers("/v1/models", method="GET", extra={"x-router-model": "x"}))
    stream.finish()
    common = response.request_headers.response
    assert list(common.header_mutation.remove_headers) == ["x-router-model"]
    assert common.clear_route_cache
    assert not common.header_mutation.set_headers


# -- pass-through ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "method", "content_type", "reason"),
    [
        ("/v1/models", "GET", None, "not_chat"),
        ("/v1/embeddings", "POST", "application/json", "not_chat"),
        (OPENAI, "GET", None, "not_chat"),
        (OPENAI, "POST", "text/plain", "not_json"),
        (OPENAI, "POST", "multipart/form-data; boundary=x", "not_json"),
    ],
)
def test_non_chat_requests_pass_through_untouched(
    channel: grpc.Channel, path: str, method: str, content_type: str | None, reason: str
) -> None:
    before = metric(PASS, reason=reason)
    stream = ProcessStream(channel)
    response = stream.send(http_headers(path, method=method, content_type=content_type))
    assert_untouched(response, "request_headers")
    # It asks Envoy to skip the rest...
    mode = response.mode_override
    assert mode.request_body_mode == processing_mode_pb2.ProcessingMode.NONE
    assert mode.response_header_mode == processing_mode_pb2.ProcessingMode.SKIP
    # ...and still answers CONTINUE if Envoy (allow_mode_override: false) sends it anyway.
    assert_untouched(stream.send(http_body(b"not even json")), "request_body")
    for phase, request in response_phases():
        assert_untouched(stream.send(request), phase)
    stream.finish()
    assert metric(PASS, reason=reason) == before + 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"model": "auto", "messages": [', "not_json"),
        (b"\xff\xfe not utf-8", "not_json"),
        (b'["a", "list"]', "not_json"),
        (b'{"model": "auto"}', "invalid_chat"),
        (b'{"messages": [{"role": "robot", "content": "hi"}]}', "invalid_chat"),
        (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "invalid_chat"),
    ],
)
def test_bad_bodies_pass_through_untouched(channel: grpc.Channel, body: bytes, reason: str) -> None:
    before = metric(PASS, reason=reason)
    stream = ProcessStream(channel)
    assert_untouched(stream.send(http_headers(OPENAI)), "request_headers")
    assert_untouched(stream.send(http_body(body)), "request_body")
    stream.finish()
    assert metric(PASS, reason=reason) == before + 1


def test_oversized_and_partial_bodies_pass_through(mesh: Mesh, router: Router) -> None:
    channel = mesh.serve(router, max_body_bytes=2048)
    big = chat_body("x" * 4096)
    size = len(json.dumps(big))

    # Known from content-length: decided at the headers, body skipped.
    before = metric(PASS, reason="too_large")
    stream = ProcessStream(channel)
    response = stream.send(http_headers(OPENAI, extra={"content-length": str(size)}))
    assert_untouched(response, "request_headers")
    assert response.mode_override.request_body_mode == processing_mode_pb2.ProcessingMode.NONE
    stream.finish()
    # Chunked (no content-length): decided at the body.
    stream = ProcessStream(channel)
    assert_untouched(stream.send(http_headers(OPENAI)), "request_headers")
    assert_untouched(stream.send(http_body(big)), "request_body")
    stream.finish()
    assert metric(PASS, reason="too_large") == before + 2

    # BUFFERED_PARTIAL over Envoy's buffer (or STREAMED): a chunk without end_of_stream.
    before = metric(PASS, reason="partial_body")
    stream = ProcessStream(channel)
    stream.send(http_headers(OPENAI))
    assert_untouched(stream.send(http_body(b'{"messages": [', end_of_stream=False)), "request_body")
    assert_untouched(stream.send(http_body(b"]}", end_of_stream=True)), "request_body")
    stream.finish()
    assert metric(PASS, reason="partial_body") == before + 1


def test_a_request_without_body_passes_through(channel: grpc.Channel) -> None:
    before = metric(PASS, reason="no_body")
    stream = ProcessStream(channel)
    assert_untouched(stream.send(http_headers(OPENAI, end_of_stream=True)), "request_headers")
    stream.finish()
    assert metric(PASS, reason="no_body") == before + 1


# -- cancellation and protocol errors -------------------------------------------------------


def test_client_cancel_mid_stream_is_counted_and_the_server_keeps_serving(
    mesh: Mesh, router: Router, channel: grpc.Channel
) -> None:
    before = metric(REQUESTS, outcome="cancelled")
    stream = ProcessStream(channel)
    assert_untouched(stream.send(http_headers(OPENAI)), "request_headers")
    stream.cancel()  # the HTTP client hung up before its body arrived
    assert wait_for_metric(REQUESTS, before, outcome="cancelled") == before + 1

    # Cancelled right after the body (while routing): no crash, the next call is served.
    stream = ProcessStream(channel)
    stream.send(http_headers(OPENAI))
    stream.post(http_body(chat_body()))
    stream.cancel()

    expected = mesh.route(router, expected_messages())
    stream = ProcessStream(channel)
    stream.send(http_headers(OPENAI))
    assert_routed_headers(
        header_mutations(stream.send(http_body(chat_body())).request_body.response), expected
    )
    stream.finish()


def test_an_empty_processing_request_is_a_protocol_error(channel: grpc.Channel) -> None:
    stream = ProcessStream(channel)
    with pytest.raises(grpc.RpcError) as info:
        stream.send(pb.ProcessingRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- engine failure under both failure modes ------------------------------------------------


def _call_with_a_failing_engine(
    mesh: Mesh, engine: ArchRouterEngine, *, router_fails_open: bool, failure_mode: str
) -> tuple[pb.ProcessingResponse, float]:
    """One chat call through ext_proc; returns the body answer and the failure count's rise."""
    router = Router(router_config(fail_open=router_fails_open), engine)
    channel = mesh.serve(router, failure_mode=failure_mode)
    labels = {"reason": "engine_error", "failure_mode": failure_mode}
    before = metric(FAILURES, **labels)
    stream = ProcessStream(channel)
    assert_untouched(stream.send(http_headers(OPENAI)), "request_headers")
    response = stream.send(http_body(chat_body()))
    stream.finish()
    return response, metric(FAILURES, **labels) - before


@pytest.mark.parametrize("router_fails_open", [True, False])
def test_engine_failure_fail_open(
    mesh: Mesh, broken_engine: ArchRouterEngine, router_fails_open: bool
) -> None:
    response, counted = _call_with_a_failing_engine(
        mesh, broken_engine, router_fails_open=router_fails_open, failure_mode="open"
    )
    assert response.WhichOneof("response") == "request_body"
    if router_fails_open:
        # The router fell back to its default route: the request goes there, marked.
        headers = header_mutations(response.request_body.response)
        assert headers["x-router-route"] == "general_chat"
        assert headers["x-router-model"] == "local_general"
        assert headers["x-router-fallback"] == "engine_error"
    else:
        # The router raised: the request continues untouched (Envoy's default route).
        assert_untouched(response, "request_body")
    assert counted == 1


@pytest.mark.parametrize("router_fails_open", [True, False])
def test_engine_failure_fail_closed(
    mesh: Mesh, broken_engine: ArchRouterEngine, router_fails_open: bool
) -> None:
    response, counted = _call_with_a_failing_engine(
        mesh, broken_engine, router_fails_open=router_fails_open, failure_mode="closed"
    )
    assert response.WhichOneof("response") == "immediate_response"
    reply = response.immediate_response
    assert reply.status.code == 503
    assert json.loads(reply.body)["error"]["code"] == "engine_error"
    assert header_mutations(pb.CommonResponse(header_mutation=reply.headers)) == {
        "content-type": "application/json"
    }
    assert reply.details == "grpc_router_engine_error"
    assert counted == 1


def test_a_slow_engine_hits_the_route_timeout(mesh: Mesh, router: Router) -> None:
    # The real engine cannot answer within a microsecond (its batcher alone waits longer). The
    # conversation is one no other test routes, so the router's decision cache cannot answer.
    channel = mesh.serve(router, failure_mode="closed", route_timeout_s=1e-6)
    before = metric(FAILURES, reason="engine_timeout", failure_mode="closed")
    stream = ProcessStream(channel)
    stream.send(http_headers(OPENAI))
    body = chat_body("Only the timeout test asks this: how slow is a slow engine?")
    response = stream.send(http_body(body))
    stream.finish()
    assert response.immediate_response.status.code == 503
    assert json.loads(response.immediate_response.body)["error"]["code"] == "engine_timeout"
    assert metric(FAILURES, reason="engine_timeout", failure_mode="closed") == before + 1


def test_disabled_ext_proc_is_not_served(mesh: Mesh, router: Router, loop: LoopThread) -> None:
    server, port = loop.run(start_ext_proc_server(router, ExtProcSettings(enabled=False)))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                ProcessStream(channel).send(http_headers(OPENAI))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        loop.run(server.stop(None))


def test_long_agent_conversations_are_fitted_to_the_routers_limits(
    mesh: Mesh, router: Router, channel: grpc.Channel
) -> None:
    limits = router.config.limits
    turns = [{"role": "system", "content": "You are a coding agent."}]
    for i in range(limits.max_messages + 40):
        role = "user" if i % 2 == 0 else "assistant"
        turns.append({"role": role, "content": f"step {i}: run the tests again"})
    turns.append({"role": "user", "content": "Now fix the failing SQL query."})
    # What the router itself accepts: the system turn and the latest turns, within its limits.
    kept = [turns[0], *turns[len(turns) - (limits.max_messages - 1) :]]
    roles = {"system": Role.SYSTEM, "user": Role.USER, "assistant": Role.ASSISTANT}
    expected = mesh.route(router, tuple(Message(roles[t["role"]], t["content"]) for t in kept))

    failed = metric(REQUESTS, outcome="failed")
    stream = ProcessStream(channel)
    stream.send(http_headers(OPENAI))
    common = stream.send(http_body({"model": "auto", "messages": turns})).request_body.response
    stream.finish()
    assert_routed_headers(header_mutations(common), expected)

    # One message longer than max_content_chars is clipped, not rejected.
    huge = {"model": "auto", "messages": [{"role": "user", "content": "x" * 50_000 + " why?"}]}
    assert len(huge["messages"][0]["content"]) > limits.max_content_chars
    stream = ProcessStream(channel)
    stream.send(http_headers(OPENAI))
    common = stream.send(http_body(huge)).request_body.response
    stream.finish()
    assert common.clear_route_cache and "x-router-model" in header_mutations(common)
    assert metric(REQUESTS, outcome="failed") == failed


def test_agent_runs_keep_the_latest_user_turn_when_tool_traffic_overflows(
    mesh: Mesh, router: Router, channel: grpc.Channel
) -> None:
    """An agent asks once and then calls tools for longer than `max_messages`: the user's turn
    (what the router routes on) must survive the fitting, with the latest tool traffic."""
    limits = router.config.limits
    system = {"role": "system", "content": "You are a coding agent."}
    ask = {"role": "user", "content": "Fix the failing SQL query in reports.py."}
    steps: list[dict[str, Any]] = []
    for i in range(limits.max_messages):
        call = {"id": f"c{i}", "type": "function", "function": {"name": "run_tests"}}
        steps.append({"role": "assistant", "content": None, "tool_calls": [call]})
        steps.append({"role": "tool", "tool_call_id": f"c{i}", "content": f"{i} failures"})
    body = {"model": "auto", "messages": [system, ask, *steps]}
    room = limits.max_messages - 1  # the system turn leads
    tail = room // 2
    kept_steps = [
        Message(Role.ASSISTANT, "run_tests(...)", MessageKind.TOOL_CALL)
        if s["role"] == "assistant"
        else Message(Role.TOOL, s["content"], MessageKind.TOOL_RESULT)
        for s in steps[len(steps) - tail :]
    ]
    expected = mesh.route(
        router,
        (
            Message(Role.SYSTEM, system["content"]),
            Message(Role.USER, ask["content"]),
            *kept_steps,
        ),
    )
    failed = metric(REQUESTS, outcome="failed")
    stream = ProcessStream(channel)
    stream.send(http_headers(OPENAI))
    common = stream.send(http_body(body)).request_body.response
    stream.finish()
    assert_routed_headers(header_mutations(common), expected)
    assert metric(REQUESTS, outcome="failed") == failed


# -- OpenAI Responses API -------------------------------------------------------------------


def responses_body(
    text: str = "Write a SQL query that joins orders and customers.",
) -> dict[str, Any]:
    return {
        "model": "auto",
        "instructions": "You are a helpful assistant.",
        "stream": True,
        "tools": [{"type": "function", "name": "run_sql", "parameters": {"type": "object"}}],
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": text},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                ],
            },
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "call_id": "c1", "name": "run_sql", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "ERROR: no column id"},
        ],
    }


def responses_messages(
    text: str = "Write a SQL query that joins orders and customers.",
) -> tuple[Message, ...]:
    return (
        Message(Role.SYSTEM, "You are a helpful assistant."),
        Message(Role.USER, text),
        Message(Role.ASSISTANT, "run_sql(...)", MessageKind.TOOL_CALL),
        Message(Role.TOOL, "ERROR: no column id", MessageKind.TOOL_RESULT),
    )


def test_responses_api_calls_are_routed(mesh: Mesh, router: Router, channel: grpc.Channel) -> None:
    expected = mesh.route(router, responses_messages())
    before = metric(REQUESTS, outcome="routed")
    stream = ProcessStream(channel)
    assert_untouched(stream.send(http_headers(RESPONSES + "?stream=true")), "request_headers")
    response = stream.send(http_body(responses_body()))
    common = response.request_body.response
    assert common.clear_route_cache
    assert not common.HasField("body_mutation")
    assert_routed_headers(header_mutations(common), expected)
    for phase, request in response_phases():
        assert_untouched(stream.send(request), phase)
    stream.finish()
    assert metric(REQUESTS, outcome="routed") == before + 1


def test_responses_api_body_rewrite(mesh: Mesh, router: Router) -> None:
    channel = mesh.serve(router, rewrite_model=True)
    text = "Traduis « bonjour » en japonais, s'il te plaît."
    expected = mesh.route(router, responses_messages(text))
    original = responses_body(text)
    stream = ProcessStream(channel)
    stream.send(http_headers(RESPONSES))
    common = stream.send(http_body(original)).request_body.response
    stream.finish()
    rewritten = json.loads(common.body_mutation.body)
    assert rewritten["model"] == router.config.models[expected.model].model != original["model"]
    assert {k: v for k, v in rewritten.items() if k != "model"} == {
        k: v for k, v in original.items() if k != "model"
    }
    assert header_mutations(common)["content-length"] == str(len(common.body_mutation.body))


def test_responses_paths_are_configurable(mesh: Mesh, router: Router) -> None:
    channel = mesh.serve(router, responses_paths=("/openai/v1/responses",))
    before = metric(PASS, reason="not_chat")
    stream = ProcessStream(channel)
    stream.send(http_headers(RESPONSES))  # no longer a configured path
    stream.finish()
    assert metric(PASS, reason="not_chat") == before + 1
    stream = ProcessStream(channel)
    stream.send(http_headers("/openai/v1/responses"))
    common = stream.send(http_body(responses_body())).request_body.response
    stream.finish()
    assert "x-router-model" in header_mutations(common)


def test_a_responses_tool_step_without_user_text_passes_through(channel: grpc.Channel) -> None:
    # previous_response_id carries the conversation server-side: only the tool output is sent.
    body = {
        "model": "auto",
        "previous_response_id": "resp_1",
        "input": [{"type": "function_call_output", "call_id": "c1", "output": "42"}],
    }
    before = metric(PASS, reason="invalid_chat")
    stream = ProcessStream(channel)
    stream.send(http_headers(RESPONSES))
    assert_untouched(stream.send(http_body(body)), "request_body")
    stream.finish()
    assert metric(PASS, reason="invalid_chat") == before + 1


# -- sessions -------------------------------------------------------------------------------


class RecordingRouter(Router):
    """The real router core; it only keeps what each call asked and got."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[RouteRequest, RouteOutcome]] = []

    async def route(self, request: RouteRequest, **kwargs: Any) -> RouteOutcome:
        outcome = await super().route(request, **kwargs)
        self.calls.append((request, outcome))
        return outcome


def _session_call(
    channel: grpc.Channel, body: dict[str, Any], session: str | None, path: str = OPENAI
) -> pb.ProcessingResponse:
    extra = {"x-session-id": session} if session is not None else None
    stream = ProcessStream(channel)
    stream.send(http_headers(path, extra=extra))
    response = stream.send(http_body(body))
    stream.finish()
    return response


def test_the_session_header_is_passed_to_the_router(mesh: Mesh, engine: ArchRouterEngine) -> None:
    router = RecordingRouter(router_config(), engine)
    channel = mesh.serve(router)
    _session_call(channel, chat_body(), "agent-run-7")
    _session_call(channel, responses_body(), "agent-run-8", path=RESPONSES)
    _session_call(channel, chat_body(), None)
    _session_call(channel, chat_body(), "")
    assert [request.session_id for request, _ in router.calls] == [
        "agent-run-7",
        "agent-run-8",
        "",
        "",
    ]
    # A custom header name is read instead.
    router.calls.clear()
    channel = mesh.serve(router, session_header="x-agent-run")
    stream = ProcessStream(channel)
    stream.send(http_headers(OPENAI, extra={"x-session-id": "ignored", "x-agent-run": "r-1"}))
    stream.send(http_body(chat_body()))
    stream.finish()
    assert [request.session_id for request, _ in router.calls] == ["r-1"]


def test_a_session_is_continued_and_its_tool_steps_answered_from_it(
    mesh: Mesh, engine: ArchRouterEngine
) -> None:
    router = RecordingRouter(router_config(session={"policy": "pin"}), engine)
    channel = mesh.serve(router)
    first = header_mutations(_session_call(channel, chat_body(), "run-1").request_body.response)
    assert router.calls[-1][1].session_status is SessionStatus.NEW

    # The agent's next step: the same user turn, then a tool call and its result.
    step = chat_body()
    step["messages"] += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "run_sql"}}],
        },
        {"role": "tool", "tool_call_id": "c", "content": "ERROR: no column id"},
    ]
    second = header_mutations(_session_call(channel, step, "run-1").request_body.response)
    outcome = router.calls[-1][1]
    assert outcome.session_status is SessionStatus.CONTINUED
    assert outcome.source is DecisionSource.SESSION
    assert second["x-router-route"] == first["x-router-route"]
    assert second["x-router-model"] == first["x-router-model"]

    # A new user turn of a pinned session keeps its route.
    step["messages"].append({"role": "user", "content": "Now translate the report to German."})
    third = header_mutations(_session_call(channel, step, "run-1").request_body.response)
    outcome = router.calls[-1][1]
    assert outcome.session_status is SessionStatus.CONTINUED
    assert third["x-router-route"] == first["x-router-route"]
    if outcome.engine_route and outcome.engine_route != first["x-router-route"]:
        assert outcome.pinned  # the engine preferred another route; the pin held

    # Another id is another session.
    _session_call(channel, chat_body(), "run-2")
    assert router.calls[-1][1].session_status is SessionStatus.NEW


_BAD_SESSION_IDS = ["has space", "x" * 129, "caf\u00e9"]


@pytest.mark.parametrize("session", _BAD_SESSION_IDS)
def test_an_invalid_session_id_is_invalid_input_fail_closed(
    mesh: Mesh, router: Router, session: str
) -> None:
    channel = mesh.serve(router, failure_mode="closed")
    before = metric(FAILURES, reason="invalid_argument", failure_mode="closed")
    response = _session_call(channel, chat_body(), session)
    assert response.WhichOneof("response") == "immediate_response"
    reply = response.immediate_response
    assert reply.status.code == 400
    error = json.loads(reply.body)["error"]
    assert error["code"] == "invalid_argument"
    assert "session_id" in error["message"]
    assert metric(FAILURES, reason="invalid_argument", failure_mode="closed") == before + 1


def test_an_invalid_session_id_is_invalid_input_fail_open(
    router: Router, channel: grpc.Channel
) -> None:
    before = metric(FAILURES, reason="invalid_argument", failure_mode="open")
    response = _session_call(channel, chat_body(), "two words")
    assert_untouched(response, "request_body")  # unrouted: Envoy's default route
    assert metric(FAILURES, reason="invalid_argument", failure_mode="open") == before + 1
