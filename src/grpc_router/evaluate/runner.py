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
    paths = {}
    for engine in sorted(engines):
        mine = [(c.label, p.route) for c, p in zip(cases, preds, strict=True) if p.engine == engine]
        inside = [(t, a) for t, a in mine if t != OTHER_ROUTE]
        null = [(t, a) for t, a in mine if t == OTHER_ROUTE]
        paths[engine] = {
            "cases": len(mine),
            "share": len(mine) / len(cases),
            "accuracy": sum(t == a for t, a in mine) / len(mine),
            "in_scope_cases": len(inside),
            "in_scope_accuracy": (sum(t == a for t, a in inside) / len(inside))
            if inside
            else math.nan,
            "other_cases": len(null),
            "other_recall": (sum(a == OTHER_ROUTE for _, a in null) / len(null))
            if null
            else math.nan,
            "other_answers": sum(a == OTHER_ROUTE for _, a in mine),
        }
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
        "paths": paths,
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
        *_other_fit_lines(m.get("other_fit")),
        "## Paths (which engine decided)",
        "",
        "| engine | cases | share | accuracy | in-scope accuracy | other recall | answered other |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {name or '?'} | {p['cases']} | {p['share']:.1%} | {p['accuracy']:.2%} | "
            f"{_pct(p['in_scope_accuracy'])} | {_pct(p['other_recall'])} (n={p['other_cases']}) "
            f"| {p['other_answers']} |"
            for name, p in m.get("paths", {}).items()
        ),
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


def _pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.2%}"


def _other_fit_lines(fit: dict[str, Any] | None) -> list[str]:
    """The engine's `other` thresholds for the route set, as report lines."""
    if not fit:
        return []
    line = f"`other` threshold: {fit.get('mode')} ({fit.get('source')})"
    if fit.get("threshold") is not None:
        line += f", set level {fit['threshold']:.4f}"
    if fit.get("background") is not None:
        line += f", background {fit['background']:.4f}"
    if fit.get("in_scope") is not None:
        line += (
            f", in-scope q{fit.get('quantile')} {fit['in_scope']:.4f} "
            f"from {fit['examples']} examples"
        )
    lines = [line + "."]
    own = fit.get("route_thresholds")
    if own:
        lines += ["", "Per route: " + ", ".join(f"{k} {v:.4f}" for k, v in own.items()) + "."]
    return [*lines, ""]


def other_fit_summary(engine: Any, routes: Sequence[RouteSpec]) -> dict[str, Any] | None:
    """The `other` thresholds an engine keeps for `routes` (the encoder's, directly or in a
    cascade), as the fit's log line has them; None for engines without."""
    thresholds = getattr(engine, "other_thresholds", None)
    if not callable(thresholds):
        return None
    fit = thresholds(routes)
    if fit is None:
        return None
    summary: dict[str, Any] = fit.summary([r.name for r in routes])
    return summary


def without_examples(routes: Sequence[RouteSpec]) -> tuple[RouteSpec, ...]:
    return tuple(RouteSpec(r.name, r.description, ()) for r in routes)


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
) -> dict[str, Any] | None:
    """Run the cases in process; returns the engine's `other` thresholds for the routes."""
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
        return await asyncio.to_thread(other_fit_summary, engine, routes)
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
    drop_examples: bool = False,
) -> dict[str, Any]:
    """Evaluate; returns the metrics (also written as JSON and Markdown under `out`).

    `engine` is a `grpc_router.engines.selection.EngineConfig` (in process); `target` (host:port)
    evaluates a running server instead. `drop_examples` routes on the descriptions alone."""
    from grpc_router.settings import EngineConfig

    routes = load_routes(routes_path)
    if drop_examples:
        routes = without_examples(routes)
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

    fit = None
    if target:
        await _over_grpc(target, routes, run)
        mode = f"grpc {target}"
    else:
        fit = await _in_process(routes, engine_cfg, run)
        mode = f"in-process, engine {engine_cfg.kind}"
    examples = sum(len(r.examples) for r in routes)
    metrics = compute_metrics(cases, preds, routes)
    metrics.update(
        {
            "set": str(set_path),
            "routes": str(routes_path),
            "examples": examples,
            "examples_dropped": drop_examples,
            "mode": mode,
            "limit": limit,
            "other_fit": fit,
        }
    )
    if out is not None:
        engine_tag = sorted(metrics["engines"])[0] if metrics["engines"] else "none"
        if (not target and engine_cfg.kind == "cascade") or len(metrics["engines"]) > 1:
            engine_tag = "cascade"
        suffix = "-no-examples" if drop_examples else ""
        stem = f"eval-{set_path.stem}{suffix}-{engine_tag}"
        shown = "descriptions only" if drop_examples or not examples else f"{examples} examples"
        title = (
            f"eval {set_path.name} with {routes_path.name}, {shown} "
            f"({mode}{f', first {limit}' if limit else ''})"
        )
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


DEFAULT_QUANTILES = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1)
DEFAULT_THRESHOLDS = (0.15, 0.17, 0.19, 0.21, 0.23, 0.25, 0.27, 0.3)


