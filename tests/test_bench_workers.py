"""The single-decision benchmark's throughput cases (bench/workers.py): a conversation repeated
within a level is made distinct right after the route set's block, so that it cannot reuse the
whole prompt its first use left in the engine's prefix cache."""

from __future__ import annotations

from bench.workers import _lap
from bench.workload import build_workload


def test_a_repeated_conversation_diverges_at_its_first_message() -> None:
    case = build_workload(2).long[0]
    assert _lap(case, 0) is case
    again = _lap(case, 1)
    assert again.name != case.name and again.routes == case.routes
    assert again.messages[0]["role"] == case.messages[0]["role"]
    assert again.messages[0]["content"] == f"(1) {case.messages[0]['content']}"
    assert again.messages[1:] == case.messages[1:]
    assert _lap(case, 2).messages[0] != again.messages[0]
