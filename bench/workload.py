"""The fixed benchmark workload: SGD route set + multi-turn conversations, and a short case."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpc_router.engines.arch_router.prompt import PromptBuilder
from grpc_router.types import Message, Role, RouteSpec
from tests.fixtures.paths import eval_dir

BUDGET = 2048


@dataclass(frozen=True)
class Case:
    name: str
    routes: list[dict[str, str]]
    messages: list[dict[str, str]]

    def route_specs(self) -> list[RouteSpec]:
        return [RouteSpec(r["name"], r["description"]) for r in self.routes]

    def message_objs(self) -> list[Message]:
        return [Message(Role(m["role"]), m["content"]) for m in self.messages]


@dataclass(frozen=True)
class Workload:
    long: list[Case]
    """The 16 SGD routes, multi-turn conversations from data/eval/sgd_dev.jsonl."""
    short: list[Case]
    """5 CLINC150 domains (data/eval), one user turn."""

    def to_json(self) -> dict[str, Any]:
        return {
            "long": [c.__dict__ for c in self.long],
            "short": [c.__dict__ for c in self.short],
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Workload:
        return Workload([Case(**c) for c in data["long"]], [Case(**c) for c in data["short"]])


def build_workload(samples: int) -> Workload:
    """Evenly spaced multi-turn SGD dialogues (>= 5 messages) and single CLINC utterances."""
    data = eval_dir()
    sgd_routes = json.loads((data / "sgd_dev_routes.json").read_text())
    dialogues = [json.loads(line) for line in (data / "sgd_dev.jsonl").open()]
    multi = [d for d in dialogues if len(d["messages"]) >= 5]
    step = max(1, len(multi) // samples)
    long = [
        Case(f"sgd-{d['dialogue_id']}", sgd_routes, d["messages"]) for d in multi[::step][:samples]
    ]
    clinc_routes = json.loads((data / "clinc150_routes.json").read_text())[:5]
    names = {r["name"] for r in clinc_routes}
    utterances = [json.loads(line) for line in (data / "clinc150_val.jsonl").open()]
    chosen = [u for u in utterances if u.get("label") in names]
    step = max(1, len(chosen) // samples)
    short = [Case(f"clinc-{i}", clinc_routes, u["messages"][-1:]) for i, u in
             enumerate(chosen[::step][:samples])]  # fmt: skip
    return Workload(long, short)


def describe(workload: Workload, tokenizer_dir: Path) -> dict[str, Any]:
    """Token statistics of the workload under the real tokenizer (printed and reported)."""
    builder = PromptBuilder.from_dir(tokenizer_dir)
    out: dict[str, Any] = {}
    for kind, cases in (("long", workload.long), ("short", workload.short)):
        prompts = [builder.build(c.message_objs(), c.route_specs(), BUDGET) for c in cases]
        out[kind] = {
            "cases": len(cases),
            "routes": len(cases[0].routes),
            "turns_median": statistics.median(len(c.messages) for c in cases),
            "prompt_tokens_median": statistics.median(len(p.ids) for p in prompts),
            "cacheable_tokens_median": statistics.median(p.prefix_len for p in prompts),
            "suffix_tokens_median": statistics.median(len(p.ids) - p.prefix_len for p in prompts),
        }
    return out
