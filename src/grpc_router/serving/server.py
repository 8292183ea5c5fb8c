"""The grpc.aio server process: services, health, reflection, TLS, signals, metrics endpoint."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from grpc_router.core.router import Router
from grpc_router.engines.selection import build_engine
from grpc_router.errors import RouterError
from grpc_router.observability import logs, metrics
from grpc_router.serving.extproc import register_ext_proc
from grpc_router.serving.interceptors import CallInterceptor
from grpc_router.serving.servicer import RouterServicer
from grpc_router.settings import AppConfig, ConfigError, ServerConfig, load_config
from grpc_router.types import Engine, Message, Role
from grpc_router.v1 import router_pb2, router_pb2_grpc

ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
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


class RouterServer:
    """One serving process. `run()` returns when SIGTERM/SIGINT draining has finished."""

    def __init__(self, config_path: Path, config: AppConfig, engine: Engine) -> None:
        self._path = config_path
        self._router = Router(config, engine)
        self._health = health_aio.HealthServicer()
        self._services = ["", ROUTER_SERVICE]
        if config.ext_proc.enabled:
            self._services.append(EXT_PROC_SERVICE)
        limit = config.limits.max_message_bytes
        options = [
            # gRPC's own cap sits above the configured limit so the servicer can answer
            # INVALID_ARGUMENT naming the limit for anything in between.
            ("grpc.max_receive_message_length", 2 * limit + (1 << 16)),
            ("grpc.so_reuseport", 0),
        ]
        self._server = grpc.aio.server(
            interceptors=[CallInterceptor()],
            options=options,
            maximum_concurrent_rpcs=config.server.max_concurrent_rpcs,
        )
        self._stopping = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.port = 0
        self.metrics_port: int | None = None

    @property
    def router(self) -> Router:
        return self._router

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
        for name in self._services:
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
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
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
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

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        warm = asyncio.create_task(self.warm_up())
        await self._stopping.wait()
        grace = self._router.config.server.grace_s
        _log.info("draining", grace_s=grace)
        await self._health.enter_graceful_shutdown()
        warm.cancel()
        await self._server.stop(grace)
        await self._router.close()
        await self._router.engine.close()
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
