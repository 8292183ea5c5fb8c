"""The grpc.aio server process: services, health and readiness, reflection, TLS, HTTP/2
keepalive, signals and draining, metrics endpoint."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from grpc_router.core.router import Router
from grpc_router.engines.selection import build_engine
from grpc_router.errors import RouterError
from grpc_router.observability import logs, metrics, tracing
from grpc_router.serving.extproc import register_ext_proc
from grpc_router.serving.interceptors import CallInterceptor, Calls
from grpc_router.serving.servicer import RouterServicer
from grpc_router.settings import AppConfig, ConfigError, ServerConfig, load_config
from grpc_router.types import Engine, Message, Role
from grpc_router.v1 import router_pb2, router_pb2_grpc

ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# The health service name of readiness: SERVING when the engine is loaded and the server is not
# overloaded. "" (liveness) stays SERVING while busy.
READINESS_SERVICE = "grpc_router.readiness"
# How often readiness re-reads the engine queue between calls starting and finishing.
_READINESS_TICK_S = 0.25
# gRPC's own hard stop comes this long after server.grace_s, for calls the drain cannot end.
_STOP_MARGIN_S = 5.0
# Once the drain is done, how long gRPC waits for the calls it never handed to a handler.
_FINAL_STOP_S = 1.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Sections a SIGHUP cannot change: they shape the running process.
_RESTART_ONLY = ("server", "engine", "metrics", "ext_proc")

_log = logs.get_logger("grpc_router.serving.server")


class ServeError(RouterError):
    """The server cannot start (e.g. its port is taken)."""


def _credentials(server: ServerConfig) -> grpc.ServerCredentials | None:
    tls = server.tls
    if tls is None:
        return None
    pair = (tls.key.read_bytes(), tls.cert.read_bytes())
    ca = tls.client_ca.read_bytes() if tls.client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=bool(ca))


def _channel_options(cfg: AppConfig) -> list[tuple[str, int]]:
    server = cfg.server

    def ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))

    options = [
        # gRPC's own cap sits above the configured limit so the servicer can answer
        # INVALID_ARGUMENT naming the limit for anything in between.
        ("grpc.max_receive_message_length", 2 * cfg.limits.max_message_bytes + (1 << 16)),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", ms(server.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(server.keepalive_timeout_s)),
        # Keep pinging a connection whose streams send nothing (a stalled client), and
        # ping connections without calls too, so that dead peers are found.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # Accept client keepalive pings every 10 s or more (gRPC's default of 5 min answers
        # common client settings with GOAWAY too_many_pings).
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ]
    if server.max_connection_idle_s is not None:
        options.append(("grpc.max_connection_idle_ms", ms(server.max_connection_idle_s)))
    if server.max_connection_age_s is not None:
        options.append(("grpc.max_connection_age_ms", ms(server.max_connection_age_s)))
    if server.max_connection_age_grace_s is not None:
        options.append(("grpc.max_connection_age_grace_ms", ms(server.max_connection_age_grace_s)))
    return options


def queue_depth() -> float:
    """The engine queue's depth, as `grpc_router_engine_queue_depth` reports it."""
    for metric in metrics.QUEUE_DEPTH.collect():
        for sample in metric.samples:
            return float(sample.value)
    return 0.0


