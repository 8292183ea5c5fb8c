"""Every setting of grpc-router, on the ground floor: pure pydantic models and the YAML loader.

Engines, dispatch, ext_proc and the server import from here; nothing here imports them, so
reading a config file loads no model runtime, no gRPC and no HTTP client.
"""

from grpc_router.settings.app import (
    ROUTE_NAME_PATTERN,
    ROUTE_NAME_RE,
    AppConfig,
    CircuitBreakerConfig,
    LimitsConfig,
    LoggingConfig,
    MetricsConfig,
    ModelConfig,
    RouteConfig,
    RoutingConfig,
    ServerConfig,
    SessionConfig,
    TlsConfig,
    TracingConfig,
)
from grpc_router.settings.engines import (
    ArchRouterSettings,
    EncoderSettings,
    EngineConfig,
    EngineKind,
    Provider,
)
from grpc_router.settings.extproc import ExtProcSettings
from grpc_router.settings.loader import ConfigError, load_config, parse_config

__all__ = [
    "ROUTE_NAME_PATTERN",
    "ROUTE_NAME_RE",
    "AppConfig",
    "ArchRouterSettings",
    "CircuitBreakerConfig",
    "ConfigError",
    "EncoderSettings",
    "EngineConfig",
    "EngineKind",
    "ExtProcSettings",
    "LimitsConfig",
    "LoggingConfig",
    "MetricsConfig",
    "ModelConfig",
    "Provider",
    "RouteConfig",
    "RoutingConfig",
    "ServerConfig",
    "SessionConfig",
    "TlsConfig",
    "TracingConfig",
    "load_config",
    "parse_config",
]
