"""Encoder calibration on labelled sets: the softmax temperature and `other` threshold to put in
a config (`grpc-router eval --calibrate`), and the `other` trade-off curve
(`grpc-router eval --other-curve`).

Both score every case once with the encoder alone (no Router, no fallbacks) and then only vary
the temperature or the thresholds, so a whole sweep costs one pass over the set.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from grpc_router.evaluate.dataset import load_cases, load_routes, without_examples
from grpc_router.types import OTHER_ROUTE

if TYPE_CHECKING:  # the engines load onnxruntime: imported where used, at run time
    from grpc_router.engines.encoder.scoring import Conversation, RouteIndex
    from grpc_router.settings import EncoderSettings

DEFAULT_QUANTILES = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1)
DEFAULT_THRESHOLDS = (0.15, 0.17, 0.19, 0.21, 0.23, 0.25, 0.27, 0.3)


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
    measure = _measurer(reads, labels)
    return {
        "set": str(set_path),
        "routes": str(routes_path),
        "examples": sum(len(r.examples) for r in routes),
        "cases": len(cases),
        "other_cases": int((labels < 0).sum()),
        "rows": _curve_rows(measure, len(routes), index, settings, quantiles, thresholds),
    }


Measure = Callable[[Sequence[float]], dict[str, float]]
"""Per-route thresholds in, the scores they give out."""


def _measurer(reads: Sequence[Conversation], labels: np.ndarray[Any, Any]) -> Measure:
    """The scores of the encoder's reads of the cases under given per-route thresholds."""
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

    return measure


def _curve_rows(
    measure: Measure,
    n_routes: int,
    index: RouteIndex,
    settings: EncoderSettings,
    quantiles: Sequence[float],
    thresholds: Sequence[float],
) -> list[dict[str, Any]]:
    """One row per fitted quantile, per fixed threshold, and with `other` off."""
    from grpc_router.engines.encoder.fit import fit_other

    rows: list[dict[str, Any]] = []
    for q in quantiles:
        fit = fit_other(n_routes, index.pseudo, settings, q)
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
        rows.append({"mode": "fixed", "threshold": t, **measure([t] * n_routes)})
    rows.append({"mode": "off", "threshold": None, **measure([-math.inf] * n_routes)})
    return rows
