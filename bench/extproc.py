"""Benchmark: the latency ext_proc adds to one HTTP request, WITHOUT the model.

`python -m bench.extproc [--requests N]` (run by `make bench`). The server runs in its own
process with the real ext_proc servicer and the real router core, but with `ConstantEngine`, a
stand-in that answers the same decision instantly. That is deliberate and honest for this
number: it measures transport, parsing, policy and mutation overhead only; the engine's own
latency is measured by `python -m bench`. The client plays Envoy: one Process stream per
request, headers then the buffered body, each waiting for its answer. Results go to
reports/extproc-bench.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from grpc_router.core.router import Router
from grpc_router.settings import ExtProcSettings, parse_config
from grpc_router.types import Decision, Message, RouteSpec
from tests.mesh.harness import http_body, http_headers, start_ext_proc_server, two_route_config

REPORTS = Path(__file__).resolve().parents[2] / "reports"


class ConstantEngine:
    """NOT A ROUTER: always answers code_generation at once. Only for measuring ext_proc's own
    overhead, with the model's cost taken out on purpose."""

    name = "constant-benchmark-stand-in"
    ready = True

    async def start(self) -> None:
        return None

    async def decide(
        self, messages: Sequence[Message], routes: Sequence[RouteSpec], *, full_scores: bool = True
    ) -> Decision:
        return Decision("code_generation", 0.9, {}, engine=self.name)

    async def close(self) -> None:
        return None


def _serve(rewrite: bool, ports: Any) -> None:
    async def main() -> None:
        router = Router(parse_config(two_route_config(), Path("bench.yaml")), ConstantEngine())
        settings = ExtProcSettings(enabled=True, rewrite_model=rewrite)
        server, port = await start_ext_proc_server(router, settings)
        ports.put(port)
        await server.wait_for_termination()

    import logging

    import structlog

    # Per-request log lines would dominate what is measured.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(main())


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    method: str
    body: bytes | None
    rewrite: bool = False
    concurrency: int = 1


def _chat(chars: int) -> bytes:
    turns = [{"role": "system", "content": "You are a helpful assistant."}]
    text = "Please write a Python function that merges two sorted lists. " * 16
    while sum(len(t["content"]) for t in turns) < chars:
        turns.append({"role": "user", "content": text})
        turns.append({"role": "assistant", "content": "Here is one way: " + text})
    turns.append({"role": "user", "content": "And now in SQL?"})
    return json.dumps({"model": "auto", "messages": turns}).encode()


SCENARIOS = [
    Scenario("pass-through (GET /v1/models)", "/v1/models", "GET", None),
    Scenario("chat 2 KiB, headers only", "/v1/chat/completions", "POST", _chat(200)),
    Scenario("chat 32 KiB, headers only", "/v1/chat/completions", "POST", _chat(32_000)),
    Scenario("chat 32 KiB + body rewrite", "/v1/chat/completions", "POST", _chat(32_000), True),
    Scenario("chat 2 KiB, 16 in flight", "/v1/chat/completions", "POST", _chat(200), False, 16),
]


async def _one(stub: pb_grpc.ExternalProcessorStub, s: Scenario) -> float:
    start = time.perf_counter()
    call = stub.Process()
    await call.write(http_headers(s.path, method=s.method, end_of_stream=s.body is None))
    await call.read()
    if s.body is not None:
        await call.write(http_body(s.body))
        answer = await call.read()
        assert answer.request_body.response.clear_route_cache, f"not routed: {answer}"
    await call.done_writing()
    await call.read()  # EOF
    return (time.perf_counter() - start) * 1e3


async def _measure(port: int, s: Scenario, n: int, warmup: int) -> tuple[list[float], float]:
    """Latencies of n requests (s.concurrency streams in flight) and the wall time in s."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        for _ in range(warmup):
            await _one(stub, s)

        async def worker(count: int) -> list[float]:
            return [await _one(stub, s) for _ in range(count)]

        start = time.perf_counter()
        per_worker = await asyncio.gather(
            *(worker(n // s.concurrency) for _ in range(s.concurrency))
        )
        return [ms for part in per_worker for ms in part], time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="per scenario")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--out", type=Path, default=REPORTS)
    args = parser.parse_args(argv)

    ctx = multiprocessing.get_context("spawn")
    rows: list[dict[str, Any]] = []
    servers: dict[bool, tuple[Any, int]] = {}
    try:
        for rewrite in (False, True):
            ports = ctx.Queue()
            proc = ctx.Process(target=_serve, args=(rewrite, ports), daemon=True)
            proc.start()
            servers[rewrite] = (proc, ports.get(timeout=60))
        for i, s in enumerate(SCENARIOS, 1):
            print(f"[{i}/{len(SCENARIOS)}] {s.name}: {args.requests} requests", flush=True)
            port = servers[s.rewrite][1]
            ms, wall_s = asyncio.run(_measure(port, s, args.requests, args.warmup))
            rows.append(
                {
                    "scenario": s.name,
                    "body_bytes": len(s.body or b""),
                    "in_flight": s.concurrency,
                    "requests": len(ms),
                    "req_per_s": round(len(ms) / wall_s, 1),
                    "p50_ms": round(statistics.median(ms), 3),
                    "p90_ms": round(_pct(ms, 0.90), 3),
                    "p99_ms": round(_pct(ms, 0.99), 3),
                    "mean_ms": round(statistics.fmean(ms), 3),
                }
            )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.join(10)

    header = list(rows[0])
    lines = [
        "# ext_proc round trip, without the model",
        "",
        "One Envoy-like Process stream per HTTP request over loopback gRPC (headers, then the "
        "buffered body, each answered before the next); `in_flight` streams at once. "
        "Engine: a constant stand-in (not a router) so that only ext_proc's transport, "
        "parsing, policy and mutation cost shows.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"grpcio {grpc.__version__}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows),
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "extproc-bench.md").write_text("\n".join(lines))
    (args.out / "extproc-bench.json").write_text(
        json.dumps({"engine": ConstantEngine.name, "rows": rows}, indent=2) + "\n"
    )
    print("\n".join(lines[5:]))
    print(f"written: {args.out / 'extproc-bench.md'}, {args.out / 'extproc-bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
