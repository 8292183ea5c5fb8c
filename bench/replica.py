"""One replica's capacity: `python -m bench.replica` (run by `make bench`).

Starts a real `grpc-router serve` subprocess on loopback with the encoder engine (the config
`make serve` serves, examples/routes.yaml, with engine kind `encoder`, free ports and the
`make export-encoder` artifact, else the test fixture's), waits until it is SERVING, then drives
`RouterService.Route` with grpc.aio clients at 1, 4, 16, 64 and 256 calls in flight, each level
for a bounded time and a bounded number of calls. Conversations are distinct (CLINC150 and SGD dev
conversations, numbered once the pool is used up), so that the decision cache answers none of
them; one more row repeats 16 conversations to show the cache. While a level runs, the server's
readiness (`grpc_router.readiness`) and its engine queue depth (Prometheus) are sampled.

Reports req/s, p50/p99 latency, the share answered by a fallback (`fallback_used`, by reason),
errors by status code, and writes reports/replica-bench.{md,json}. Loopback only; the server is
stopped at the end whatever happens. Clients and server share this machine's cores: the table
says how much CPU each used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_router.engines.artifact import list_variants
from grpc_router.engines.encoder.engine import intra_op_threads
from grpc_router.serving.wire import messages_to_pb
from grpc_router.settings.engines import EncoderSettings
from grpc_router.types import Message, Role
from grpc_router.v1 import router_pb2 as pb
from grpc_router.v1 import router_pb2_grpc
from tests.fixtures.paths import eval_dir, repo_root

READINESS_SERVICE = "grpc_router.readiness"
START_TIMEOUT_S = 180.0
SAMPLE_EVERY_S = 0.2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.replica", description=__doc__)
    p.add_argument("--levels", default="1,4,16,64,256", help="calls in flight, one row each")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per level (default 10)")
    p.add_argument("--max-calls", type=int, default=20_000, help="calls per level at most")
    p.add_argument(
        "--repeated",
        type=int,
        default=16,
        help="conversations of the repeated (cache) row, at 16 in flight; 0: no row",
    )
    p.add_argument("--call-timeout", type=float, default=10.0, help="each call's deadline, s")
    p.add_argument(
        "--config",
        type=Path,
        default=repo_root() / "examples" / "routes.yaml",
        help="the config served (engine, ports and artifact are set by the bench)",
    )
    p.add_argument(
        "--artifact",
        type=Path,
        default=None,
        help="encoder artifact root (default artifacts/minilm, else the test "
        "fixture's cached export)",
    )
    p.add_argument("--channels", type=int, default=4, help="HTTP/2 connections the clients share")
    p.add_argument("--out", type=Path, default=repo_root() / "reports")
    return p.parse_args(argv)  # fmt: skip


def say(message: str) -> None:
    print(f"[replica {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def encoder_artifact(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit.resolve()
    served = repo_root() / "artifacts" / "minilm"
    if list_variants(served):
        return served
    say("no artifacts/minilm (make export-encoder): using the test fixture's cached export")
    from tests.fixtures.encoder import encoder_artifact_cached

    return encoder_artifact_cached()


def server_config(base: Path, artifact: Path, port: int, metrics_port: int) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(base.read_text(encoding="utf-8"))
    engine = dict(data.get("engine") or {})
    engine.update(kind="encoder", encoder_artifact=str(artifact))
    data["engine"] = engine
    data["server"] = {**(data.get("server") or {}), "host": "127.0.0.1", "port": port}
    data["metrics"] = {**(data.get("metrics") or {}), "host": "127.0.0.1", "port": metrics_port}
    return data


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path
    config: dict[str, Any]

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_bytes(self) -> int | None:
        """The server process's peak resident memory so far (VmHWM)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_server(config: dict[str, Any], workdir: Path) -> Server:
    path = workdir / "replica.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    log = workdir / "server.log"
    exe = shutil.which("grpc-router", path=str(Path(sys.executable).parent)) or "grpc-router"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe, "serve", "--config", str(path)],
            cwd=repo_root(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return Server(proc, config["server"]["port"], config["metrics"]["port"], log, config)


async def wait_serving(server: Server) -> float:
    """Seconds until health "" says SERVING; raises if the process dies or it takes too long."""
    start = time.perf_counter()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.perf_counter() - start < START_TIMEOUT_S:
            if server.proc.poll() is not None:
                tail = server.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"grpc-router serve exited ({server.proc.returncode}):\n{tail}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - start
            await asyncio.sleep(0.25)
    raise TimeoutError(f"the server was not SERVING within {START_TIMEOUT_S:.0f} s")


# --- conversations ----------------------------------------------------------------------------


def conversation_pool() -> list[list[Message]]:
    """Real dev-set conversations: CLINC150 single turns, SGD multi-turn dialogues."""
    sets: list[list[list[Message]]] = []
    for name in ("clinc150_val.jsonl", "sgd_dev.jsonl"):
        convs = []
        for line in (eval_dir() / name).open(encoding="utf-8"):
            msgs = json.loads(line)["messages"]
            convs.append([Message(Role(m["role"]), m["content"]) for m in msgs])
        sets.append(convs)
    # The two sets (single and multi turn) alternate while both last.
    singles, multis = sets
    pool = [c for pair in zip(singles, multis, strict=False) for c in pair]
    n = min(len(singles), len(multis))
    return pool + singles[n:] + multis[n:]


class Conversations:
    """Hands out conversations: distinct ones (numbered once the pool is used up), or a small
    set repeated."""

    def __init__(
        self, pool: list[list[Message]], repeat: int = 0, offset: int = 0, tag: str = ""
    ) -> None:
        self._pool = pool
        self._repeat = repeat
        self._next = offset
        self._tag = tag

    def take(self) -> list[Message]:
        k = self._next
        self._next += 1
        size = self._repeat or len(self._pool)
        conv = self._pool[k % size]
        lap = 0 if self._repeat else k // size
        if not lap and not self._tag:
            return conv
        last = conv[-1]
        note = " ".join(x for x in (self._tag, f"#{lap}" if lap else "") if x)
        return [*conv[:-1], Message(last.role, f"{last.content} ({note})")]


# --- one level ----------------------------------------------------------------------------------


@dataclass
class Level:
    name: str
    in_flight: int
    conversations: str
    latencies_ms: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    fallbacks: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)
    readiness: Counter[str] = field(default_factory=Counter)
    queue_depth: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0

    def row(self) -> dict[str, Any]:
        ok = self.codes.get("OK", 0)
        calls = sum(self.codes.values())
        ordered = sorted(self.latencies_ms)
        load = sum(v for k, v in self.fallbacks.items() if k in LOAD_REASONS)
        samples = sum(self.readiness.values())
        return {
            "scenario": self.name,
            "in_flight": self.in_flight,
            "conversations": self.conversations,
            "calls": calls,
            "wall_s": round(self.wall_s, 2),
            "req_per_s": round(calls / self.wall_s, 1) if self.wall_s else 0.0,
            "ok_per_s": round(ok / self.wall_s, 1) if self.wall_s else 0.0,
            "p50_ms": round(statistics.median(ordered), 2) if ordered else None,
            "p99_ms": round(_pct(ordered, 0.99), 2) if ordered else None,
            "fallback_share": round(sum(self.fallbacks.values()) / ok, 4) if ok else None,
            "load_fallback_share": round(load / ok, 4) if ok else None,
            "fallbacks": dict(self.fallbacks),
            "errors": {k: v for k, v in self.codes.items() if k != "OK"},
            "sources": dict(self.sources),
            "queue_depth_max": max(self.queue_depth, default=None),
            "queue_depth_median": statistics.median(self.queue_depth) if self.queue_depth else None,
            "not_ready_share": round(self.readiness.get("NOT_SERVING", 0) / samples, 3)
            if samples else None,
            "readiness": dict(self.readiness),
            "server_cpu_cores": round(self.server_cpu_s / self.wall_s, 2) if self.wall_s else None,
            "client_cpu_cores": round(self.client_cpu_s / self.wall_s, 2) if self.wall_s else None,
        }  # fmt: skip


