"""The `grpc-router eval` sub-command: its flags, and turning them into an eval run, an encoder
calibration or an `other` curve, with the exit codes the CLI documents (2 for a bad file or
setting, 1 for a router error).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from grpc_router.evaluate.calibrate import calibrate_encoder, other_curve
from grpc_router.evaluate.dataset import EvalDataError, load_routes
from grpc_router.evaluate.report import DEFAULT_OUT, curve_markdown, write_report
from grpc_router.evaluate.run import run_eval


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


def _cmd_eval(args: argparse.Namespace) -> int:
    """Run what the flags ask for; errors go to stderr with what to fix, as an exit code."""
    from pydantic import ValidationError

    from grpc_router.errors import RouterError

    try:
        engine = None if args.target else _engine_config(args)
        if args.calibrate is not None:
            return _calibrate(args, engine)
        modes = _examples_modes(args)
        if args.other_curve:
            return _other_curves(args, engine, modes)
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
    _print_runs(runs)
    return 0


def _engine_config(args: argparse.Namespace) -> Any:
    """The EngineConfig to evaluate in process: the config file's `engine:` section, if any,
    overridden by the engine and artifact flags."""
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


def _calibrate(args: argparse.Namespace, engine: Any) -> int:
    """`--calibrate`: print the fitted temperature and `other` threshold as JSON."""
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


def _other_curves(args: argparse.Namespace, engine: Any, modes: list[bool]) -> int:
    """`--other-curve`: print (and write under --out) one curve per examples mode."""
    for drop in modes:
        curve = asyncio.run(
            other_curve(args.set, args.routes, engine=engine, drop_examples=drop, limit=args.limit)
        )
        markdown = curve_markdown(curve)
        stem = f"other-curve-{args.set.stem}{'-no-examples' if drop else ''}"
        if args.out is not None:
            write_report(args.out, stem, curve, markdown)
        print(markdown)
    return 0


def _print_runs(runs: list[dict[str, Any]]) -> None:
    """Print each run's report down to the per-route tables, and where it was written."""
    for metrics in runs:
        report = Path(metrics["report"]).read_text(encoding="utf-8") if "report" in metrics else ""
        print(report.split("## Per route")[0].rstrip())
        if "report" in metrics:
            print(f"\nwritten: {metrics['report']} and .json\n")
