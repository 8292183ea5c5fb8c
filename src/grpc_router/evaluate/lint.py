"""`grpc-router lint ROUTES`: what in a route set will make the encoder hesitate or misroute.

ROUTES is a config YAML (its `routes:`; its `engine:` section picks the encoder artifact and
settings) or a routes JSON like data/eval/*_routes.json (`[{"name", "description",
"examples"?}]`). The checks are the encoder's own (`grpc_router.engines.encoder.lint`), on the
same embeddings and leave-one-out scores that fit the `other` thresholds, which are shown too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grpc_router.evaluate.dataset import EvalDataError, parse_routes
from grpc_router.types import RouteSpec

KINDS = ("overlap", "vague", "example_elsewhere")
_FORMATS = (
    "a config YAML with a `routes:` list (like examples/routes.yaml) or a routes JSON list "
    '[{"name": ..., "description": ..., "examples": [...]}] (like data/eval/clinc150_routes.json)'
)


class LintInputError(ValueError):
    """The routes file is missing or malformed; the message says what to do."""


def load_route_file(path: Path) -> tuple[tuple[RouteSpec, ...], dict[str, Any]]:
    """(routes, the file's `engine:` section or {}) from a config YAML or a routes JSON."""
    import yaml

    if not path.exists():
        raise LintInputError(f"{path}: no such file. Pass {_FORMATS}.")
    if path.is_dir():
        raise LintInputError(f"{path} is a directory. Pass {_FORMATS}.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LintInputError(f"{path}: cannot read it ({e}).") from None
    try:
        if path.suffix.lower() == ".json":
            data: Any = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise LintInputError(
            f"{path}: not valid {kind}: {e}. Fix the syntax and run again."
        ) from None
    engine: dict[str, Any] = {}
    if isinstance(data, dict):
        section = data.get("engine")
        engine = dict(section) if isinstance(section, dict) else {}
        data = data.get("routes")
    if not isinstance(data, list) or not data:
        raise LintInputError(f"{path}: found no routes. Expected {_FORMATS}.")
    try:
        return parse_routes(data, str(path)), engine
    except EvalDataError as e:
        raise LintInputError(str(e)) from None


async def lint_routes(
    routes: Sequence[RouteSpec], engine_section: dict[str, Any], base_dir: Path
) -> dict[str, Any]:
    """Lint `routes` with the encoder the engine section describes; returns the JSON report."""
    from grpc_router.engines.encoder.engine import EncoderEngine, validate_routes
    from grpc_router.engines.selection import resolve_path
    from grpc_router.settings import EngineConfig

    validate_routes(routes)
    cfg = EngineConfig.model_validate(engine_section)
    settings = cfg.encoder.model_copy(update={"lint_on_load": True, "warmup": False})
    engine = EncoderEngine(resolve_path(cfg.encoder_artifact, base_dir), settings)
    await engine.start()
    try:
        findings = await asyncio.to_thread(engine.lint, routes)
        fit = engine.other_thresholds(routes)
    finally:
        await engine.close()
    counts: Counter[str] = Counter(str(f.kind) for f in findings)
    return {
        "routes": [r.name for r in routes],
        "examples": sum(len(r.examples) for r in routes),
        "findings": [f.to_dict() for f in findings],
        "counts": {k: counts.get(k, 0) for k in KINDS},
        "other": fit.summary([r.name for r in routes]),
    }


def print_table(report: dict[str, Any], source: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    n_routes, n_examples = len(report["routes"]), report["examples"]
    console.print(f"[bold]{source}[/bold]: {n_routes} routes, {n_examples} examples")
    other = report["other"]
    line = f"`other` threshold: {other['mode']} ({other['source']}) {other['threshold']}"
    if other.get("route_thresholds"):
        line += ", per route: " + ", ".join(
            f"{k} {v}" for k, v in other["route_thresholds"].items()
        )
    console.print(line, markup=False)
    if not report["findings"]:
        console.print("no findings")
        return
    table = Table(show_lines=True)
    for column in ("kind", "routes", "score", "finding"):
        table.add_column(column, overflow="fold")
    for f in report["findings"]:
        text = f["message"]
        if f["text"]:
            text = f"{f['text']!r}: {text}"
        for pair in f["pairs"][1:]:
            text += f"\n{pair['a']!r} ~ {pair['b']!r} ({pair['similarity']:.2f})"
        table.add_row(f["kind"], " / ".join(f["routes"]), f"{f['score']:.2f}", text)
    console.print(table)
    counts = ", ".join(f"{v} {k}" for k, v in report["counts"].items())
    console.print(f"{len(report['findings'])} findings: {counts}")


def _cmd_lint(args: argparse.Namespace) -> int:
    import structlog

    from grpc_router.errors import RouterError

    # Logs would mix with the table or the JSON: errors only, on stderr.
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
    )
    path: Path = args.routes
    try:
        routes, engine = load_route_file(path)
        if args.encoder_artifact is not None:
            engine["encoder_artifact"] = str(args.encoder_artifact)
        report = asyncio.run(lint_routes(routes, engine, path.resolve().parent))
    except LintInputError as e:
        print(f"grpc-router lint: {e}", file=sys.stderr)
        return 2
    except RouterError as e:
        print(f"grpc-router lint: {e}", file=sys.stderr)
        if "artifact" in str(e).lower() or "export" in str(e).lower():
            print(
                "The lint needs the encoder artifact: run `make export-encoder`, or pass "
                "--encoder-artifact DIR.",
                file=sys.stderr,
            )
        return 2
    except ValueError as e:  # the engine section's settings
        print(f"grpc-router lint: {path}: bad engine settings: {e}", file=sys.stderr)
        return 2
    report["file"] = str(path)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report, path)
    return 1 if args.strict and report["findings"] else 0


def register_lint(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the `lint` sub-command to the CLI's sub-parsers."""
    p = subparsers.add_parser(
        "lint",
        help="flag overlapping routes, misplaced examples and vague descriptions",
        description="Lint a route set with the encoder: route pairs whose descriptions or "
        "examples overlap, examples that sit closer to another route than to their own, and "
        "descriptions too vague to separate. ROUTES: a config YAML (its routes and engine "
        "sections) or a routes JSON list. Exit 0, or 1 with --strict when anything is "
        "flagged, 2 on a missing or invalid file.",
    )
    p.add_argument("routes", type=Path, metavar="ROUTES", help="config YAML or routes JSON")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 when anything is flagged")
    p.add_argument(
        "--encoder-artifact",
        type=Path,
        default=None,
        help="encoder artifact root (default: the config's engine.encoder_artifact, else "
        "artifacts/minilm)",
    )
    p.set_defaults(func=_cmd_lint)
