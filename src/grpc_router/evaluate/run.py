"""One eval run: load a set and its routes, route every case (in process or over gRPC), score
the answers, and write the report.

This is what `grpc-router eval` does once per examples mode, and what the tests call directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grpc_router.evaluate.dataset import EvalCase, load_cases, load_routes, without_examples
from grpc_router.evaluate.metrics import compute_metrics
from grpc_router.evaluate.predictors import Prediction, Predictor, Run, in_process, over_grpc
from grpc_router.evaluate.progress import ProgressBar
from grpc_router.evaluate.report import DEFAULT_OUT, markdown_report, write_report


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
    run = _runner(cases, preds, ProgressBar(len(cases)) if progress else None)
    fit = None
    if target:
        await over_grpc(target, routes, run)
        mode = f"grpc {target}"
    else:
        fit = await in_process(routes, engine_cfg, run)
        mode = f"in-process, engine {engine_cfg.kind}"
    metrics = compute_metrics(cases, preds, routes)
    metrics.update(
        {
            "set": str(set_path),
            "routes": str(routes_path),
            "examples": sum(len(r.examples) for r in routes),
            "examples_dropped": drop_examples,
            "mode": mode,
            "limit": limit,
            "other_fit": fit,
        }
    )
    if out is not None:
        cascade = not target and engine_cfg.kind == "cascade"
        stem, title = _report_name(metrics, set_path, routes_path, cascade=cascade)
        write_report(out, stem, metrics, markdown_report(title, metrics, routes))
        metrics["report"] = str(out / f"{stem}.md")
    return metrics


def _runner(cases: Sequence[EvalCase], preds: list[Prediction], bar: ProgressBar | None) -> Run:
    """A run that feeds every case to the predictor in order, appending to `preds`."""

    async def run(predict: Predictor) -> None:
        correct = 0
        for case in cases:
            pred = await predict(case)
            preds.append(pred)
            correct += pred.route == case.label
            if bar is not None:
                bar.update(len(preds), correct)

    return run


def _report_name(
    metrics: dict[str, Any], set_path: Path, routes_path: Path, *, cascade: bool
) -> tuple[str, str]:
    """(file stem, Markdown title) of a run's report: the set, examples mode and engine."""
    engines = metrics["engines"]
    engine_tag = sorted(engines)[0] if engines else "none"
    if cascade or len(engines) > 1:
        engine_tag = "cascade"
    drop_examples, examples = metrics["examples_dropped"], metrics["examples"]
    suffix = "-no-examples" if drop_examples else ""
    stem = f"eval-{set_path.stem}{suffix}-{engine_tag}"
    shown = "descriptions only" if drop_examples or not examples else f"{examples} examples"
    limit = metrics["limit"]
    title = (
        f"eval {set_path.name} with {routes_path.name}, {shown} "
        f"({metrics['mode']}{f', first {limit}' if limit else ''})"
    )
    return stem, title
