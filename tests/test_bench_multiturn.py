"""The multi-turn benchmark workload (bench/multiturn.py): the replay is what a chat client and an
agent harness send, and the worker, run on the tiny model through the router core, reports what
the engine prefilled, where each decision came from, ratios against baseline A and the
targets."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from bench.multiturn import (
    KINDS,
    MODES,
    PRIMARY_MODE,
    MultiTurnWorkload,
    baseline_sample,
    baseline_workload,
    build_multiturn,
    multiturn_markdown,
    multiturn_ratios,
    run_multiturn,
    snake,
)
from grpc_router.core.conversation import routing_view
from grpc_router.engines.arch_router import runtime
from grpc_router.settings import ROUTE_NAME_RE


def test_route_names_follow_the_routers_rule() -> None:
    workload = build_multiturn(2, 1, 3)
    assert snake("RentalCars") == "rental_cars"
    assert all(ROUTE_NAME_RE.match(r["name"]) for r in workload.routes)
    assert len({r["name"] for r in workload.routes}) == len(workload.routes) == 16


def test_dialogues_replay_as_a_chat_client_sends_them() -> None:
    workload = build_multiturn(3, 2, 10)
    assert workload.dialogues == 3 and workload.agent_loops == 2
    streams: dict[str, list[Any]] = {}
    for call in workload.calls:
        streams.setdefault(call.stream, []).append(call)
    assert len(streams) == 5
    # Interleaved round robin: the first call of every stream comes before any second call.
    assert [c.index for c in workload.calls[:5]] == [0] * 5
    for name, calls in streams.items():
        assert {c.session_id for c in calls} == {name}
        assert [c.index for c in calls] == list(range(len(calls)))
        assert calls[0].kind == "new_conversation"
        for before, after in itertools.pairwise(calls):
            # Each call resends the whole conversation so far, and adds to it.
            assert after.messages[: len(before.messages)] == before.messages
            assert len(after.messages) > len(before.messages)
        if name.startswith("sgd-"):
            assert len(calls) >= 5  # at least 5 user turns
            assert all(c.kind == "follow_up" for c in calls[1:])
            assert all(c.messages[-1]["role"] == "user" for c in calls)
        else:
            assert [c.kind for c in calls[1:]] == ["tool_step"] * 10
            first = routing_view(calls[0].message_objs(), ())
            for step in calls[1:]:
                added = step.messages[len(calls[0].messages) :]
                assert {m["kind"] for m in added} == {"tool_call", "tool_result"}
                # No new user turn: the routing view is the first call's.
                assert routing_view(step.message_objs(), ()) == first
    # JSON round trip (the orchestrator hands it to the worker subprocess).
    assert MultiTurnWorkload.from_json(workload.to_json()) == workload


def test_baseline_sample_is_the_same_calls_as_text() -> None:
    workload = build_multiturn(4, 2, 10)
    sample = baseline_sample(workload, 4)
    assert len(sample["follow_up"]) == len(sample["new_conversation"]) == 4
    assert {workload.calls[i].kind for i in sample["follow_up"]} == {"follow_up"}
    assert {workload.calls[i].kind for i in sample["new_conversation"]} == {"new_conversation"}
    base = baseline_workload(workload, sample)
    assert len(base.long) == len(base.short) == 4
    for case, i in zip(base.long, sample["follow_up"], strict=True):
        assert case.messages == [
            {"role": m["role"], "content": m["content"]} for m in workload.calls[i].messages
        ]
        assert case.routes == workload.routes


@pytest.fixture(scope="module")
def tiny_result(tiny_artifacts: Path) -> tuple[MultiTurnWorkload, dict[str, Any]]:
    workload = build_multiturn(2, 1, 3)
    before = runtime.DecoderSession.run
    result = run_multiturn(
        {"artifact": str(tiny_artifacts), "variant": "int8", "provider": "cpu", "threads": 1,
         "multiturn": workload.to_json()}
    )  # fmt: skip
    assert runtime.DecoderSession.run is before  # the timers are taken out again
    return workload, result


def test_worker_reports_prefill_sources_and_phases(
    tiny_result: tuple[MultiTurnWorkload, dict[str, Any]],
) -> None:
    workload, result = tiny_result
    assert set(result["modes"]) == {m for m, _, _ in MODES}
    assert result["peak_rss_bytes"] > 0
    for data in result["modes"].values():
        calls = data["calls"]
        assert len(calls) == len(workload.calls)
        assert all(c["fallback"] == "" for c in calls)
        by_kind = {k: [c for c in calls if c["kind"] == k] for k in KINDS}
        # Tool steps never run the model: the session (or, without one, the decision cache).
        expected = "session" if data["sessions"] else "cache"
        assert {c["source"] for c in by_kind["tool_step"]} == {expected}
        assert all(c["prefilled_tokens"] == 0 for c in by_kind["tool_step"])
        for c in by_kind["new_conversation"] + by_kind["follow_up"]:
            assert c["source"] == "engine"
            assert 0 < c["prefilled_tokens"] < c["prompt_tokens"]
            assert c["cached_tokens"] > 0  # the warm route set, or the previous turn
            assert c["phases_ms"]["onnx_run"] > 0
        # A follow-up reuses its previous turn: more cached than the route set's block alone
        # (the first ones: the tiny model's tokenizer soon makes a dialogue go over the prompt
        # budget, and dropping its oldest turns changes the prefix).
        block = min(c["cached_tokens"] for c in by_kind["new_conversation"])
        firsts = {c["stream"]: c for c in reversed(by_kind["follow_up"])}
        assert firsts and all(c["cached_tokens"] > block for c in firsts.values())
        summary = data["summary"]
        assert summary["tool_step"]["prefilled_tokens_median"] == 0
        assert summary["follow_up"]["phases_p50_ms"]["onnx_run"] > 0
    # Sticky sessions need the scores of follow-ups; a new session's first call does not.
    off = result["modes"]["scores_off"]["calls"]
    assert not any(c["engine_scored"] for c in off if c["kind"] == "new_conversation")
    assert all(c["engine_scored"] for c in off if c["kind"] == "follow_up")
    plain = result["modes"]["no_session"]["calls"]
    assert not any(c["engine_scored"] for c in plain)


def test_ratios_targets_and_tables(tiny_result: tuple[MultiTurnWorkload, dict[str, Any]]) -> None:
    workload, result = tiny_result
    sample = baseline_sample(workload, 2)
    base_a = {
        "long": {"p50_ms": 10_000.0},
        "short": {"p50_ms": 8_000.0},
        "peak_rss_bytes": 10 * result["peak_rss_bytes"],
    }
    report: dict[str, Any] = {
        "ratios": {"int8": {"scores_off": {"vs_A": 1.0}}},
        "multiturn": {"workload": {}, "a_sample": sample, "engine": {"int8": result}, "A": base_a},
    }
    multiturn_ratios(report)
    row = report["ratios"]["int8"]
    assert row["scores_off"] == {"vs_A": 1.0}  # the existing keys stay
    calls = result["modes"][PRIMARY_MODE]["calls"]
    engine_p50 = sorted(calls[i]["wall_ms"] for i in sample["follow_up"])
    assert row["follow_up"]["vs_A"] == pytest.approx(10_000.0 / (sum(engine_p50) / 2))
    assert row["new_conversation"]["vs_A"] > 0
    assert row["multiturn_rss_vs_A"] == pytest.approx(0.1)
    tool = report["latency"]["int8"]["tool_step"]
    assert tool["p50_ms"] == result["modes"][PRIMARY_MODE]["summary"]["tool_step"]["p50_ms"]
    targets = report["multiturn"]["targets"]["int8"]
    assert targets["peak_rss_vs_A"]["holds"] is True
    assert targets["tool_step_p50_ms"]["holds"] is (tool["p50_ms"] <= 2.0)
    report["multiturn"]["workload"] = {
        "dialogues": 2, "agent_loops": 1, "agent_steps": 3, "routes": 16, "calls": 13,
        "route_set_tokens": 700,
        "follow_up": {"calls": 8, "prompt_tokens_median": 900, "prompt_tokens_max": 1000},
    }  # fmt: skip
    text = multiturn_markdown(report)
    assert "follow up" in text and "tool step" in text
    assert "holds" in text


def test_orchestrator_flags() -> None:
    from bench.__main__ import main, parse_args

    args = parse_args([])
    assert (args.multiturn_dialogues, args.agent_loops, args.agent_steps) == (4, 2, 10)
    assert args.multiturn_baseline_samples == 4
    assert not args.skip_multiturn and not args.only_multiturn
    assert args.variants == "int8,int4" and args.samples == 4  # the existing defaults stay
    # The targets are judged on the scores_off replay: refused before anything is built.
    with pytest.raises(SystemExit, match="scores_off"):
        main(["--multiturn-modes", "scores_on"])
