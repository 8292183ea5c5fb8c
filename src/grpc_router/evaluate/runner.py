"""`grpc-router eval`: routing quality and latency on a labelled JSONL set.

Data format (see data/eval/README.md): one JSON object per line,
`{"messages": [{"role": "user", "content": "..."}, ...], "label": "<route>" | null}`; a routes
file is `[{"name": ..., "description": ..., "examples": [...]?}]`. `label: null` expects `other`.

In process, cases go through `grpc_router.core.router.Router` (the service's own code path); with
`--target` they go over gRPC to a running server. Route names are normalised to the service's
pattern (lower snake case), labels alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from grpc_router.types import OTHER_ROUTE, Message, Role, RouteRequest, RouteSpec

DEFAULT_OUT = Path("reports")
_NAME_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_NAME_OTHER = re.compile(r"[^a-z0-9_]+")


class EvalDataError(ValueError):
    """An eval set or routes file is malformed; the message says where."""


@dataclass(frozen=True, slots=True)
class EvalCase:
    messages: tuple[Message, ...]
    label: str
    """Normalised route name, or OTHER_ROUTE for `label: null`."""


@dataclass(frozen=True, slots=True)
class Prediction:
    route: str
    """The engine's answer before any fallback (OTHER_ROUTE included); "" on failure."""
    engine: str
    latency_ms: float
    error: str = ""


Predictor = Callable[[EvalCase], Awaitable[Prediction]]


def route_name(name: str) -> str:
    """ "RentalCars" -> "rental_cars": the service's route-name pattern."""
    snake = _NAME_OTHER.sub("_", _NAME_CAMEL.sub("_", name.strip()).lower()).strip("_")
    if not snake or not snake[0].isalpha():
        snake = f"r_{snake}"
    return snake[:64]