# Fallbacks that mean the replica could not decide in time (as opposed to `other` or a low
# confidence, which are the engine's answers).
LOAD_REASONS = ("FALLBACK_REASON_OVERLOADED", "FALLBACK_REASON_ENGINE_TIMEOUT",
                "FALLBACK_REASON_ENGINE_ERROR")  # fmt: skip


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _route(
    stub: router_pb2_grpc.RouterServiceAsyncStub,
    conv: list[Message],
    deadline_s: float,
    level: Level,
) -> None:
    request = pb.RouteRequest(messages=messages_to_pb(conv), skip_scores=True)
    start = time.perf_counter()
    try:
        answer = await stub.Route(request, timeout=deadline_s)
    except grpc.aio.AioRpcError as e:
        level.codes[e.code().name] += 1
        return
    level.latencies_ms.append((time.perf_counter() - start) * 1e3)
    level.codes["OK"] += 1
    level.sources[pb.DecisionSource.Name(answer.decision_source)] += 1
    if answer.fallback_used:
        level.fallbacks[pb.FallbackReason.Name(answer.fallback_reason)] += 1


async def _sample(server: Server, level: Level, stop: asyncio.Event) -> None:
    """Readiness and the engine queue depth, every SAMPLE_EVERY_S, until `stop`."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"

    def scrape() -> float | None:
        with urllib.request.urlopen(url, timeout=2) as r:  # loopback, our own server
            for line in r.read().decode().splitlines():
                if line.startswith("grpc_router_engine_queue_depth "):
                    return float(line.split()[1])
        return None

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            try:
                answer = await health.Check(
                    health_pb2.HealthCheckRequest(service=READINESS_SERVICE), timeout=2
                )
                level.readiness[health_pb2.HealthCheckResponse.ServingStatus.Name(
                    answer.status)] += 1  # fmt: skip
            except grpc.aio.AioRpcError as e:
                level.readiness[f"check {e.code().name}"] += 1
            with contextlib.suppress(OSError, ValueError):
                depth = await asyncio.to_thread(scrape)
                if depth is not None:
                    level.queue_depth.append(depth)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)


async def run_level(
    server: Server,
    stubs: list[router_pb2_grpc.RouterServiceAsyncStub],
    level: Level,
    convs: Conversations,
    args: argparse.Namespace,
) -> Level:
    """`level.in_flight` clients, each sending its next call when the last is answered, until
    the duration or the call budget is spent."""
    budget = args.max_calls
    deadline = time.perf_counter() + args.duration
    sent = 0

    async def client(k: int) -> None:
        nonlocal sent
        stub = stubs[k % len(stubs)]
        while sent < budget and time.perf_counter() < deadline:
            sent += 1
            await _route(stub, convs.take(), args.call_timeout, level)

    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample(server, level, stop))
    cpu0, rusage0 = server.cpu_s(), resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(level.in_flight)))
    level.wall_s = time.perf_counter() - start
    rusage1 = resource.getrusage(resource.RUSAGE_SELF)
    level.server_cpu_s = server.cpu_s() - cpu0
    level.client_cpu_s = (rusage1.ru_utime - rusage0.ru_utime) + (
        rusage1.ru_stime - rusage0.ru_stime
    )
    stop.set()
    await sampler
    return level


async def drive(server: Server, args: argparse.Namespace) -> tuple[float, list[Level]]:
    levels = [int(x) for x in args.levels.split(",") if x]
    pool = conversation_pool()
    ready_s = await wait_serving(server)
    say(f"server SERVING after {ready_s:.1f} s (pid {server.proc.pid}, port {server.port})")
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
                for _ in range(max(1, args.channels))]  # fmt: skip
    stubs = [router_pb2_grpc.RouterServiceStub(c) for c in channels]
    results: list[Level] = []
    try:
        # Warm-up (not reported): connections, the route index, the encoder's first runs.
        warm = Level("warm-up", 16, "distinct")
        warm_args = argparse.Namespace(**{**vars(args), "duration": 2.0, "max_calls": 400})
        await run_level(server, stubs, warm, Conversations(pool, tag="warm-up"), warm_args)
        offset = 0
        for n in levels:
            level = Level(f"{n} in flight, distinct", n, "distinct")
            say(f"{n} in flight: up to {args.duration:.0f} s or {args.max_calls} calls")
            await run_level(server, stubs, level, Conversations(pool, offset=offset), args)
            offset += sum(level.codes.values())
            row = level.row()
            say(f"  {row['req_per_s']} req/s, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
                f"load fallbacks {row['load_fallback_share']}, errors {row['errors']}")  # fmt: skip
            results.append(level)
        if args.repeated:
            level = Level(f"16 in flight, {args.repeated} conversations repeated", 16, "repeated")
            say(f"repeated: {args.repeated} conversations, 16 in flight")
            # Tagged: not sent before, so the first call of each is the engine's.
            repeat = Conversations(pool, repeat=args.repeated, tag="repeated")
            await run_level(server, stubs, level, repeat, args)
            row = level.row()
            say(f"  {row['req_per_s']} req/s, p50 {row['p50_ms']} ms, sources {row['sources']}")
            results.append(level)
    finally:
        for channel in channels:
            await channel.close()
    return ready_s, results


# --- report -----------------------------------------------------------------------------------


def _cell(x: Any) -> str:
    return "–" if x is None else str(x)


def _gib(x: int | None) -> str:
    return "–" if x is None else f"{x / 2**30:.2f} GiB"


def _share(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# One replica's capacity (encoder engine, loopback)",
        "",
        f"`grpc-router serve` with {report['config_source']} (engine `encoder`, "
        f"{report['engine_settings']}), driven by grpc.aio clients over "
        f"{report['args']['channels']} HTTP/2 connections, `Route` with `skip_scores`; each "
        f"level for {report['args']['duration']} s or {report['args']['max_calls']} calls. "
        f"Machine: {m['cpu']}, {m['cores']} cores (shared by the clients and the server). "
        f"Server ready {report['ready_s']:.1f} s after start; its peak RSS "
        f"{_gib(report.get('server_peak_rss_bytes'))}.",
        "",
        "| calls in flight | conversations | calls | req/s | p50 ms | p99 ms | fallback (load) | "
        "fallback (all) | errors | from cache | queue depth max | readiness NOT_SERVING | "
        "CPU cores: server / clients |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "none"
        cached = r["sources"].get("DECISION_SOURCE_CACHE", 0)
        ok = sum(r["sources"].values())
        lines.append(
            f"| {r['in_flight']} | {r['conversations']} | {r['calls']} | {r['req_per_s']} | "
            f"{_cell(r['p50_ms'])} | {_cell(r['p99_ms'])} | {_share(r['load_fallback_share'])} | "
            f"{_share(r['fallback_share'])} | {errors} | "
            f"{f'{100 * cached / ok:.0f}%' if ok else '–'} | {_cell(r['queue_depth_max'])} | "
            f"{_share(r['not_ready_share'])} | {_cell(r['server_cpu_cores'])} / "
            f"{_cell(r['client_cpu_cores'])} |"
        )
    lines += [
        "",
        "Fallback (load): answered with the default route because the engine was overloaded, "
        "timed out or failed (`fail_open`); fallback (all) adds the engine's own `other` and "
        "low-confidence answers. Readiness: the share of `grpc_router.readiness` checks "
        f"(every {SAMPLE_EVERY_S} s) that said NOT_SERVING during the level.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    artifact = encoder_artifact(args.artifact)
    port, metrics_port = free_port(), free_port()
    while metrics_port == port:
        metrics_port = free_port()
    config = server_config(args.config, artifact, port, metrics_port)
    with tempfile.TemporaryDirectory(prefix="bench-replica-") as tmp:
        server = start_server(config, Path(tmp))
        say(f"grpc-router serve (encoder, {artifact}) on 127.0.0.1:{port}, metrics {metrics_port}")
        budget = 60 + START_TIMEOUT_S + (len(args.levels.split(",")) + 2) * (args.duration + 30)
        try:
            ready_s, levels = asyncio.run(asyncio.wait_for(drive(server, args), budget))
        finally:
            server_rss = server.peak_rss_bytes()
            server.stop()
            log_lines = sum(1 for _ in server.log.open("rb"))
    enc = EncoderSettings(**(config["engine"].get("encoder") or {}))
    report = {
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "grpcio": grpc.__version__},
        "args": {k: str(v) for k, v in vars(args).items()},
        "config_source": str(args.config.relative_to(repo_root()))
        if args.config.is_relative_to(repo_root()) else str(args.config),
        "engine_settings": f"workers {enc.workers}, threads {intra_op_threads(enc)}, "
        f"max_queue {enc.max_queue}",
        "server": {k: config["server"].get(k) for k in ("max_concurrent_rpcs",)},
        "artifact": str(artifact),
        "ready_s": ready_s,
        "server_peak_rss_bytes": server_rss,
        "server_log_lines": log_lines,
        "rows": [level.row() for level in levels],
    }  # fmt: skip
    text = markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replica-bench.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "replica-bench.md").write_text(text)
    print(text)
    say(f"wrote {args.out / 'replica-bench.md'} and {args.out / 'replica-bench.json'}")
    return 0


def _cpu() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
