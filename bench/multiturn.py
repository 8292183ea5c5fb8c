"""The multi-turn workload: SGD dialogues replayed call by call, and agent loops.

A chat client sends the whole conversation on every call, so each user turn of a dialogue is one
call whose conversation is everything up to and including that turn; all calls of a dialogue
carry the dialogue's session id, and a few dialogues are interleaved round robin. An agent loop
is one user request followed by calls that only add a tool call and its result (a tool step).

`run_multiturn` (the `multiturn` worker of `python -m bench.workers`) replays the calls in
process through the router core (`grpc_router.core.router.Router`: routing view, decision cache
and sessions, exactly as served) over the real Arch-Router engine, with the route set's prefix
warm, in three modes: requests with `full_scores` off, on, and off without a session id. Per call
it records the latency, where the decision came from, the tokens the engine prefilled and where
the time went (timers around the engine's phases, see `PhaseTimers`).
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.workload import BUDGET, Case, Workload
from grpc_router.types import Message, MessageKind, Role
from tests.fixtures.paths import eval_dir

KINDS = ("new_conversation", "follow_up", "tool_step")
# (name, RouteRequest.full_scores, send the session id)
MODES: tuple[tuple[str, bool, bool], ...] = (
    ("scores_off", False, True),
    ("scores_on", True, True),
    ("no_session", False, False),
)
PRIMARY_MODE = "scores_off"
# The targets of issue "Session-aware routing" (same run, this 2-core CPU).
TARGET_FOLLOW_UP_VS_A = 30.0
TARGET_NEW_CONVERSATION_VS_A = 15.0
TARGET_TOOL_STEP_P50_MS = 2.0
TARGET_RSS_VS_A = 0.40

# Agent loops: a user request that fits the SGD route set, then tool traffic only.
AGENT_TASKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Find me an Italian restaurant in San Jose for two people tomorrow at 7 pm and book it.",
        ("search_restaurants", "check_availability", "reserve_table", "send_confirmation"),
    ),
    (
        "I need a one-way flight from Seattle to Chicago next Friday morning, economy, and a "
        "hotel near the airport for two nights.",
        ("search_flights", "hold_seat", "search_hotels", "book_room", "email_itinerary"),
    ),
    (
        "Check the weather in Portland this weekend and, if it is dry, get two tickets for an "
        "outdoor concert on Saturday.",
        ("get_forecast", "search_events", "buy_tickets"),
    ),
)


@dataclass(frozen=True)
class Call:
    """One call of the replay, in the order it is sent."""

    stream: str
    """The dialogue or agent loop it belongs to."""
    session_id: str
    kind: str
    """new_conversation, follow_up or tool_step."""
    index: int
    """Its position within its stream."""
    messages: list[dict[str, str]]
    """role, content and kind (text, tool_call, tool_result) of every message sent."""

    def message_objs(self) -> tuple[Message, ...]:
        return tuple(
            Message(Role(m["role"]), m["content"], MessageKind(m.get("kind", "text")))
            for m in self.messages
        )


@dataclass(frozen=True)
class MultiTurnWorkload:
    routes: list[dict[str, str]]
    """The 16 SGD routes, names in snake case (the router's route-name rule)."""
    calls: list[Call]
    dialogues: int
    agent_loops: int
    agent_steps: int

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "calls": [asdict(c) for c in self.calls]}

    @staticmethod
    def from_json(data: dict[str, Any]) -> MultiTurnWorkload:
        calls = [Call(**c) for c in data["calls"]]
        return MultiTurnWorkload(
            data["routes"], calls, data["dialogues"], data["agent_loops"], data["agent_steps"]
        )

    def of_kind(self, kind: str) -> list[int]:
        return [i for i, c in enumerate(self.calls) if c.kind == kind]


