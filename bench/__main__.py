"""Benchmark orchestrator: builds the workload and the artifact, runs each measurement in its
own subprocess, prints the table and the ratios, writes reports/bench-*.{json,md}."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.multiturn import (
    MODES,
    PRIMARY_MODE,
    baseline_sample,
    baseline_workload,
    build_multiturn,
    describe_multiturn,
    multiturn_markdown,
    multiturn_ratios,
    target_lines,
)
from bench.report import compute_floor, markdown, ratios
from bench.workers import on_gpu
from bench.workload import build_workload, describe
from tests.fixtures.checkpoints import ensure_full_shape_artifact, full_shape_name
from tests.fixtures.paths import repo_root

HEAVY_LOCK = Path("/tmp/heavy.lock")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="decoder layers (default 28, Arch-Router's); width stays full",
    )
    p.add_argument("--variants", default="int8,int4", help="engine variants to measure")
    p.add_argument("--samples", type=int, default=4, help="conversations per case kind")
    p.add_argument("--cold-samples", type=int, default=2, help="cold-cache decisions per kind")
    p.add_argument(
        "--baseline-samples",
        type=int,
        default=None,
        help="conversations per case kind for the (slow) baselines (default: --samples, so "
        "that the ratios compare the same conversations)",
    )
    p.add_argument("--concurrency", default="1,4,16", help="client counts for decisions/s")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="intra-op threads for every system (default: all cores)",
    )
    p.add_argument("--provider", default="cpu", choices=("auto", "cpu", "cuda", "tensorrt"))
    p.add_argument(
        "--kv-on-device",
        default="auto",
        choices=("auto", "on", "off"),
        help="engine: keep the KV on the device between runs (auto: on for GPU providers)",
    )
    p.add_argument("--skip-baselines", action="store_true")
    mt = p.add_argument_group("multi-turn workload (SGD dialogues call by call, agent loops)")
    mt.add_argument(
        "--multiturn-dialogues",
        type=int,
        default=4,
        help="SGD dialogues replayed and interleaved (default 4)",
    )
    mt.add_argument("--agent-loops", type=int, default=2, help="agent loops (default 2)")
    mt.add_argument(
        "--agent-steps", type=int, default=10, help="tool steps per agent loop (default 10)"
    )
    mt.add_argument(
        "--multiturn-baseline-samples",
        type=int,
        default=4,
        help="follow-ups and new conversations that baseline A runs (tens of seconds a "
        "call on 2 cores at 28 layers; default 4 of each)",
    )
    mt.add_argument(
        "--multiturn-modes",
        default="scores_off,scores_on,no_session",
        help="replays: requests with full_scores off, on, and off without session "
        "ids (default all three)",
    )
    mt.add_argument("--skip-multiturn", action="store_true", help="leave the workload out")
    mt.add_argument(
        "--only-multiturn",
        action="store_true",
        help="run only the multi-turn workload (and its baseline A sample); "
        "writes reports/bench-<model>-multiturn.{md,json}",
    )
    p.add_argument("--out", type=Path, default=Path("reports"))
    return p.parse_args(argv)  # fmt: skip


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def heavy_lock() -> Iterator[None]:
    """Serialise with other >4 GiB jobs on this machine (set HEAVY_LOCK_HELD=1 when the caller
    already holds /tmp/heavy.lock, e.g. under `flock /tmp/heavy.lock make bench`)."""
    if os.environ.get("HEAVY_LOCK_HELD") == "1":
        yield
        return
    with HEAVY_LOCK.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for {HEAVY_LOCK} (another heavy job is running)")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def ensure_artifact(layers: int | None, variants: list[str]) -> tuple[Path, Path]:
    """The full-shape checkpoint and artifact root, built once by the export fixtures and
    cached under artifacts/ (parity skipped: it would run PyTorch on the 1.5B model again)."""
    root = repo_root() / "artifacts"
    name = full_shape_name(layers)
    say(f"artifact {root / name} (random weights, Arch-Router-1.5B shapes, real tokenizer)")
    artifact = ensure_full_shape_artifact(
        root, layers=layers, variants=",".join(variants), parity=False
    )
    return root / ".cache" / f"{name}-ckpt", artifact


def run_worker(kind: str, cfg: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        config, result = Path(tmp) / "config.json", Path(tmp) / "result.json"
        config.write_text(json.dumps(cfg))
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "bench.workers", kind, str(config), str(result)],
            cwd=repo_root(), check=True,
        )  # fmt: skip
        out: dict[str, Any] = json.loads(result.read_text())
        out["wall_s"] = time.perf_counter() - t
        # Others' jobs on this machine slow a measurement down: say how busy it was.
        out["loadavg_1m_after"] = os.getloadavg()[0]
        return out


def run_baseline(kind: str, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """A baseline that fails is reported as missing; the engine's numbers still count."""
    try:
        return run_worker(kind, cfg)
    except subprocess.CalledProcessError as exc:
        say(f"baseline {kind} failed (exit {exc.returncode}); its rows are left out")
        return None


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "python": platform.python_version(), "gpu": gpu_name()}  # fmt: skip


def gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "none"
    return out.strip().splitlines()[0] if out.strip() else "none"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = args.multiturn_modes.split(",")
    if PRIMARY_MODE not in modes or not set(modes) <= {m for m, _, _ in MODES}:
        raise SystemExit(
            f"--multiturn-modes: a list of {', '.join(m for m, _, _ in MODES)} that holds "
            f"{PRIMARY_MODE} (the targets are judged on it)"
        )
    if args.baseline_samples is None:  # the same conversations as the engine
        args.baseline_samples = args.samples
    variants = [v for v in args.variants.split(",") if v]
    concurrency = [int(c) for c in args.concurrency.split(",") if c]
    with heavy_lock():
        ckpt, artifact = ensure_artifact(args.layers, variants)
        workload = build_workload(args.samples)
        shape = describe(workload, artifact / variants[0])
        config = json.loads((ckpt / "config.json").read_text())
        say("workload (fixed):")
        for kind, facts in shape.items():
            say(f"  {kind}: {json.dumps(facts)}")
        report: dict[str, Any] = {
            "machine": machine(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "layers": config["num_hidden_layers"],
            "workload": shape,
            "workload_cases": [c.name for c in workload.long + workload.short],
            "engine": {},
            "optimum": {},
        }
        common = {"workload": workload.to_json(), "threads": args.threads}
        gpu = on_gpu({"provider": args.provider})
        gemm = "fp16 MatMul on CUDA" if gpu else "int8 MatMulInteger"
        say(f"GEMM throughput ({gemm}, prefill MLP shape)")
        report["matmul"] = run_worker(
            "matmul", {**common, "m": 512, "k": config["hidden_size"],
                       "n": config["intermediate_size"], "provider": args.provider},
        )  # fmt: skip
        if not args.only_multiturn:
            for variant in variants:
                say(f"engine {variant}")
                report["engine"][variant] = run_worker(
                    "engine",
                    {**common, "artifact": str(artifact), "variant": variant,
                     "provider": args.provider, "samples": args.samples,
                     "kv_on_device": {"auto": None, "on": True, "off": False}[args.kv_on_device],
                     "cold_samples": args.cold_samples, "concurrency": concurrency},
                )  # fmt: skip
        if not args.skip_multiturn:
            run_multiturn_workload(args, report, variants, artifact, ckpt)
            multiturn_floor(report, config)
        if not args.skip_baselines and not args.only_multiturn:
            base = {**common, "samples": args.baseline_samples, "provider": args.provider}
            say("baseline A: transformers + PyTorch fp32 generate (max_new_tokens 16)")
            report["torch"] = run_baseline("torch", {**base, "checkpoint": str(ckpt)})
            for variant in variants:
                say(f"baseline B: Optimum ORTModelForCausalLM.generate on {variant}")
                report["optimum"][variant] = run_baseline(
                    "optimum", {**base, "artifact": str(artifact), "variant": variant}
                )
    if not args.only_multiturn:
        report["floor"] = compute_floor(config, shape["long"], report["matmul"])
    report["ratios"] = ratios(report)
    multiturn_ratios(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench-{full_shape_name(args.layers)}"
    if args.only_multiturn:
        stem = stem.with_name(stem.name + "-multiturn")
        text = multiturn_markdown(report)
    else:
        text = markdown(report) + (
            "\n" + multiturn_markdown(report) if "multiturn" in report else ""
        )
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(text)
    print(text)
    for line in target_lines(report):
        say(f"target {line}")
    say(f"wrote {stem}.json and {stem}.md")
    return 0


def multiturn_floor(report: dict[str, Any], config: dict[str, Any]) -> None:
    """The compute floor of each kind's median engine call (its prefilled tokens after its
    cached ones) at the GEMM rate measured in this run: multiturn.floor.<variant>.<kind>."""
    floors: dict[str, Any] = {}
    for variant, eng in report["multiturn"]["engine"].items():
        summary = eng["modes"].get(PRIMARY_MODE, {}).get("summary", {})
        floors[variant] = {
            kind: compute_floor(
                config,
                {"suffix_tokens_median": s["prefilled_tokens_median"],
                 "cacheable_tokens_median": s["cached_tokens_median"]},
                report["matmul"],
            )
            for kind, s in summary.items()
            if s["prefilled_tokens_median"]
        }  # fmt: skip
    report["multiturn"]["floor"] = floors


def run_multiturn_workload(
    args: argparse.Namespace,
    report: dict[str, Any],
    variants: list[str],
    artifact: Path,
    ckpt: Path,
) -> None:
    """The multi-turn replay on each engine variant, then baseline A on a sample of its calls
    (report["multiturn"])."""
    workload = build_multiturn(args.multiturn_dialogues, args.agent_loops, args.agent_steps)
    shape = describe_multiturn(workload, artifact / variants[0])
    sample = baseline_sample(workload, args.multiturn_baseline_samples)
    say("multi-turn workload (fixed):")
    for key, facts in shape.items():
        say(f"  {key}: {json.dumps(facts)}")
    mt: dict[str, Any] = {
        "workload": shape,
        "a_sample": sample,
        "engine": {},
        "A": None,
        "calls": [f"{c.stream}#{c.index} {c.kind}" for c in workload.calls],
    }
    report["multiturn"] = mt
    for variant in variants:
        say(f"multi-turn replay through the router core, engine {variant}")
        mt["engine"][variant] = run_worker(
            "multiturn",
            {"artifact": str(artifact), "variant": variant, "provider": args.provider,
             "threads": args.threads, "multiturn": workload.to_json(),
             "modes": [m for m in args.multiturn_modes.split(",") if m]},
        )  # fmt: skip
    if not args.skip_baselines:
        n = len(sample["follow_up"]), len(sample["new_conversation"])
        say(f"baseline A on the multi-turn sample: {n[0]} follow-ups, {n[1]} new conversations")
        mt["A"] = run_baseline(
            "torch",
            {"workload": baseline_workload(workload, sample).to_json(), "threads": args.threads,
             "samples": max(n), "provider": args.provider, "checkpoint": str(ckpt)},
        )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