def load_routes(path: Path) -> tuple[RouteSpec, ...]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise EvalDataError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise EvalDataError(f"{path}: expected a non-empty JSON list of routes")
    routes = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise EvalDataError(f"{path}: routes[{i}] needs a string 'name'")
        examples = item.get("examples") or []
        routes.append(
            RouteSpec(route_name(item["name"]), str(item.get("description", "")), tuple(examples))
        )
    names = [r.name for r in routes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EvalDataError(f"{path}: route names collide after normalisation: {dupes}")
    return tuple(routes)


def load_cases(path: Path, routes: Sequence[RouteSpec], limit: int | None) -> list[EvalCase]:
    names = {r.name for r in routes}
    cases: list[EvalCase] = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as e:
        raise EvalDataError(f"{path}: cannot read ({e.strerror})") from None
    with handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            if limit is not None and len(cases) >= limit:
                break
            try:
                row = json.loads(line)
                messages = tuple(
                    Message(Role(m["role"]), str(m["content"])) for m in row["messages"]
                )
                raw = row["label"]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise EvalDataError(
                    f"{path}:{lineno}: expected {{'messages': [{{'role', 'content'}}...], "
                    f"'label': str|null}} ({type(e).__name__}: {e})"
                ) from None
            label = OTHER_ROUTE if raw is None else route_name(str(raw))
            if label != OTHER_ROUTE and label not in names:
                raise EvalDataError(f"{path}:{lineno}: label {raw!r} is not in the routes file")
            cases.append(EvalCase(messages, label))
    if not cases:
        raise EvalDataError(f"{path}: no cases")
    return cases


# -- metrics ------------------------------------------------------------------------------------


def _f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def compute_metrics(
    cases: Sequence[EvalCase], preds: Sequence[Prediction], routes: Sequence[RouteSpec]
) -> dict[str, Any]:
    labels = [c.label for c in cases]
    answers = [p.route or "<error>" for p in preds]
    classes = [r.name for r in routes] + [OTHER_ROUTE]
    confusion = Counter(zip(labels, answers, strict=True))
    per_class = {}
    for name in classes:
        tp = confusion[(name, name)]
        fp = sum(n for (t, a), n in confusion.items() if a == name and t != name)
        fn = sum(n for (t, a), n in confusion.items() if t == name and a != name)
        p, r, f = _f1(tp, fp, fn)
        per_class[name] = {"precision": p, "recall": r, "f1": f, "support": tp + fn}
    present = [n for n in classes if per_class[n]["support"] > 0]
    in_scope = [(t, a) for t, a in zip(labels, answers, strict=True) if t != OTHER_ROUTE]
    latencies = np.asarray([p.latency_ms for p in preds if not p.error], dtype=np.float64)
    engines = Counter(p.engine for p in preds if not p.error)
    other = per_class[OTHER_ROUTE]
    return {
        "cases": len(cases),
        "accuracy": sum(t == a for t, a in zip(labels, answers, strict=True)) / len(cases),
        "in_scope_cases": len(in_scope),
        "in_scope_accuracy": (sum(t == a for t, a in in_scope) / len(in_scope))
        if in_scope
        else math.nan,
        "macro_f1": float(np.mean([per_class[n]["f1"] for n in present])),
        "other_precision": other["precision"],
        "other_recall": other["recall"],
        "other_support": other["support"],
        "errors": sum(1 for p in preds if p.error),
        "latency_ms": {
            "p50": float(np.percentile(latencies, 50)) if latencies.size else math.nan,
            "p95": float(np.percentile(latencies, 95)) if latencies.size else math.nan,
            "mean": float(latencies.mean()) if latencies.size else math.nan,
        },
        "engines": dict(engines),
        "per_route": per_class,
        "confusion": {
            t: {a: confusion[(t, a)] for a in [*classes, "<error>"] if confusion[(t, a)]}
            for t in classes
            if any(confusion[(t, a)] for a in [*classes, "<error>"])
        },
    }


def markdown_report(title: str, m: dict[str, Any], routes: Sequence[RouteSpec]) -> str:
    lat = m["latency_ms"]
    engines = ", ".join(f"{k or '?'} {v}" for k, v in sorted(m["engines"].items()))
    lines = [
        f"# {title}",
        "",
        "| cases | accuracy | in-scope accuracy | macro-F1 | other P | other R | p50 ms | p95 ms "
        "| engines |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {m['cases']} | {m['accuracy']:.2%} | {m['in_scope_accuracy']:.2%} | "
        f"{m['macro_f1']:.3f} | {m['other_precision']:.2%} | {m['other_recall']:.2%} "
        f"(n={m['other_support']}) | {lat['p50']:.2f} | {lat['p95']:.2f} | {engines} |",
        "",
        "## Per route",
        "",
        "| route | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for name, r in m["per_route"].items():
        if r["support"] or r["precision"]:
            lines.append(
                f"| {name} | {r['precision']:.2%} | {r['recall']:.2%} | {r['f1']:.3f} "
                f"| {r['support']} |"
            )
    cols = [r.name for r in routes] + [OTHER_ROUTE]
    if m["errors"]:
        cols.append("<error>")
    lines += [
        "",
        "## Confusion matrix (rows: label, columns: answer)",
        "",
        "| label \\ answer | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for label, row in m["confusion"].items():
        lines.append(f"| {label} | " + " | ".join(str(row.get(c, 0)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


# -- predictors -------------------------------------------------------------------------------


def _eval_config(routes: Sequence[RouteSpec], engine: Any) -> Any:
    from grpc_router.settings import AppConfig

    return AppConfig.model_validate(
        {
            "routes": [
                {
                    "name": r.name,
                    "description": r.description or r.name,
                    "models": ["eval"],
                    "examples": list(r.examples),
                }
                for r in routes
            ],
            # Never called: eval only routes.
            "models": {"eval": {"base_url": "http://127.0.0.1:9/v1", "model": "eval"}},
            "default_route": "eval_fallback",
            "default_model": "eval",
            "engine": engine,
            "metrics": {"port": None},
        }
    )


async def _in_process(
    routes: Sequence[RouteSpec], engine_cfg: Any, run: Callable[[Predictor], Awaitable[None]]
) -> None:
    from grpc_router.core.router import Router
    from grpc_router.engines.selection import build_engine

    engine = build_engine(engine_cfg, base_dir=Path.cwd())
    await engine.start()
    router = Router(_eval_config(routes, engine_cfg), engine)

    async def predict(case: EvalCase) -> Prediction:
        start = time.perf_counter()
        try:
            outcome = await router.route(RouteRequest(case.messages))
        except Exception as e:  # reported per case; the run goes on
            return Prediction("", "", 0.0, f"{type(e).__name__}: {e}")
        latency = (time.perf_counter() - start) * 1e3
        if outcome.decision is None:
            return Prediction("", "", latency, outcome.fallback_reason or "engine failed")
        return Prediction(outcome.decision.route, outcome.engine, latency)

    try:
        await run(predict)
    finally:
        await router.close()
        await engine.close()


async def _over_grpc(
    target: str, routes: Sequence[RouteSpec], run: Callable[[Predictor], Awaitable[None]]
) -> None:
    import grpc

    from grpc_router.serving.wire import messages_to_pb, routes_to_pb
    from grpc_router.v1 import router_pb2, router_pb2_grpc

    defs = routes_to_pb(routes)
    async with grpc.aio.insecure_channel(target) as channel:
        # The async stub type exists only in the .pyi; at runtime the one class serves both.
        stub: router_pb2_grpc.RouterServiceAsyncStub = router_pb2_grpc.RouterServiceStub(channel)

        async def predict(case: EvalCase) -> Prediction:
            request = router_pb2.RouteRequest(
                messages=messages_to_pb(case.messages),
                routes=defs,
            )
            start = time.perf_counter()
            try:
                reply = await stub.Route(request, timeout=60)
            except grpc.aio.AioRpcError as e:
                return Prediction("", "", 0.0, f"{e.code().name}: {e.details()}")
            latency = (time.perf_counter() - start) * 1e3
            if not reply.engine_route:
                return Prediction("", "", latency, reply.fallback_detail or "engine failed")
            return Prediction(reply.engine_route, reply.engine, latency)

        await run(predict)


# -- driver -----------------------------------------------------------------------------------


class ProgressBar:
    """A one-line progress bar on a terminal, periodic lines otherwise."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.stream = stream
        self.start = time.perf_counter()
        self.tty = stream.isatty()
        self._last = 0.0

    def update(self, done: int, correct: int) -> None:
        now = time.perf_counter()
        if done < self.total and now - self._last < (0.2 if self.tty else 10.0):
            return
        self._last = now
        width = 30
        filled = int(width * done / self.total)
        rate = done / max(now - self.start, 1e-9)
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
            f"acc {correct / max(done, 1):.1%} {rate:.0f}/s"
        )
        if self.tty:
            end = "\n" if done >= self.total else ""
            print("\r" + line, end=end, file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)


async def run_eval(
    set_path: Path,
    routes_path: Path,
    *,
    engine: Any = None,
    target: str | None = None,
    limit: int | None = None,
    out: Path | None = DEFAULT_OUT,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate; returns the metrics (also written as JSON and Markdown under `out`).

    `engine` is a `grpc_router.engines.selection.EngineConfig` (in process); `target` (host:port)
    evaluates a running server instead."""
    from grpc_router.settings import EngineConfig

    routes = load_routes(routes_path)
    cases = load_cases(set_path, routes, limit)
    engine_cfg = engine if engine is not None else EngineConfig()
    preds: list[Prediction] = []
    bar = ProgressBar(len(cases)) if progress else None

    async def run(predict: Predictor) -> None:
        correct = 0
        for case in cases:
            pred = await predict(case)
            preds.append(pred)
            correct += pred.route == case.label
            if bar is not None:
                bar.update(len(preds), correct)

    if target:
        await _over_grpc(target, routes, run)
        mode = f"grpc {target}"
    else:
        await _in_process(routes, engine_cfg, run)
        mode = f"in-process, engine {engine_cfg.kind}"
    metrics = compute_metrics(cases, preds, routes)
    metrics.update(
        {
            "set": str(set_path),
            "routes": str(routes_path),
            "mode": mode,
            "limit": limit,
        }
    )
    if out is not None:
        engine_tag = sorted(metrics["engines"])[0] if metrics["engines"] else "none"
        if len(metrics["engines"]) > 1:
            engine_tag = "cascade"
        stem = f"eval-{set_path.stem}-{engine_tag}"
        title = f"eval {set_path.name} ({mode}{f', first {limit}' if limit else ''})"
        _write_report(out, stem, metrics, markdown_report(title, metrics, routes))
        metrics["report"] = str(out / f"{stem}.md")
    return metrics


def fit_temperature(scores: Sequence[Any], labels: Sequence[int]) -> float:
    """The softmax temperature minimising the negative log-likelihood of the labels (a grid
    over 0.002..1, log-spaced): what makes the scores honest probabilities."""
    best_t, best_nll = 1.0, math.inf
    for t in np.geomspace(0.002, 1.0, 120):
        nll = 0.0
        for row, y in zip(scores, labels, strict=True):
            z = np.asarray(row, dtype=np.float64) / t
            z -= z.max()
            nll -= z[y] - math.log(float(np.exp(z).sum()))
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


async def calibrate_encoder(
    sets: Sequence[tuple[Path, Path]],
    *,
    engine: Any = None,
    quantile: float = 0.02,
    limit: int | None = None,
) -> dict[str, Any]:
    """Calibrate the encoder's `temperature` and `other_threshold` on labelled sets.

    temperature: the NLL-optimal softmax temperature over the in-scope cases' route scores.
    other_threshold: the `quantile` of the in-scope cases' best route score, so that about that
    share of in-scope cases is given up to `other`; recall on `label: null` cases is reported."""
    from grpc_router.engines.encoder.engine import EncoderEngine
    from grpc_router.engines.selection import resolve_path
    from grpc_router.settings import EngineConfig

    cfg = engine if engine is not None else EngineConfig(kind="encoder")
    enc = EncoderEngine(resolve_path(cfg.encoder_artifact, Path.cwd()), cfg.encoder)
    await enc.start()
    rows: list[Any] = []
    labels: list[int] = []
    best_in: list[float] = []
    best_null: list[float] = []
    try:
        for set_path, routes_path in sets:
            routes = load_routes(routes_path)
            names = [r.name for r in routes]
            index = enc.index(routes)
            for case in load_cases(set_path, routes, limit):
                scores, _, _ = enc.raw_scores(case.messages, index)
                if case.label == OTHER_ROUTE:
                    best_null.append(float(scores.max()))
                else:
                    rows.append(scores)
                    labels.append(names.index(case.label))
                    best_in.append(float(scores.max()))
    finally:
        await enc.close()
    threshold = float(np.quantile(best_in, quantile))
    return {
        "temperature": fit_temperature(rows, labels),
        "other_threshold": threshold,
        "quantile": quantile,
        "in_scope_cases": len(best_in),
        "in_scope_below_threshold": float(np.mean(np.asarray(best_in) < threshold)),
        "null_cases": len(best_null),
        "null_recall_at_threshold": float(np.mean(np.asarray(best_null) < threshold))
        if best_null
        else None,
    }


def _write_report(out: Path, stem: str, metrics: dict[str, Any], markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (
        (f"{stem}.json", json.dumps(metrics, indent=2) + "\n"),
        (f"{stem}.md", markdown),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)


def _engine_config(args: argparse.Namespace) -> Any:
    import yaml

    from grpc_router.settings import EngineConfig

    data: dict[str, Any] = {}
    if args.config is not None:
        try:
            loaded = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise EvalDataError(f"{args.config}: cannot read the config ({e})") from None
        data = dict(loaded.get("engine") or {})
    if args.engine is not None:
        data["kind"] = args.engine
    if args.encoder_artifact is not None:
        data["encoder_artifact"] = args.encoder_artifact
    if args.arch_router_artifact is not None:
        data["arch_router_artifact"] = args.arch_router_artifact
    return EngineConfig.model_validate(data)


def _cmd_eval(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from grpc_router.errors import RouterError

    try:
        engine = None if args.target else _engine_config(args)
        if args.calibrate is not None:
            found = asyncio.run(
                calibrate_encoder(
                    [(args.set, args.routes)],
                    engine=engine,
                    quantile=args.calibrate,
                    limit=args.limit,
                )
            )
            print(json.dumps(found, indent=2))
            print(
                "Set engine.encoder.temperature and engine.encoder.other_threshold to these "
                "values in the config to use them."
            )
            return 0
        metrics = asyncio.run(
            run_eval(
                args.set,
                args.routes,
                engine=engine,
                target=args.target,
                limit=args.limit,
                out=args.out,
            )
        )
    except EvalDataError as e:
        print(f"grpc-router eval: {e}", file=sys.stderr)
        print("Fix the file (format: data/eval/README.md) and run again.", file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"grpc-router eval: bad engine settings: {e}", file=sys.stderr)
        return 2
    except RouterError as e:
        print(f"grpc-router eval: {e}", file=sys.stderr)
        return 1
    report = Path(metrics["report"]).read_text(encoding="utf-8") if "report" in metrics else ""
    print(report.split("## Per route")[0].rstrip())
    if "report" in metrics:
        print(f"\nwritten: {metrics['report']} and .json")
    return 0


def register_eval(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the `eval` sub-command to the CLI's sub-parsers."""
    p = subparsers.add_parser(
        "eval",
        help="routing accuracy and latency on a labelled JSONL set",
        description="Evaluate routing on SET.jsonl (format: data/eval/README.md).",
    )
    p.add_argument("set", type=Path, metavar="SET.jsonl")
    p.add_argument("--routes", type=Path, required=True, metavar="ROUTES.json")
    p.add_argument(
        "--engine",
        choices=("auto", "arch-router", "encoder", "cascade"),
        default=None,
        help="engine kind in process (default: the config's, else auto)",
    )
    p.add_argument("--config", type=Path, default=None, help="YAML config: use its engine section")
    p.add_argument("--encoder-artifact", type=Path, default=None)
    p.add_argument("--arch-router-artifact", type=Path, default=None)
    p.add_argument("--target", default=None, help="host:port of a running server (over gRPC)")
    p.add_argument("--limit", type=int, default=None, help="first N cases only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report dir (default reports/)")
    p.add_argument(
        "--calibrate",
        type=float,
        nargs="?",
        const=0.02,
        default=None,
        metavar="QUANTILE",
        help="encoder only: print the NLL-fitted temperature and the other_threshold at this "
        "quantile of in-scope best scores (default 0.02) instead of evaluating",
    )
    p.set_defaults(func=_cmd_eval)
