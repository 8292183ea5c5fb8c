"""Atomic artifact directories and what their manifest records about the graph.

Build in a temp dir beside the target, rename on success:

    with ArtifactBuilder(Path("artifacts/tiny/int4")) as builder:
        write files into builder.tmp ...
        builder.write_manifest(kind="decoder", name="tiny", source=..., variant="int4", ...)
    # on a clean exit the temp dir replaces artifacts/tiny/int4; on error or kill it never does.

Temp and retired dirs start with '.', so `grpc_router.engines.artifact` never mistakes them for
variants. A later builder for the same target removes the leftovers of a killed one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import onnx

from grpc_router.engines.artifact import DEFAULT_FILE, MANIFEST_NAME, Manifest, hash_tree
from grpc_router.errors import ArtifactError

VERSIONED_PACKAGES = (
    "optimum",
    "optimum-onnx",
    "onnx",
    "onnxruntime",
    "transformers",
    "torch",
    "tokenizers",
)


def collect_versions(packages: tuple[str, ...] = VERSIONED_PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shaped an artifact (absent ones are skipped)."""
    out: dict[str, str] = {}
    for name in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_tree(directory: Path) -> None:
    """Flush every file and directory under `directory` (and itself) to disk."""
    for path in sorted(directory.rglob("*"), reverse=True):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path`'s content in one rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def dir_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive flock (blocks until free); released on exit or when the process dies."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class ArtifactBuilder:
    """Builds one artifact directory (e.g. `artifacts/<name>/<variant>`) atomically."""

    def __init__(self, final_dir: Path) -> None:
        self.final_dir = Path(final_dir).absolute()
        self.parent = self.final_dir.parent
        token = f"{self.final_dir.name}-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp = self.parent / f".tmp-{token}"
        self._retired = self.parent / f".old-{token}"
        self.manifest: Manifest | None = None

    def __enter__(self) -> ArtifactBuilder:
        self.parent.mkdir(parents=True, exist_ok=True)
        recover_leftovers(self.final_dir)
        self.tmp.mkdir()
        return self

    def write_manifest(self, **fields: Any) -> Manifest:
        """Hash every file now in `tmp` and write manifest.json; `files`/`created_at`/`versions`
        are filled in unless given."""
        fields.setdefault("files", hash_tree(self.tmp))
        fields.setdefault("versions", collect_versions())
        fields.setdefault("created_at", dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        manifest = Manifest.model_validate(fields)
        missing = [rel for rel in manifest.files if not (self.tmp / rel).is_file()]
        if missing:
            raise ArtifactError(f"manifest lists files not in the artifact: {missing}")
        (self.tmp / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        self.manifest = manifest
        return manifest

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.manifest is None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise ArtifactError(f"{self.final_dir}: builder closed without write_manifest()")
        self.commit()

    def commit(self) -> None:
        fsync_tree(self.tmp)
        had_old = self.final_dir.exists()
        if had_old:
            os.rename(self.final_dir, self._retired)
        os.rename(self.tmp, self.final_dir)
        fsync_dir(self.parent)
        if had_old:
            shutil.rmtree(self._retired, ignore_errors=True)


@contextlib.contextmanager
def scratch_dir(parent: Path, label: str) -> Iterator[Path]:
    """A private work dir `parent/.work-<label>-<pid>-<rand>`, removed on exit; ones left by
    killed processes are removed on the next call."""
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".work-{label}-"
    for path in parent.glob(prefix + "*"):
        pid = path.name[len(prefix) :].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
    path = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def recover_leftovers(final_dir: Path) -> None:
    """Undo what a killed builder of `final_dir` left: drop its temp dir, and put back the old
    artifact if it was killed between the two renames of a commit."""
    parent = final_dir.parent
    if not parent.is_dir():
        return
    for kind in (".old-", ".tmp-"):
        for path in parent.glob(f"{kind}{final_dir.name}-*"):
            try:
                pid = int(path.name[len(kind) + len(final_dir.name) + 1 :].split("-")[0])
            except ValueError:
                continue
            if _pid_alive(pid):
                continue
            if kind == ".old-" and not final_dir.exists():
                os.rename(path, final_dir)
            else:
                shutil.rmtree(path, ignore_errors=True)


def set_default_variant(root: Path, variant: str) -> None:
    """Record the variant `resolve_variant_dir` picks for `root` when none is asked for."""
    write_text_atomic(root / DEFAULT_FILE, variant + "\n")


def graph_facts(model_path: Path) -> dict[str, Any]:
    """Opset, input/output names and dtypes of a graph (manifest fields), without loading its
    weights."""
    model = onnx.load(str(model_path), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

    def dtype(value: onnx.ValueInfoProto) -> str:
        np_type = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        return str(np_type)

    return {
        "opset": opset,
        "inputs": [v.name for v in model.graph.input],
        "outputs": [v.name for v in model.graph.output],
        "io_dtypes": {v.name: dtype(v) for v in [*model.graph.input, *model.graph.output]},
    }