async def other_curve(
    set_path: Path,
    routes_path: Path,
    *,
    engine: Any = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    drop_examples: bool = False,
    limit: int | None = None,
) -> dict[str, Any]:
    """The encoder's `other` trade-off on a labelled set: in-scope accuracy and `other` recall
    with the thresholds fitted (without labels) at each `other_quantile`, and with each fixed
    threshold. The route scores are computed once; only the thresholds change."""
    from grpc_router.engines.encoder.engine import EncoderEngine
    from grpc_router.engines.encoder.fit import fit_other
    from grpc_router.engines.selection import resolve_path
    from grpc_router.settings import EngineConfig

    cfg = engine if engine is not None else EngineConfig(kind="encoder")
    settings = cfg.encoder.model_copy(update={"other_threshold": "auto", "lint_on_load": False})
    enc = EncoderEngine(resolve_path(cfg.encoder_artifact, Path.cwd()), settings)
    routes = load_routes(routes_path)
    if drop_examples:
        routes = without_examples(routes)
    cases = load_cases(set_path, routes, limit)
    await enc.start()
    try:
        index = await asyncio.to_thread(enc.index, routes)
        reads = [enc.conversation(c.messages, index) for c in cases]
    finally:
        await enc.close()
    names = [r.name for r in routes]
    labels = np.asarray([names.index(c.label) if c.label != OTHER_ROUTE else -1 for c in cases])
    top = np.asarray([int(np.argmax(r.scores)) for r in reads])
    # `other` wins when no turn read scores the best route at its threshold (the engine's rule).
    best = np.asarray([float(r.evidence[t]) for r, t in zip(reads, top, strict=True)])
    inside = labels >= 0

    def measure(per_route: Sequence[float]) -> dict[str, float]:
        answer = np.where(best >= np.asarray(per_route)[top], top, -1)
        return {
            "in_scope_accuracy": float(np.mean(answer[inside] == labels[inside])),
            "other_recall": float(np.mean(answer[~inside] == -1)) if (~inside).any() else math.nan,
            "accuracy": float(np.mean(answer == labels)),
        }

    rows: list[dict[str, Any]] = []
    for q in quantiles:
        fit = fit_other(len(routes), index.pseudo, settings, q)
        rows.append(
            {
                "mode": "auto",
                "quantile": q,
                "source": fit.source,
                "threshold": fit.threshold,
                "default": q == settings.other_quantile,
                **measure(fit.route_thresholds),
            }
        )
        if fit.source != "examples":
            break  # without examples the quantile changes nothing
    for t in thresholds:
        rows.append({"mode": "fixed", "threshold": t, **measure([t] * len(routes))})
    rows.append({"mode": "off", "threshold": None, **measure([-math.inf] * len(routes))})
    return {
        "set": str(set_path),
        "routes": str(routes_path),
        "examples": sum(len(r.examples) for r in routes),
        "cases": len(cases),
        "other_cases": int((~inside).sum()),
        "rows": rows,
    }


def curve_markdown(curve: dict[str, Any]) -> str:
    shown = f"{curve['examples']} examples" if curve["examples"] else "descriptions only"
    lines = [
        f"# `other` trade-off: {Path(curve['set']).name} with {Path(curve['routes']).name}, "
        f"{shown}",
        "",
        "| thresholds | quantile | set-level threshold | in-scope accuracy | `other` recall "
        "| accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for row in curve["rows"]:
        if row["mode"] == "auto":
            what = f"auto ({row['source']}){' (default)' if row['default'] else ''}"
            quantile = f"{row['quantile']:g}" if row["source"] == "examples" else "–"
        else:
            what, quantile = row["mode"], "–"
        threshold = "–" if row["threshold"] is None else f"{row['threshold']:.3f}"
        lines.append(
            f"| {what} | {quantile} | {threshold} | {row['in_scope_accuracy']:.2%} | "
            f"{_pct(row['other_recall'])} | {row['accuracy']:.2%} |"
        )
    return "\n".join(lines) + "\n"


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


def _examples_modes(args: argparse.Namespace) -> list[bool]:
    """The `drop_examples` values to run: with and without examples (when there are any)."""
    if args.examples == "with":
        return [False]
    if args.examples == "without":
        return [True]
    has = any(r.examples for r in load_routes(args.routes))
    return [False, True] if has else [False]


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
        modes = _examples_modes(args)
        if args.other_curve:
            for drop in modes:
                curve = asyncio.run(
                    other_curve(
                        args.set, args.routes, engine=engine, drop_examples=drop, limit=args.limit
                    )
                )
                markdown = curve_markdown(curve)
                stem = f"other-curve-{args.set.stem}{'-no-examples' if drop else ''}"
                if args.out is not None:
                    _write_report(args.out, stem, curve, markdown)
                print(markdown)
            return 0
        runs = [
            asyncio.run(
                run_eval(
                    args.set,
                    args.routes,
                    engine=engine,
                    target=args.target,
                    limit=args.limit,
                    out=args.out,
                    drop_examples=drop,
                )
            )
            for drop in modes
        ]
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
    for metrics in runs:
        report = Path(metrics["report"]).read_text(encoding="utf-8") if "report" in metrics else ""
        print(report.split("## Per route")[0].rstrip())
        if "report" in metrics:
            print(f"\nwritten: {metrics['report']} and .json\n")
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
    p.add_argument(
        "--examples",
        choices=("both", "with", "without"),
        default="both",
        help="route with the routes file's examples, without them (descriptions only), or "
        "both, one report each (default; one run when the file has no examples)",
    )
    p.add_argument(
        "--other-curve",
        action="store_true",
        help="encoder only: instead of evaluating, print the `other` trade-off: in-scope "
        "accuracy and other recall with the thresholds fitted at several other_quantile "
        "values, and with fixed thresholds (reports/other-curve-<set>.md)",
    )
    p.set_defaults(func=_cmd_eval)
