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
        for variant in variants:
            say(f"engine {variant}")
            report["engine"][variant] = run_worker(
                "engine",
                {**common, "artifact": str(artifact), "variant": variant,
                 "provider": args.provider, "samples": args.samples,
                 "kv_on_device": {"auto": None, "on": True, "off": False}[args.kv_on_device],
                 "cold_samples": args.cold_samples, "concurrency": concurrency},
            )  # fmt: skip
        if not args.skip_baselines:
            base = {**common, "samples": args.baseline_samples, "provider": args.provider}
            say("baseline A: transformers + PyTorch fp32 generate (max_new_tokens 16)")
            report["torch"] = run_baseline("torch", {**base, "checkpoint": str(ckpt)})
            for variant in variants:
                say(f"baseline B: Optimum ORTModelForCausalLM.generate on {variant}")
                report["optimum"][variant] = run_baseline(
                    "optimum", {**base, "artifact": str(artifact), "variant": variant}
                )
    report["floor"] = compute_floor(config, shape["long"], report["matmul"])
    report["ratios"] = ratios(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench-{full_shape_name(args.layers)}"
    text = markdown(report)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(text)
    print(text)
    say(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