class HealthService(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1, whose Watch streams end once draining starts (an open Watch would
    otherwise hold the process for the whole grace period). `before_check` may refresh a
    computed status (readiness) just before a Check answers it."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._closing = False
        self.before_check: Callable[[str], None] = lambda service: None

    def get(self, service: str) -> int | None:
        return self._status.get(service)

    def set(self, service: str, status: int) -> None:
        """Sets a service's status and wakes its watchers; ignored once draining."""
        if self._closing or self._status.get(service) == status:
            return
        self._status[service] = status
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good; each Watch sends that, then ends (OK)."""
        if self._closing:
            return
        for service in self._status:
            self._status[service] = _NOT_SERVING
        self._closing = True
        self._notify()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        self.before_check(request.service)
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: int | None = None
        while True:
            changed = self._changed
            status = self._status.get(
                request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            )
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
                continue  # it may have changed (or draining begun) while this was sent
            if self._closing:
                return
            await changed.wait()


class RouterServer:
    """One serving process. `run()` returns when SIGTERM/SIGINT draining has finished."""

    def __init__(self, config_path: Path, config: AppConfig, engine: Engine) -> None:
        self._path = config_path
        self._router = Router(config, engine)
        self._health = HealthService()
        self._health.before_check = self._check_readiness
        self._services = ["", ROUTER_SERVICE]
        if config.ext_proc.enabled:
            self._services.append(EXT_PROC_SERVICE)
        # The concurrency limit is the interceptor's, not gRPC's (maximum_concurrent_rpcs):
        # gRPC would count health checks, ListRoutes and calls whose request has not arrived.
        self.calls = Calls(config.server.max_concurrent_rpcs)
        self.calls.on_change = self.update_readiness
        interceptors: list[grpc.aio.ServerInterceptor] = [
            CallInterceptor(
                self.calls,
                lambda: self._router.config.limits,
                lambda: self._router.config.logging.log_content,
            )
        ]
        if tracing.setup_tracing(config.tracing):
            # Outermost: the RPC's span (W3C traceparent from the metadata) covers it all.
            interceptors.insert(0, aio_server_interceptor())  # type: ignore[no-untyped-call]
        self._server = grpc.aio.server(interceptors=interceptors, options=_channel_options(config))
        self._serving = False
        self._stopping = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.port = 0
        self.metrics_port: int | None = None

    @property
    def router(self) -> Router:
        return self._router

    def ready(self) -> bool:
        """Readiness: the engine is loaded, the server not draining and not overloaded."""
        calls = self.calls
        if not self._serving or calls.draining or calls.saturated:
            return False
        return queue_depth() < self._router.config.server.overload_queue_depth

    def update_readiness(self) -> None:
        """Cheap; runs as routing calls start and finish, on a tick, and on each readiness
        Check. Watchers hear only of changes."""
        self._health.set(READINESS_SERVICE, _SERVING if self.ready() else _NOT_SERVING)

    def _check_readiness(self, service: str) -> None:
        if service == READINESS_SERVICE:
            self.update_readiness()

    async def _readiness_ticks(self) -> None:
        """The engine queue moves inside calls too; re-read it now and then."""
        while not self._stopping.is_set():
            self.update_readiness()
            await asyncio.sleep(_READINESS_TICK_S)

    async def start(self) -> None:
        cfg = self._router.config
        router_pb2_grpc.add_RouterServiceServicer_to_server(
            RouterServicer(self._router), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        register_ext_proc(self._server, self._router, cfg.ext_proc)
        if cfg.server.reflection:
            names = (
                *self._services[1:],
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            )
            reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), self._server)
        for name in (*self._services, READINESS_SERVICE):
            self._health.set(name, _NOT_SERVING)
        address = f"{cfg.server.host}:{cfg.server.port}"
        creds = _credentials(cfg.server)
        try:
            if creds is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, creds)
        except RuntimeError:
            raise ServeError(
                f"cannot listen on {address} (in use?): change server.port in {self._path}"
            ) from None
        if cfg.metrics.port is not None:
            try:
                self.metrics_port = metrics.serve_metrics(cfg.metrics.host, cfg.metrics.port)
            except OSError as e:
                raise ServeError(
                    f"cannot serve metrics on {cfg.metrics.host}:{cfg.metrics.port} "
                    f"({e.strerror}): change metrics.port in {self._path}"
                ) from None
        await self._server.start()
        _log.info(
            "listening",
            host=cfg.server.host,
            port=self.port,
            tls=creds is not None,
            mtls=bool(cfg.server.tls and cfg.server.tls.client_ca),
            metrics_port=self.metrics_port,
            engine=self._router.engine.name,
        )

    async def warm_up(self) -> None:
        """Load and warm the engine, then report SERVING. Until then Route fails open."""
        engine = self._router.engine
        try:
            await engine.start()
        except Exception:
            _log.exception("engine failed to start; health stays NOT_SERVING", engine=engine.name)
            return
        await self._warm_routes()
        if self._stopping.is_set():
            return
        for name in self._services:
            self._health.set(name, _SERVING)
        self._serving = True
        self.update_readiness()
        _log.info("serving", engine=engine.name)

    async def _warm_routes(self) -> None:
        """One throw-away decision on the configured route set, so engines that cache per
        route set (Arch-Router's prefix KV) do not make the first real call pay for it."""
        routes = self._router.config.route_specs()
        try:
            await self._router.engine.decide(
                [Message(Role.USER, "warm-up")], routes, full_scores=False
            )
        except Exception as e:
            _log.warning("route-set warm-up failed", error=f"{type(e).__name__}: {e}")

    def reload(self) -> bool:
        """Re-read the config file and swap it in; a bad file is refused and logged."""
        old = self._router.config
        try:
            new = load_config(self._path)
        except ConfigError as e:
            _log.error("reload refused; keeping the running config", errors=e.errors)
            return False
        ignored = [s for s in _RESTART_ONLY if getattr(new, s) != getattr(old, s)]
        if ignored:
            new = new.model_copy(update={s: getattr(old, s) for s in ignored})
            _log.warning("reload: these sections need a restart; kept as running", sections=ignored)
        self._router.swap_config(new)
        if new.routes != old.routes and self._router.engine.ready:
            task = asyncio.get_running_loop().create_task(self._warm_routes())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        logs.configure(new.logging.level)
        _log.info("reloaded", routes=[r.name for r in new.routes], models=sorted(new.models))
        return True

    def request_stop(self) -> None:
        self._stopping.set()

    async def drain(self) -> None:
        """Health (every service) NOT_SERVING and health watches ended; no new calls; the calls
        in flight get server.grace_s to finish, then end UNAVAILABLE (which clients retry)."""
        grace = self._router.config.server.grace_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        _log.info("draining", grace_s=grace, calls=len(self.calls))
        self.calls.draining = True
        await self._health.enter_graceful_shutdown()
        # gRPC refuses new calls from now on; its own hard stop is only a backstop.
        stop = asyncio.create_task(self._server.stop(grace + _STOP_MARGIN_S))
        await self.calls.wait_idle(grace)
        # Calls not handed to a handler yet (their request still arriving) get the rest.
        await asyncio.wait({stop}, timeout=max(0.0, deadline - loop.time()))
        ended = await self.calls.interrupt_all()
        if ended:
            _log.warning(
                "drain: calls still running at the end of server.grace_s ended UNAVAILABLE",
                calls=ended,
                grace_s=grace,
            )
        # What is left never reached a handler: streams stalled before their request arrived,
        # reflection streams. A second stop cuts gRPC's wait short.
        await self._server.stop(_FINAL_STOP_S)
        await stop

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        warm = asyncio.create_task(self.warm_up())
        ticks = asyncio.create_task(self._readiness_ticks())
        await self._stopping.wait()
        await self.drain()
        warm.cancel()
        ticks.cancel()
        await self._router.close()
        await self._router.engine.close()
        tracing.shutdown_tracing()
        _log.info("stopped")
        return 0


def serve(config_path: Path) -> int:
    """Load the config, build the engine and serve until SIGTERM. Raises ConfigError."""
    cfg = load_config(config_path)
    logs.configure(cfg.logging.level)
    engine = build_engine(cfg.engine, base_dir=config_path.resolve().parent)
    return asyncio.run(_serve(config_path, cfg, engine))


async def _serve(config_path: Path, cfg: AppConfig, engine: Engine) -> int:
    return await RouterServer(config_path, cfg, engine).run()
