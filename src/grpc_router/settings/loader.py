"""Read a YAML config file and validate it, reporting every error at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from grpc_router.errors import RouterError
from grpc_router.settings.app import AppConfig, cross_ref_problems


class ConfigError(RouterError):
    """The config file is unreadable or invalid; the message lists every error."""

    def __init__(self, path: Path, errors: list[str]) -> None:
        lines = "\n".join(f"  {path}: {e}" for e in errors)
        super().__init__(f"invalid config ({len(errors)} error(s)):\n{lines}")
        self.path = path
        self.errors = errors


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _format_errors(err: ValidationError) -> list[str]:
    out: list[str] = []
    for e in err.errors():
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "value_error" and not e["loc"]:
            # Cross-reference errors carry their own key paths.
            out.extend(msg.split("; "))
        else:
            out.append(f"{_loc(e['loc'])}: {msg}")
    return out


def _resolve(cfg: AppConfig, base_dir: Path) -> AppConfig:
    """Make relative paths absolute against the config file's directory."""

    def fix(p: Path) -> Path:
        return p if p.is_absolute() else (base_dir / p)

    tls = cfg.server.tls
    server = cfg.server
    if tls is not None:
        tls = tls.model_copy(
            update={
                "cert": fix(tls.cert),
                "key": fix(tls.key),
                "client_ca": fix(tls.client_ca) if tls.client_ca else None,
            }
        )
        server = server.model_copy(update={"tls": tls})
    return cfg.model_copy(update={"server": server})


def _check_files(cfg: AppConfig) -> list[str]:
    problems: list[str] = []
    tls = cfg.server.tls
    if tls is not None:
        for key, p in (("cert", tls.cert), ("key", tls.key), ("client_ca", tls.client_ca)):
            if p is not None and not p.is_file():
                problems.append(f"server.tls.{key}: file not found: {p}")
    return problems


def parse_config(data: Any, path: Path) -> AppConfig:
    """Validate already-parsed YAML; `path` names the file in errors and anchors relative
    paths."""
    if not isinstance(data, dict):
        raise ConfigError(path, ["(top level): expected a mapping of sections"])
    try:
        cfg = AppConfig.model_validate(data)
    except ValidationError as e:
        errors = _format_errors(e)
        cross = [p for p in cross_ref_problems(data) if p not in errors]
        raise ConfigError(path, errors + cross) from None
    cfg = _resolve(cfg, path.parent.resolve())
    problems = _check_files(cfg)
    if problems:
        raise ConfigError(path, problems)
    return cfg


def load_config(path: Path) -> AppConfig:
    """Read and validate a YAML config. Raises ConfigError listing every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(path, [f"(file): cannot read: {e.strerror or e}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(path, [f"{where}: YAML syntax error: {problem}"]) from None
    return parse_config(data, path)
