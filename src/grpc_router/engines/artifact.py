"""Load and verify a model artifact directory written by `make export` (torch-free).

Layout: `artifacts/<name>/<variant>/` holds the ONNX model (plus external data), the checkpoint's
tokenizer files, `config.json` and `manifest.json`. `artifacts/<name>/default` names the variant
to use when none is asked for.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from grpc_router.errors import ArtifactError

FORMAT_VERSION = 2
"""What `make export` writes. 2: decoder graphs take `logits_to_keep` -m (each row's last m)
and `attention_mask_4d`, so a route trie rides in the prompt's own run."""
# The oldest format each kind is still served from (encoder artifacts did not change in 2).
MIN_FORMAT_VERSION: dict[str, int] = {"decoder": 2, "encoder": 1}
MANIFEST_NAME = "manifest.json"
DEFAULT_FILE = "default"
# Used when an artifact root has no `default` file: the fastest variant whose logits do not depend
# on batch neighbours, padding or cached prefixes comes first (see README, "make export").
VARIANT_PREFERENCE: tuple[str, ...] = ("int8", "int4", "fp32", "fp16")
_CHUNK = 1 << 20


class Source(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    """Hub id or local directory the artifact was exported from."""
    revision: str | None = None


class Manifest(BaseModel):
    """What `manifest.json` records about one variant directory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = FORMAT_VERSION
    kind: Literal["decoder", "encoder"]
    name: str
    source: Source
    variant: str
    model_file: str
    """Path of the .onnx graph, relative to the variant directory."""
    quantization: dict[str, Any] = Field(default_factory=dict)
    opset: int
    inputs: list[str]
    outputs: list[str]
    io_dtypes: dict[str, str] = Field(default_factory=dict)
    """numpy dtype name of every graph input and output."""
    versions: dict[str, str] = Field(default_factory=dict)
    files: dict[str, str]
    """Relative path -> sha256 hex of every file in the directory except manifest.json."""
    parity: dict[str, Any] = Field(default_factory=dict)
    created_at: str
    extra: dict[str, Any] = Field(default_factory=dict)
    """Kind-specific facts (e.g. the encoder's pooling, the decoder's KV shape)."""

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


def sha256_file(path: Path) -> str:
    """Stream a file through sha256 (model weights are gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(directory: Path) -> dict[str, str]:
    """sha256 of every regular file under `directory` except the manifest, by relative path."""
    out: dict[str, str] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            out[path.relative_to(directory).as_posix()] = sha256_file(path)
    return out


def read_manifest(variant_dir: Path) -> Manifest:
    """Parse `manifest.json` without checking hashes."""
    path = variant_dir / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{variant_dir}: no {MANIFEST_NAME}; the artifact is missing or was never completed. "
            "Run `make export MODEL=<hub id or checkpoint dir>` (`python -m export --model ...`) "
            "to build it."
        )
    try:
        manifest = Manifest.model_validate_json(path.read_bytes())
    except (ValidationError, ValueError) as exc:
        raise ArtifactError(
            f"{path}: not a valid grpc-router manifest ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}); re-run `make export` to rebuild the artifact."
        ) from exc
    oldest = MIN_FORMAT_VERSION[manifest.kind]
    if manifest.format_version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: manifest format_version {manifest.format_version} is newer than this "
            f"server reads ({FORMAT_VERSION}); upgrade grpc-router or re-export it with "
            "`make export`."
        )
    if manifest.format_version < oldest:
        raise ArtifactError(
            f"{path}: a {manifest.kind} artifact of format_version {manifest.format_version} "
            f"is older than this server serves ({oldest}); re-export it with `make export`."
        )
    return manifest


def load_artifact(path: Path, *, verify_hashes: bool = True) -> Manifest:
    """Read a variant directory's manifest and check that every listed file is intact."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.model_file not in manifest.files:
        raise ArtifactError(
            f"{path / MANIFEST_NAME}: model_file {manifest.model_file!r} is not among its files; "
            "re-run `make export`."
        )
    for rel, expected in manifest.files.items():
        file = path / rel
        if not file.is_file():
            raise ArtifactError(
                f"{file}: listed in the manifest but missing; the artifact is incomplete. "
                "Re-run `make export` to rebuild it."
            )
        if verify_hashes:
            actual = sha256_file(file)
            if actual != expected:
                raise ArtifactError(
                    f"{file}: sha256 {actual[:16]}... does not match the manifest's "
                    f"{expected[:16]}...; the file was modified or corrupted. Re-run `make export` "
                    "(or restore the file) before serving it."
                )
    return manifest


def list_variants(root: Path) -> list[str]:
    """Completed variant directories of an artifact root (temp and work dirs start with '.')."""
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()
    )


def pick_default(variants: list[str]) -> str | None:
    """The preferred variant among `variants` (VARIANT_PREFERENCE order, then by name)."""
    for name in VARIANT_PREFERENCE:
        if name in variants:
            return name
    return sorted(variants)[0] if variants else None


def resolve_variant_dir(root: Path, variant: str | None) -> Path:
    """Turn a variant dir or an artifact root (`artifacts/<name>/`) into a variant directory.

    For a root, `variant` picks the subdirectory; None reads `<root>/default`, else the first of
    VARIANT_PREFERENCE that exists.
    """
    root = Path(root)
    if (root / MANIFEST_NAME).is_file():
        if variant is not None:
            actual = read_manifest(root).variant
            if actual != variant:
                raise ArtifactError(
                    f"{root} is the {actual!r} variant but variant {variant!r} was asked for; "
                    f"point at {root.parent} to choose among its variants."
                )
        return root
    if not root.is_dir():
        raise ArtifactError(
            f"{root}: no such artifact directory. Run `make export MODEL=<hub id or checkpoint "
            "dir>` to build it, or fix the path."
        )
    available = list_variants(root)
    if not available:
        raise ArtifactError(
            f"{root}: no completed variant (no <variant>/{MANIFEST_NAME}). Run `make export` "
            "to build it."
        )
    if variant is None:
        default_file = root / DEFAULT_FILE
        if default_file.is_file():
            variant = default_file.read_text(encoding="utf-8").strip()
        else:
            variant = pick_default(available)
    if variant not in available:
        raise ArtifactError(
            f"{root}: variant {variant!r} not found; available: {', '.join(available)}. "
            f"Export it with `make export VARIANTS={variant}` or pick one of those."
        )
    return root / variant


def manifest_summary(manifest: Manifest) -> dict[str, Any]:
    """A short, loggable view of a manifest."""
    return manifest.model_dump(
        mode="json", include={"name", "kind", "variant", "source", "quantization"}
    )
