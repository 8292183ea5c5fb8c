"""A random-weight artifact variant without its weights, for benchmark machines that cannot take
gigabytes (a lent GPU takes 64 MiB a call).

Random weights carry no information and speed does not depend on their values, so `pack` keeps
the graph, tokenizer, config and manifest, plus every small or non-weight tensor of the external
data file byte for byte (shapes, norms, scales, constants); `unpack` redraws the large
float/int8 tensors from a seeded generator (N(0, 0.02), the checkpoint's init) and re-hashes
the manifest. Only for the `full-shape` benchmark artifacts: never for a real checkpoint.

    python -m bench.skeleton pack artifacts/full-shape/fp16 fp16.skel.tar.gz
    python -m bench.skeleton unpack fp16.skel.tar.gz artifacts/full-shape/fp16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo

from grpc_router.engines.artifact import MANIFEST_NAME, hash_tree

INDEX = "skeleton.json"
KEPT = "skeleton-kept.bin"
REDRAW_MIN_BYTES = 1 << 18  # weights; anything smaller travels as it is
REDRAW: dict[int, type[np.generic]] = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
}


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a graph and its subgraphs (If branches hold initializers too)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def _span(data_file: Path, info: ExternalDataInfo) -> tuple[int, int]:
    """A tensor's offset and length in its external data file (ONNX's defaults when absent:
    offset 0, length up to the end of the file)."""
    offset = 0 if info.offset is None else int(info.offset)
    length = data_file.stat().st_size - offset if info.length is None else int(info.length)
    return offset, length


def pack(variant_dir: Path, out: Path, *, min_bytes: int = REDRAW_MIN_BYTES) -> dict[str, Any]:
    manifest = json.loads((variant_dir / MANIFEST_NAME).read_text())
    model = onnx.load(str(variant_dir / manifest["model_file"]), load_external_data=False)
    data_files: set[str] = set()
    redraw: list[tuple[int, int, str]] = []
    kept: list[tuple[int, int, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        blob = Path(tmp) / KEPT
        with blob.open("wb") as kept_fh:
            for t in _tensors(model.graph):
                if t.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                info = ExternalDataInfo(t)
                data_files.add(info.location)
                if len(data_files) > 1:
                    raise SystemExit(f"{variant_dir}: more than one external data file")
                offset, length = _span(variant_dir / info.location, info)
                if t.data_type in REDRAW and length >= min_bytes:
                    redraw.append((offset, length, np.dtype(REDRAW[t.data_type]).name))
                    continue
                with (variant_dir / info.location).open("rb") as fh:
                    fh.seek(offset)
                    kept.append((offset, length, kept_fh.tell()))
                    kept_fh.write(fh.read(length))
        (data_file,) = data_files
        index = {
            "data_file": data_file,
            "size": (variant_dir / data_file).stat().st_size,
            "redraw": redraw,
            "kept": kept,
        }
        (Path(tmp) / INDEX).write_text(json.dumps(index))
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, "w:gz") as tar:
            for path in sorted(variant_dir.iterdir()):
                if path.is_file() and path.name != data_file:
                    tar.add(path, arcname=path.name)
            tar.add(blob, arcname=KEPT)
            tar.add(Path(tmp) / INDEX, arcname=INDEX)
        partial.rename(out)
    return {"redrawn_bytes": sum(r[1] for r in redraw), "kept_bytes": sum(k[1] for k in kept)}


def unpack(archive: Path, dest: Path, *, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    tmp = dest.with_name(f".{dest.name}.unpack-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    index = json.loads((tmp / INDEX).read_text())
    data = tmp / index["data_file"]
    with data.open("wb") as fh:
        fh.truncate(index["size"])
    mm = np.memmap(data, dtype=np.uint8, mode="r+")
    blob = np.fromfile(tmp / KEPT, dtype=np.uint8)
    for offset, length, at in index["kept"]:
        mm[offset : offset + length] = blob[at : at + length]
    step = 64 << 20
    for offset, length, dtype_name in index["redraw"]:
        dtype = np.dtype(dtype_name)
        for start in range(0, length, step):
            n = min(step, length - start) // dtype.itemsize
            if dtype.kind == "f":
                values = (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(dtype)
            else:
                info = np.iinfo(dtype)
                values = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
            mm[offset + start : offset + start + n * dtype.itemsize] = values.view(np.uint8)
    mm.flush()
    del mm
    (tmp / INDEX).unlink()
    (tmp / KEPT).unlink()
    manifest = json.loads((tmp / MANIFEST_NAME).read_text())
    manifest["files"] = hash_tree(tmp)
    manifest.setdefault("extra", {})["weights_redrawn"] = f"bench.skeleton seed {seed}"
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        dest.rename(old)  # swap, so that dest is never half-written
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.skeleton", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("variant_dir", type=Path)
    a.add_argument("out", type=Path)
    b = sub.add_parser("unpack")
    b.add_argument("archive", type=Path)
    b.add_argument("dest", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "pack":
        print(json.dumps(pack(args.variant_dir, args.out)))
    else:
        unpack(args.archive, args.dest)
        print(args.dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
