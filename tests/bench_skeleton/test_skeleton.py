"""The benchmark's weightless artifact: pack keeps the graph and every small tensor, unpack
redraws the weights, and the result is a valid artifact that runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from bench.skeleton import pack, unpack
from grpc_router.engines.arch_router.runtime import DecoderSession
from grpc_router.engines.artifact import load_artifact

MIN_BYTES = 4096  # the tiny model's weights are small: redraw anything from 4 KiB up
REDRAWN = (np.float32, np.float16, np.int8, np.uint8)


def _tensors(variant_dir: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(variant_dir / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_pack_then_unpack_redraws_weights_and_keeps_the_rest(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    source = tiny_artifacts / "int8"
    archive = tmp_path / "int8.skel.tar.gz"
    sizes = pack(source, archive, min_bytes=MIN_BYTES)
    data_bytes = (source / "model.onnx.data").stat().st_size
    assert sizes["redrawn_bytes"] > 0 and sizes["kept_bytes"] > 0
    assert archive.stat().st_size < data_bytes  # the weights did not travel

    dest = tmp_path / "out" / "int8"
    unpack(archive, dest)
    unpack(archive, dest)  # again over the first: replaced whole, nothing half-written left
    assert sorted(p.name for p in dest.parent.iterdir()) == ["int8"]
    manifest = load_artifact(dest)  # hashes re-recorded and verified
    assert manifest.extra["weights_redrawn"].startswith("bench.skeleton")

    before, after = _tensors(source), _tensors(dest)
    assert before.keys() == after.keys()
    redrawn = [n for n, v in before.items() if v.nbytes >= MIN_BYTES and v.dtype.type in REDRAWN]
    assert redrawn
    for name, value in before.items():
        assert after[name].shape == value.shape and after[name].dtype == value.dtype
        if name not in redrawn:  # shapes, norms, scales, constants travel byte for byte
            assert np.array_equal(after[name], value), name
    assert any(not np.array_equal(after[n], before[n]) for n in redrawn)

    session = DecoderSession(dest / "model.onnx", provider="cpu")
    ids = np.asarray([[5, 6, 7, 8]])
    out = session.run(ids, np.ones((1, 4), np.int64), np.arange(4)[None], session.empty_past(1))
    assert np.isfinite(out.logits).all()


def test_unpack_is_seeded(tiny_artifacts: Path, tmp_path: Path) -> None:
    archive = tmp_path / "fp16.skel.tar.gz"
    pack(tiny_artifacts / "fp16", archive, min_bytes=MIN_BYTES)
    unpack(archive, tmp_path / "a" / "fp16")
    unpack(archive, tmp_path / "b" / "fp16")
    a, b = (tmp_path / d / "fp16" / "model.onnx.data" for d in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