def snake(name: str) -> str:
    """RentalCars -> rental_cars: SGD's service names under the router's route-name rule."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _sgd_dialogues(count: int) -> list[tuple[str, list[dict[str, str]]]]:
    """`count` evenly spaced SGD dev dialogues with at least 5 user turns, each as its longest
    case (every case of a dialogue is a prefix of it ending with a user turn)."""
    longest: dict[str, list[dict[str, str]]] = {}
    for line in (eval_dir() / "sgd_dev.jsonl").open(encoding="utf-8"):
        case = json.loads(line)
        did, msgs = case["dialogue_id"], case["messages"]
        if len(msgs) > len(longest.get(did, [])):
            longest[did] = msgs
    multi = sorted((d, m) for d, m in longest.items() if len(m) >= 9)
    step = max(1, len(multi) // max(1, count))
    return multi[::step][:count]


def _replay(name: str, messages: list[dict[str, str]]) -> list[Call]:
    """A call per user turn: the conversation up to and including it."""
    sent = [{"role": x["role"], "content": x["content"], "kind": "text"} for x in messages]
    calls: list[Call] = []
    for end, m in enumerate(messages):
        if m["role"] != "user":
            continue
        kind = "new_conversation" if not calls else "follow_up"
        calls.append(Call(name, name, kind, len(calls), sent[: end + 1]))
    return calls


def _agent_loop(loop: int, steps: int) -> list[Call]:
    request, tools = AGENT_TASKS[loop % len(AGENT_TASKS)]
    name = f"agent-{loop}"
    sent: list[dict[str, str]] = [{"role": "user", "content": request, "kind": "text"}]
    calls = [Call(name, name, "new_conversation", 0, list(sent))]
    for step in range(steps):
        tool = tools[step % len(tools)]
        result = json.dumps(
            {"tool": tool, "step": step, "status": "ok",
             "items": [{"id": f"{tool}-{step}-{k}", "score": round(0.9 - 0.1 * k, 2),
                        "summary": f"candidate {k} for the request, available"}
                       for k in range(3)]}
        )  # fmt: skip
        sent.append({"role": "assistant", "content": f"{tool}(...)", "kind": "tool_call"})
        sent.append({"role": "tool", "content": result, "kind": "tool_result"})
        calls.append(Call(name, name, "tool_step", step + 1, list(sent)))
    return calls


def build_multiturn(dialogues: int, agent_loops: int, agent_steps: int) -> MultiTurnWorkload:
    """The dialogues' and agent loops' calls, interleaved round robin (the first call of every
    stream, then every stream's second call, ...)."""
    routes = json.loads((eval_dir() / "sgd_dev_routes.json").read_text(encoding="utf-8"))
    routes = [{"name": snake(r["name"]), "description": r["description"]} for r in routes]
    streams = [_replay(f"sgd-{did}", msgs) for did, msgs in _sgd_dialogues(dialogues)]
    streams += [_agent_loop(k, agent_steps) for k in range(agent_loops)]
    calls: list[Call] = []
    for i in range(max((len(s) for s in streams), default=0)):
        calls.extend(s[i] for s in streams if i < len(s))
    return MultiTurnWorkload(routes, calls, len(streams) - agent_loops, agent_loops, agent_steps)


def _spread(items: list[int], n: int) -> list[int]:
    """n evenly spaced items."""
    if n >= len(items):
        return list(items)
    return [items[round(k * (len(items) - 1) / max(1, n - 1))] for k in range(n)]


def baseline_sample(workload: MultiTurnWorkload, n: int) -> dict[str, list[int]]:
    """The calls baseline A runs (it takes ~15 s a call here): n follow-ups and n new
    conversations, evenly spread over the replay (so over dialogues and depths)."""
    return {
        "follow_up": _spread(workload.of_kind("follow_up"), n),
        "new_conversation": _spread(workload.of_kind("new_conversation"), n),
    }


def baseline_workload(workload: MultiTurnWorkload, sample: dict[str, list[int]]) -> Workload:
    """The sample as the baseline workers' Workload: long = the follow-ups, short = the new
    conversations (their prompts are built from the same routing view the engine sees)."""

    def case(i: int) -> Case:
        c = workload.calls[i]
        text = [
            {"role": m["role"], "content": m["content"]}
            for m in c.messages
            if m.get("kind", "text") == "text" and m["role"] in ("user", "assistant")
        ]
        return Case(f"{c.stream}#{c.index}", workload.routes, text)

    return Workload(
        [case(i) for i in sample["follow_up"]], [case(i) for i in sample["new_conversation"]]
    )


def describe_multiturn(workload: MultiTurnWorkload, tokenizer_dir: Path) -> dict[str, Any]:
    """Shape of the replay under the real tokenizer (printed and reported)."""
    from grpc_router.core.conversation import routing_view
    from grpc_router.engines.arch_router.prompt import PromptBuilder
    from grpc_router.types import RouteSpec

    builder = PromptBuilder.from_dir(tokenizer_dir)
    specs = [RouteSpec(r["name"], r["description"]) for r in workload.routes]
    out: dict[str, Any] = {
        "dialogues": workload.dialogues,
        "agent_loops": workload.agent_loops,
        "agent_steps": workload.agent_steps,
        "routes": len(workload.routes),
        "calls": len(workload.calls),
        "route_set_tokens": len(builder.route_prefix(specs).ids),
    }
    # Every call prefills the prompt's instruction tail again: it follows the conversation, so
    # its KV depends on it (about the same number of tokens for every call).
    first = builder.build(routing_view(workload.calls[0].message_objs(), ()), specs, BUDGET)
    cut = first.text.index("\n\n</conversation>")
    out["instruction_tail_tokens"] = len(first.ids) - len(builder.tokenizer.encode(
        first.text[:cut], add_special_tokens=False).ids)  # fmt: skip
    for kind in KINDS:
        idx = workload.of_kind(kind)
        prompts = [
            builder.build(routing_view(workload.calls[i].message_objs(), ()), specs, BUDGET)
            for i in idx
        ]
        out[kind] = {
            "calls": len(idx),
            "messages_median": statistics.median(len(workload.calls[i].messages) for i in idx)
            if idx
            else 0,
            "prompt_tokens_median": statistics.median(len(p.ids) for p in prompts)
            if prompts
            else 0,
            "prompt_tokens_max": max((len(p.ids) for p in prompts), default=0),
            "dropped_turns_max": max((p.dropped_turns for p in prompts), default=0),
        }
    return out


# --- where the time goes ----------------------------------------------------------------------


class PhaseTimers:
    """Exclusive wall time per engine phase, from wrappers installed around the engine's own
    functions in this (benchmark) process only; nested phases count in the innermost one.

    prompt: render and tokenize the prompt; prefix_lookup: the radix-tree search; kv_in: the
    kept KV made a run's contiguous input (the copy onnxruntime would make itself, made
    explicit here so that it can be timed) and stacked; onnx_run: onnxruntime's run (the
    graph's own past+new concatenation included); kv_keep: keeping the new KV in the cache;
    score: the route probabilities from the trie's logits."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._stack: list[list[Any]] = []
        self._undo: list[Callable[[], None]] = []

    def reset(self) -> None:
        self.totals = {}

    def snapshot(self) -> dict[str, float]:
        return dict(self.totals)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        frame: list[Any] = [name, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = (time.perf_counter() - frame[1]) * 1e3
            self.totals[name] = self.totals.get(name, 0.0) + elapsed - frame[2]
            if self._stack:
                self._stack[-1][2] += elapsed

    def _wrap(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)
        timers = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            with timers.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)
        self._undo.append(lambda: setattr(owner, attr, original))

    def install(self) -> None:
        import numpy as np

        from grpc_router.engines.arch_router import engine, kvcache, prompt, runtime

        self._wrap(prompt.PromptBuilder, "build", "prompt")
        self._wrap(engine.ArchRouterEngine, "_reuse", "prefix_lookup")
        self._wrap(engine.ArchRouterEngine, "_keep", "kv_keep")
        self._wrap(engine, "stack_past", "kv_in")
        self._wrap(kvcache.KVEntry, "prefix_past", "kv_in")
        self._wrap(engine, "outcome_of", "score")
        original_run = runtime.DecoderSession.run
        timers = self

        def run(self_: Any, ids: Any, mask: Any, positions: Any, past: Any, **kw: Any) -> Any:
            with timers.phase("kv_in"):
                past = [
                    np.ascontiguousarray(p)
                    if isinstance(p, np.ndarray) and not p.flags.c_contiguous
                    else p
                    for p in past
                ]
            with timers.phase("onnx_run"):
                return original_run(self_, ids, mask, positions, past, **kw)

        setattr(runtime.DecoderSession, "run", run)  # noqa: B010  # a bench-only timer
        self._undo.append(lambda: setattr(runtime.DecoderSession, "run", original_run))

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()


PHASES = ("queue", "prompt", "prefix_lookup", "kv_in", "onnx_run", "kv_keep", "score")


# --- the worker -------------------------------------------------------------------------------


def router_config(routes: list[dict[str, str]], cfg: dict[str, Any]) -> dict[str, Any]:
    """The YAML a deployment would write for this route set and engine (parsed by the router's
    own loader). Models are never called: Route only decides."""
    return {
        "routes": [{**r, "models": ["general"]} for r in routes],
        "models": {"general": {"base_url": "http://127.0.0.1:9/v1", "model": "bench"}},
        "default_route": routes[0]["name"],
        "default_model": "general",
        "engine": {
            "kind": "arch-router",
            "arch_router_artifact": cfg["artifact"],
            "arch_router": {
                "provider": cfg["provider"],
                "variant": cfg["variant"],
                "intra_op_threads": cfg["threads"],
                "prompt_token_budget": BUDGET,
            },
        },
        # No engine timeout inside the measurement (a slow int4 call must not fall back).
        "routing": {"engine_timeout_s": 600, "fail_open": True},
        "metrics": {"port": None},
    }


def run_multiturn(cfg: dict[str, Any]) -> dict[str, Any]:
    from bench.workers import peak_rss_bytes, progress
    from grpc_router.core.router import Router
    from grpc_router.engines.arch_router.engine import ArchRouterEngine
    from grpc_router.settings import parse_config
    from grpc_router.types import DecisionSource, RouteRequest

    workload = MultiTurnWorkload.from_json(cfg["multiturn"])
    config = parse_config(router_config(workload.routes, cfg), Path("bench-multiturn.yaml"))
    engine = ArchRouterEngine(Path(cfg["artifact"]), config.engine.arch_router)
    timers = PhaseTimers()
    timers.install()
    routes = config.route_specs()

    async def replay(mode: str, full_scores: bool, sessions: bool) -> list[dict[str, Any]]:
        router = Router(config, engine)
        engine.prefix_cache.clear()
        await engine.warm(routes)  # the route set's prefix, as the server warms it at start
        records: list[dict[str, Any]] = []
        for i, call in enumerate(workload.calls):
            request = RouteRequest(
                messages=call.message_objs(),
                full_scores=full_scores,
                session_id=call.session_id if sessions else "",
            )
            timers.reset()
            t = time.perf_counter()
            outcome = await router.route(request)
            wall_ms = (time.perf_counter() - t) * 1e3
            d = outcome.decision
            ran = outcome.source is DecisionSource.ENGINE and d is not None
            engine_ms = float(d.timings_ms.get("total", 0.0)) if ran and d else 0.0
            phases = timers.snapshot() if ran else {}
            if ran and d:
                phases["queue"] = float(d.timings_ms.get("queue", 0.0))
            records.append({
                "call": i, "kind": call.kind, "stream": call.stream, "wall_ms": wall_ms,
                "source": str(outcome.source), "route": outcome.route,
                "fallback": str(outcome.fallback_reason),
                "prompt_tokens": d.prompt_tokens if ran and d else 0,
                "cached_tokens": d.cached_tokens if ran and d else 0,
                "prefilled_tokens": d.prompt_tokens - d.cached_tokens if ran and d else 0,
                "engine_scored": bool(ran and d and d.scores),
                "engine_ms": engine_ms, "phases_ms": phases,
            })  # fmt: skip
            if ran:
                progress(f"{cfg['variant']} {mode} call {i + 1}/{len(workload.calls)} "
                         f"({call.kind}): {wall_ms:.0f} ms, "
                         f"{records[-1]['prefilled_tokens']} tokens prefilled")  # fmt: skip
        await router.close()
        progress(f"{cfg['variant']} {mode}: " + ", ".join(
            f"{k} p50 {_p50([r['wall_ms'] for r in records if r['kind'] == k]):.1f} ms"
            for k in KINDS))  # fmt: skip
        return records

    async def main() -> dict[str, Any]:
        t = time.perf_counter()
        await engine.start()
        out: dict[str, Any] = {"load_s": time.perf_counter() - t, "provider": engine.provider,
                               "variant": engine.variant, "modes": {},
                               "rss_after_load_bytes": peak_rss_bytes(),
                               "prefix_cache_max_bytes": engine.prefix_cache.max_bytes}  # fmt: skip
        # Untimed: the first round of calls (every stream's first), once. A process's first
        # prompt-sized runs are slower (onnxruntime's arenas grow, the weights' pages come in);
        # without this the first mode's new conversations took twice as long as the others'.
        t = time.perf_counter()
        warm_router = Router(config, engine)
        for call in workload.calls:
            if call.index:
                break
            await warm_router.route(RouteRequest(messages=call.message_objs()))
        await warm_router.close()
        out["warmup_s"] = time.perf_counter() - t
        progress(f"{cfg['variant']}: warm-up round {out['warmup_s']:.1f} s (not measured)")
        wanted = cfg.get("modes") or [m for m, _, _ in MODES]
        for mode, full_scores, sessions in MODES:
            if mode not in wanted:
                continue
            records = await replay(mode, full_scores, sessions)
            out["modes"][mode] = {"calls": records, "summary": summarize(records),
                                  "full_scores": full_scores, "sessions": sessions,
                                  "prefix_cache_bytes": engine.prefix_cache.nbytes,
                                  "prefix_cache_entries": len(engine.prefix_cache),
                                  "peak_rss_bytes": peak_rss_bytes()}  # fmt: skip
        await engine.close()
        return out

    try:
        result = asyncio.run(main())
    finally:
        timers.uninstall()
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


# --- summaries, ratios, targets, tables -------------------------------------------------------


def _p50(ms: list[float]) -> float:
    return float(statistics.median(ms)) if ms else float("nan")


def _median(values: list[int]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _p95(ms: list[float]) -> float:
    ordered = sorted(ms)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] if ms else float("nan")


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kind: latency, prefilled tokens, decision sources and the median time per phase of
    the calls that ran the engine."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        rows = [r for r in records if r["kind"] == kind]
        if not rows:
            continue
        ms = [r["wall_ms"] for r in rows]
        ran = [r for r in rows if r["source"] == "engine"]
        sources: dict[str, int] = {}
        for r in rows:
            sources[r["source"]] = sources.get(r["source"], 0) + 1
        phases = {p: _p50([r["phases_ms"].get(p, 0.0) for r in ran]) for p in PHASES} if ran else {}
        if ran:
            phases["engine_other"] = _p50(
                [r["engine_ms"] - sum(r["phases_ms"].values()) for r in ran]
            )
        out[kind] = {
            "n": len(rows),
            "p50_ms": _p50(ms),
            "p95_ms": _p95(ms),
            "mean_ms": statistics.fmean(ms),
            "prefilled_tokens_median": statistics.median(r["prefilled_tokens"] for r in rows),
            "prefilled_tokens_mean": statistics.fmean(r["prefilled_tokens"] for r in rows),
            "prompt_tokens_median": _median([r["prompt_tokens"] for r in ran]),
            "cached_tokens_median": _median([r["cached_tokens"] for r in ran]),
            "engine_scored": sum(r["engine_scored"] for r in rows),
            "sources": sources,
            "fallbacks": sum(1 for r in rows if r["fallback"]),
            "engine_p50_ms": _p50([r["engine_ms"] for r in ran]) if ran else 0.0,
            "router_overhead_p50_ms": _p50([r["wall_ms"] - r["engine_ms"] for r in rows]),
            "phases_p50_ms": phases,
        }  # fmt: skip
    return out


def multiturn_ratios(report: dict[str, Any]) -> None:
    """Adds ratios.<variant>.{follow_up,new_conversation} (vs A on the same calls),
    latency.<variant>.{kind}, and multiturn.targets to the report."""
    mt = report.get("multiturn")
    if not mt:
        return
    a = mt.get("A")
    sample: dict[str, list[int]] = mt["a_sample"]
    report.setdefault("latency", {})
    targets: dict[str, Any] = {}
    for variant, eng in mt["engine"].items():
        row = report["ratios"].setdefault(variant, {})
        lat: dict[str, Any] = {}
        for mode, data in eng["modes"].items():
            lat[mode] = {k: {key: v[key] for key in ("n", "p50_ms", "p95_ms",
                                                      "prefilled_tokens_median")}
                         for k, v in data["summary"].items()}  # fmt: skip
        report["latency"][variant] = {**lat[PRIMARY_MODE], "by_mode": lat}
        for kind, base_key in (("follow_up", "long"), ("new_conversation", "short")):
            entry: dict[str, Any] = {"mode": PRIMARY_MODE, "sample_calls": sample[kind]}
            by_mode: dict[str, Any] = {}
            for mode, data in eng["modes"].items():
                calls = data["calls"]
                matched = _p50([calls[i]["wall_ms"] for i in sample[kind]])
                all_p50 = data["summary"][kind]["p50_ms"]
                a_p50 = float(a[base_key]["p50_ms"]) if a else None
                by_mode[mode] = {
                    "engine_p50_ms": matched,
                    "engine_p50_ms_all_calls": all_p50,
                    "A_p50_ms": a_p50,
                    "vs_A": a_p50 / matched if a_p50 else None,
                    "vs_A_all_calls": a_p50 / all_p50 if a_p50 else None,
                }
            entry.update(by_mode[PRIMARY_MODE])
            entry["by_mode"] = by_mode
            row[kind] = entry
        rss = eng["peak_rss_bytes"] / a["peak_rss_bytes"] if a else None
        row["multiturn_rss_vs_A"] = rss
        tool = eng["modes"][PRIMARY_MODE]["summary"].get("tool_step", {})
        checks = {
            "follow_up_vs_A": (row["follow_up"]["vs_A"], TARGET_FOLLOW_UP_VS_A, ">="),
            "tool_step_p50_ms": (tool.get("p50_ms"), TARGET_TOOL_STEP_P50_MS, "<="),
            "new_conversation_vs_A": (
                row["new_conversation"]["vs_A"], TARGET_NEW_CONVERSATION_VS_A, ">="),
            "peak_rss_vs_A": (rss, TARGET_RSS_VS_A, "<="),
        }  # fmt: skip
        targets[variant] = {
            name: {"value": v, "target": t, "op": op,
                   "holds": None if v is None else (v >= t if op == ">=" else v <= t)}
            for name, (v, t, op) in checks.items()
        }  # fmt: skip
    mt["targets"] = targets


def _f(x: float | None, digits: int = 1) -> str:
    if x is None or x != x:
        return "–"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _ms(x: float | None) -> str:
    if x is None or x != x:
        return "–"
    return f"{x / 1e3:.2f} s" if x >= 1000 else f"{x:.0f} ms" if x >= 10 else f"{x:.2f} ms"


def multiturn_markdown(report: dict[str, Any]) -> str:
    mt = report.get("multiturn")
    if not mt:
        return ""
    w = mt["workload"]
    a = mt.get("A")
    n_a = len(mt["a_sample"]["follow_up"]), len(mt["a_sample"]["new_conversation"])
    lines = [
        "### Multi-turn: SGD dialogues replayed call by call, agent loops",
        "",
        f"Workload: {w['dialogues']} SGD dialogues interleaved ({w['follow_up']['calls']} "
        f"follow-up user turns, median {w['follow_up']['prompt_tokens_median']} prompt tokens, "
        f"max {w['follow_up']['prompt_tokens_max']}), {w['agent_loops']} agent loops of "
        f"{w['agent_steps']} tool steps, {w['routes']} routes ({w['route_set_tokens']} tokens of "
        f"route-set prefix, warm; every engine call also prefills the prompt's "
        f"{w.get('instruction_tail_tokens', '?')}-token instruction tail, which follows the "
        f"conversation); {w['calls']} calls in all, through the router core in process. "
        "Baseline A (transformers fp32 `generate`, which recomputes the whole prompt) "
        f"ran on a sample: {n_a[0]} follow-ups and {n_a[1]} new conversations; the ratios "
        "compare the engine's p50 on those same calls.",
        "",
        "| variant | mode | call kind | n | p50 | p95 | tokens prefilled (median) | "
        "decisions from | engine p50 | router overhead p50 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, eng in mt["engine"].items():
        for mode, data in eng["modes"].items():
            for kind, s in data["summary"].items():
                src = ", ".join(f"{k} {v}" for k, v in sorted(s["sources"].items()))
                lines.append(
                    f"| {variant} | {mode} | {kind.replace('_', ' ')} | {s['n']} | "
                    f"{_ms(s['p50_ms'])} | {_ms(s['p95_ms'])} | "
                    f"{s['prefilled_tokens_median']:.0f} | {src} | {_ms(s['engine_p50_ms'])} | "
                    f"{_ms(s['router_overhead_p50_ms'])} |"
                )
    if a:
        lines += [
            "",
            f"Baseline A on the sample: follow-up p50 {_ms(a['long']['p50_ms'])}, new "
            f"conversation p50 {_ms(a['short']['p50_ms'])}, peak RSS "
            f"{a['peak_rss_bytes'] / 2**30:.2f} GiB.",
        ]
    lines += [
        "",
        "| variant | mode | follow-up: engine / A / × | new conversation: engine / A / × | "
        "peak RSS / A |",
        "|---|---|---|---|---|",
    ]
    for variant, eng in mt["engine"].items():
        row = report["ratios"].get(variant, {})
        rss = row.get("multiturn_rss_vs_A")
        for mode in eng["modes"]:
            fu = row["follow_up"]["by_mode"][mode]
            nc = row["new_conversation"]["by_mode"][mode]
            lines.append(
                f"| {variant} | {mode} | {_ms(fu['engine_p50_ms'])} / {_ms(fu['A_p50_ms'])} / "
                f"**{_f(fu['vs_A'])}** | {_ms(nc['engine_p50_ms'])} / {_ms(nc['A_p50_ms'])} / "
                f"**{_f(nc['vs_A'])}** | "
                f"{'–' if rss is None else f'{100 * rss:.0f}%'} "
                f"({eng['peak_rss_bytes'] / 2**30:.2f} GiB) |"
            )
    for variant, eng in mt["engine"].items():
        if "rss_after_load_bytes" not in eng:
            continue
        kept = max(d.get("prefix_cache_bytes", 0) for d in eng["modes"].values())
        lines.append("")
        lines.append(
            f"Peak RSS, {variant}: {eng['rss_after_load_bytes'] / 2**30:.2f} GiB once loaded and "
            f"warm, {eng['peak_rss_bytes'] / 2**30:.2f} GiB after the replay, whose prefix cache "
            f"held up to {kept / 2**20:.0f} MiB of KV (bound "
            f"`prefix_cache_bytes` = {eng['prefix_cache_max_bytes'] / 2**20:.0f} MiB)."
        )
    lines += [
        "",
        f"Where an engine call's time goes (mode {PRIMARY_MODE}, medians, ms):",
        "",
        "| variant | call kind | total | queue | prompt | prefix lookup | KV in | onnx run "
        "| KV keep | score | engine other | router |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, eng in mt["engine"].items():
        for kind, s in eng["modes"][PRIMARY_MODE]["summary"].items():
            ph = s["phases_p50_ms"]
            if not ph:
                lines.append(
                    f"| {variant} | {kind.replace('_', ' ')} | {s['p50_ms']:.2f} | no engine run "
                    f"| | | | | | | | {s['router_overhead_p50_ms']:.2f} |"
                )
                continue
            cells = " | ".join(f"{ph.get(p, 0.0):.1f}" for p in (*PHASES, "engine_other"))
            lines.append(
                f"| {variant} | {kind.replace('_', ' ')} | {s['p50_ms']:.0f} | {cells} | "
                f"{s['router_overhead_p50_ms']:.2f} |"
            )
    floors = mt.get("floor") or {}
    for variant, by_kind in floors.items():
        if not by_kind:
            continue
        rate = next(iter(by_kind.values()))
        parts = [
            f"{kind.replace('_', ' ')} {f['floor_ms']:.0f} ms ({f['suffix_tokens']:.0f} tokens "
            f"after {f['cached_tokens']:.0f})"
            for kind, f in by_kind.items()
        ]
        lines += [
            "",
            f"Compute floor of the median {variant} engine call at the {rate['gemm']} rate "
            f"measured in this run ({rate['int8_ops_per_s'] / 1e9:.0f} GOPS): "
            + "; ".join(parts)
            + ".",
        ]
    loads = [f"{v} {e['loadavg_1m_after']:.1f}" for v, e in mt["engine"].items()
             if e.get("loadavg_1m_after") is not None]  # fmt: skip
    if a and a.get("loadavg_1m_after") is not None:
        loads.append(f"A {a['loadavg_1m_after']:.1f}")
    if loads:
        lines += ["", "Machine load (1-minute load average as each worker ended; 2 cores): "
                  + ", ".join(loads) + "."]  # fmt: skip
    if mt.get("targets"):
        lines += ["", "| target | " + " | ".join(mt["targets"]) + " |",
                  "|---|" + "---|" * len(mt["targets"])]  # fmt: skip
        names = {
            "follow_up_vs_A": f"follow-up user turn ≥ {TARGET_FOLLOW_UP_VS_A:.0f}× faster than A",
            "tool_step_p50_ms": f"tool step p50 ≤ {TARGET_TOOL_STEP_P50_MS:.0f} ms in process",
            "new_conversation_vs_A": "new conversation (warm route set, scores off) ≥ "
            f"{TARGET_NEW_CONVERSATION_VS_A:.0f}× A",
            "peak_rss_vs_A": f"peak RSS ≤ {100 * TARGET_RSS_VS_A:.0f}% of A",
        }
        for key, label in names.items():
            verdicts: list[str] = []
            for t in mt["targets"].values():
                c = t[key]
                verdict = {True: "holds", False: "**misses**", None: "not measured"}[c["holds"]]
                verdicts.append(f"{_target_value(key, c['value'])}: {verdict}")
            lines.append(f"| {label} | " + " | ".join(verdicts) + " |")
    return "\n".join(lines) + "\n"


def _target_value(key: str, value: float | None) -> str:
    if value is None:
        return "–"
    if key == "peak_rss_vs_A":
        return f"{100 * value:.0f}%"
    return f"{value:.2f} ms" if key == "tool_step_p50_ms" else f"{value:.1f}×"


def target_lines(report: dict[str, Any]) -> list[str]:
    """One line per target and variant, for the console."""
    out = []
    for variant, checks in report.get("multiturn", {}).get("targets", {}).items():
        for name, c in checks.items():
            verdict = {True: "HOLDS", False: "MISSES", None: "not measured"}[c["holds"]]
            value = "–" if c["value"] is None else f"{c['value']:.3g}"
            out.append(f"{variant} {name}: {value} (target {c['op']} {c['target']}) {verdict}")
    return out
