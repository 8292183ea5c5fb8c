"""Encoder and cascade benchmark: `python -m bench.cascade [--layers 2]`.

Measures, in process and one decision at a time, on the dev sets in data/eval:
- the encoder alone: accuracy, p50/p95 latency;
- the cascade margin sweep from the encoder's own probabilities: the share of decisions the fast
  path would answer and its accuracy on them;
- the cascade itself (encoder in front of an Arch-Router artifact; by default the random-weight
  full-shape one, built on first use): the share answered by each engine and each path's latency.
  With random weights the slow path's answers mean nothing; its latency is real.

Writes reports/bench-cascade.{json,md}. Hold `flock /tmp/heavy.lock` around it when the slow
engine is the 28-layer model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from grpc_router.engines.arch_router.engine import ArchRouterEngine
from grpc_router.engines.cascade import CascadeEngine, probability_margin
from grpc_router.engines.encoder.engine import EncoderEngine
from grpc_router.evaluate import EvalCase, load_cases, load_routes
from grpc_router.settings import ArchRouterSettings, EncoderSettings
from grpc_router.types import RouteSpec
from tests.fixtures.checkpoints import ensure_full_shape_artifact
from tests.fixtures.paths import eval_dir, repo_root

SETS = (("clinc150_val", "clinc150_routes"), ("sgd_dev", "sgd_dev_routes"))
MARGINS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 0.9)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _data(limit: int) -> list[tuple[str, tuple[RouteSpec, ...], list[EvalCase]]]:
    root = eval_dir()
    out = []
    for name, routes_name in SETS:
        routes = load_routes(root / f"{routes_name}.json")
        cases = load_cases(root / f"{name}.jsonl", routes, None)
        # An even spread over the file (the sets are grouped by label).
        step = max(1, len(cases) // limit)
        out.append((name, routes, cases[::step][:limit]))
    return out


async def _encoder_alone(
    engine: EncoderEngine, data: list[tuple[str, tuple[RouteSpec, ...], list[EvalCase]]]
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, routes, cases in data:
        engine.index(routes)  # route-set embedding is a one-off per set, not per decision
        latency, correct, margins, right = [], 0, [], []
        for case in cases:
            start = time.perf_counter()
            d = await engine.decide(case.messages, routes)
            latency.append((time.perf_counter() - start) * 1e3)
            correct += d.route == case.label
            margins.append(probability_margin(d.scores))
            right.append(d.route == case.label)
        # A live conversation: the earlier turns were embedded by the previous calls (turn cache).
        live = []
        assert engine.model is not None
        engine.model.clear_cache()
        for case in cases:
            if len(case.messages) > 1:
                await engine.decide(case.messages[:-1], routes)
            start = time.perf_counter()
            await engine.decide(case.messages, routes)
            live.append((time.perf_counter() - start) * 1e3)
        m, r = np.asarray(margins), np.asarray(right)
        result[name] = {
            "cases": len(cases),
            "accuracy": correct / len(cases),
            "p50_ms": _pct(latency, 50),
            "p95_ms": _pct(latency, 95),
            "live_p50_ms": _pct(live, 50),
            "live_p95_ms": _pct(live, 95),
            "sweep": [
                {
                    "margin": t,
                    "fast_share": float((m >= t).mean()),
                    "fast_accuracy": float(r[m >= t].mean()) if (m >= t).any() else float("nan"),
                }
                for t in MARGINS
            ],
        }
    return result


async def _cascade(
    cascade: CascadeEngine, data: list[tuple[str, tuple[RouteSpec, ...], list[EvalCase]]]
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, routes, cases in data:
        per: dict[str, list[float]] = {"encoder": [], "arch-router": []}
        for case in cases:
            start = time.perf_counter()
            d = await cascade.decide(case.messages, routes)
            per[d.engine].append((time.perf_counter() - start) * 1e3)
        result[name] = {
            "cases": len(cases),
            "fast_share": len(per["encoder"]) / len(cases),
            "fast_p50_ms": _pct(per["encoder"], 50),
            "fast_p95_ms": _pct(per["encoder"], 95),
            "slow_p50_ms": _pct(per["arch-router"], 50),
            "slow_p95_ms": _pct(per["arch-router"], 95),
        }
        print(f"[bench-cascade] {name}: {result[name]}", file=sys.stderr, flush=True)
    return result


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Encoder and cascade benchmark",
        "",
        f"{report['machine']}; one decision at a time, in process.",
        "",
        "## Encoder alone",
        "",
        "live: the conversation's earlier turns were embedded by the previous call (turn cache), "
        "as in a running conversation; otherwise every turn is embedded fresh.",
        "",
        "| set | cases | accuracy | p50 ms | p95 ms | live p50 ms | live p95 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["encoder"].items():
        lines.append(
            f"| {name} | {r['cases']} | {r['accuracy']:.1%} | {r['p50_ms']:.2f} "
            f"| {r['p95_ms']:.2f} | {r['live_p50_ms']:.2f} | {r['live_p95_ms']:.2f} |"
        )
    lines += ["", "## Cascade margin sweep (encoder probabilities)", ""]
    lines += ["| set | margin | fast-path share | fast-path accuracy |", "|---|---|---|---|"]
    for name, r in report["encoder"].items():
        for s in r["sweep"]:
            lines.append(
                f"| {name} | {s['margin']:.1f} | {s['fast_share']:.1%} | {s['fast_accuracy']:.1%} |"
            )
    if report.get("cascade"):
        lines += [
            "",
            f"## Cascade (margin {report['margin']}, slow engine {report['slow_artifact']})",
            "",
            "| set | cases | fast share | fast p50 ms | fast p95 ms | slow p50 ms | slow p95 ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in report["cascade"].items():
            lines.append(
                f"| {name} | {r['cases']} | {r['fast_share']:.1%} | {r['fast_p50_ms']:.2f} "
                f"| {r['fast_p95_ms']:.2f} | {r['slow_p50_ms']:.1f} | {r['slow_p95_ms']:.1f} |"
            )
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import platform

    data = _data(args.limit)
    encoder_root = args.encoder_artifact or repo_root() / "artifacts" / "minilm"
    engine = EncoderEngine(encoder_root, EncoderSettings(threads=args.threads))
    await engine.start()
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, threads {args.threads}",
        "encoder": await _encoder_alone(engine, data),
        "margin": args.margin,
    }
    await engine.close()
    if not args.skip_cascade:
        slow_root = args.arch_router_artifact or ensure_full_shape_artifact(layers=args.layers)
        report["slow_artifact"] = str(slow_root)
        cascade = CascadeEngine(
            EncoderEngine(encoder_root, EncoderSettings(threads=args.threads)),
            ArchRouterEngine(slow_root, ArchRouterSettings(intra_op_threads=args.threads)),
            args.margin,
        )
        await cascade.start()
        cut = [(n, r, c[: args.cascade_limit]) for n, r, c in data]
        report["cascade"] = await _cascade(cascade, cut)
        await cascade.close()
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cascade", description=__doc__)
    p.add_argument("--limit", type=int, default=300, help="cases per set for the encoder")
    p.add_argument("--cascade-limit", type=int, default=40, help="cases per set for the cascade")
    p.add_argument("--margin", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=2, help="slow engine: full-shape layers")
    p.add_argument("--encoder-artifact", type=Path, default=None)
    p.add_argument("--arch-router-artifact", type=Path, default=None)
    p.add_argument("--skip-cascade", action="store_true")
    p.add_argument("--out", type=Path, default=Path("reports"))
    args = p.parse_args(argv)
    report = asyncio.run(main_async(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-cascade.json").write_text(json.dumps(report, indent=2) + "\n")
    text = _markdown(report)
    (args.out / "bench-cascade.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
