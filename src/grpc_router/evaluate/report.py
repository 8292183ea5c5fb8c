"""Eval reports: the Markdown tables of an eval run and of an `other` curve, and writing them
with their JSON next to them.

The report files are replaced atomically, so a reader never sees half a report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grpc_router.evaluate.metrics import ERROR
from grpc_router.types import OTHER_ROUTE, RouteSpec

DEFAULT_OUT = Path("reports")


def markdown_report(title: str, m: dict[str, Any], routes: Sequence[RouteSpec]) -> str:
    """An eval run's metrics as Markdown: the summary, `other` thresholds, paths, per-route
    scores and the confusion matrix."""
    lines = [
        *_summary_lines(title, m),
        *_other_fit_lines(m.get("other_fit")),
        *_path_lines(m.get("paths", {})),
        *_per_route_lines(m["per_route"]),
        *_confusion_lines(m, routes),
    ]
    return "\n".join(lines) + "\n"


def _summary_lines(title: str, m: dict[str, Any]) -> list[str]:
    """The title and the one-row table of the headline scores."""
    lat = m["latency_ms"]
    engines = ", ".join(f"{k or '?'} {v}" for k, v in sorted(m["engines"].items()))
    return [
        f"# {title}",
        "",
        "| cases | accuracy | in-scope accuracy | macro-F1 | other P | other R | p50 ms | p95 ms "
        "| engines |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {m['cases']} | {m['accuracy']:.2%} | {m['in_scope_accuracy']:.2%} | "
        f"{m['macro_f1']:.3f} | {m['other_precision']:.2%} | {m['other_recall']:.2%} "
        f"(n={m['other_support']}) | {lat['p50']:.2f} | {lat['p95']:.2f} | {engines} |",
        "",
    ]


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


def _path_lines(paths: dict[str, dict[str, Any]]) -> list[str]:
    """The table of which engine decided which cases, and how well."""
    return [
        "## Paths (which engine decided)",
        "",
        "| engine | cases | share | accuracy | in-scope accuracy | other recall | answered other |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {name or '?'} | {p['cases']} | {p['share']:.1%} | {p['accuracy']:.2%} | "
            f"{_pct(p['in_scope_accuracy'])} | {_pct(p['other_recall'])} (n={p['other_cases']}) "
            f"| {p['other_answers']} |"
            for name, p in paths.items()
        ),
        "",
    ]


def _per_route_lines(per_route: dict[str, dict[str, Any]]) -> list[str]:
    """The per-route table, leaving out classes never labelled nor answered correctly."""
    lines = [
        "## Per route",
        "",
        "| route | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for name, r in per_route.items():
        if r["support"] or r["precision"]:
            lines.append(
                f"| {name} | {r['precision']:.2%} | {r['recall']:.2%} | {r['f1']:.3f} "
                f"| {r['support']} |"
            )
    return lines


def _confusion_lines(m: dict[str, Any], routes: Sequence[RouteSpec]) -> list[str]:
    """The confusion matrix; the error column only when some case failed."""
    cols = [r.name for r in routes] + [OTHER_ROUTE]
    if m["errors"]:
        cols.append(ERROR)
    lines = [
        "",
        "## Confusion matrix (rows: label, columns: answer)",
        "",
        "| label \\ answer | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for label, row in m["confusion"].items():
        lines.append(f"| {label} | " + " | ".join(str(row.get(c, 0)) for c in cols) + " |")
    return lines


def curve_markdown(curve: dict[str, Any]) -> str:
    """An `other` curve (`grpc_router.evaluate.calibrate.other_curve`) as a Markdown table."""
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


def _pct(value: float) -> str:
    """A share as a percentage, or a dash when there was nothing to measure (NaN)."""
    return "–" if math.isnan(value) else f"{value:.2%}"


def write_report(out: Path, stem: str, metrics: dict[str, Any], markdown: str) -> None:
    """Write `out/stem.json` and `out/stem.md`, each through a temporary file and a rename."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (
        (f"{stem}.json", json.dumps(metrics, indent=2) + "\n"),
        (f"{stem}.md", markdown),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
