"""Scores of an eval run: accuracy, per-route precision/recall/F1, `other` recall, latency, the
confusion matrix, and the same split by the engine that decided (the cascade's paths).

A failed case counts as the answer "<error>": wrong for every label, and listed in the confusion
matrix so that failures are not mistaken for misroutes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from grpc_router.evaluate.dataset import EvalCase
from grpc_router.evaluate.predictors import Prediction
from grpc_router.types import OTHER_ROUTE, RouteSpec

ERROR = "<error>"
"""The answer a failed case counts as."""


def compute_metrics(
    cases: Sequence[EvalCase], preds: Sequence[Prediction], routes: Sequence[RouteSpec]
) -> dict[str, Any]:
    """The metrics of predictions against their cases' labels, as the JSON report has them."""
    labels = [c.label for c in cases]
    answers = [p.route or ERROR for p in preds]
    classes = [r.name for r in routes] + [OTHER_ROUTE]
    confusion = Counter(zip(labels, answers, strict=True))
    per_class = _per_class(confusion, classes)
    present = [n for n in classes if per_class[n]["support"] > 0]
    in_scope = [(t, a) for t, a in zip(labels, answers, strict=True) if t != OTHER_ROUTE]
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
        "latency_ms": _latency(preds),
        "engines": dict(Counter(p.engine for p in preds if not p.error)),
        "paths": _paths(cases, preds),
        "per_route": per_class,
        "confusion": _confusion_rows(confusion, classes),
    }


def _f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """(precision, recall, F1), each 0 where undefined."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _per_class(
    confusion: Counter[tuple[str, str]], classes: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Precision, recall, F1 and support of each class (the routes and `other`)."""
    per_class = {}
    for name in classes:
        tp = confusion[(name, name)]
        fp = sum(n for (t, a), n in confusion.items() if a == name and t != name)
        fn = sum(n for (t, a), n in confusion.items() if t == name and a != name)
        p, r, f = _f1(tp, fp, fn)
        per_class[name] = {"precision": p, "recall": r, "f1": f, "support": tp + fn}
    return per_class


def _latency(preds: Sequence[Prediction]) -> dict[str, float]:
    """p50, p95 and mean latency of the cases that did not fail (NaN when all failed)."""
    latencies = np.asarray([p.latency_ms for p in preds if not p.error], dtype=np.float64)
    return {
        "p50": float(np.percentile(latencies, 50)) if latencies.size else math.nan,
        "p95": float(np.percentile(latencies, 95)) if latencies.size else math.nan,
        "mean": float(latencies.mean()) if latencies.size else math.nan,
    }


def _paths(cases: Sequence[EvalCase], preds: Sequence[Prediction]) -> dict[str, dict[str, Any]]:
    """The scores of the cases each engine decided (a cascade's encoder and Arch-Router paths)."""
    engines = Counter(p.engine for p in preds if not p.error)
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
    return paths


def _confusion_rows(
    confusion: Counter[tuple[str, str]], classes: Sequence[str]
) -> dict[str, dict[str, int]]:
    """The confusion matrix as {label: {answer: count}}, empty rows and cells left out."""
    answers = [*classes, ERROR]
    return {
        t: {a: confusion[(t, a)] for a in answers if confusion[(t, a)]}
        for t in classes
        if any(confusion[(t, a)] for a in answers)
    }
