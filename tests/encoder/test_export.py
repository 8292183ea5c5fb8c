"""`python -m export --model minilm`: the encoder artifact, its manifest and its hash checks."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import onnx
import pytest

from grpc_router.engines.artifact import load_artifact, resolve_variant_dir
from grpc_router.engines.encoder.embedding import EmbeddingModel
from grpc_router.engines.encoder.engine import EncoderEngine
from grpc_router.errors import ArtifactError, EngineUnavailable
from tests.fixtures.models import run_export


def test_manifest(encoder_artifact: Path) -> None:
    assert resolve_variant_dir(encoder_artifact, None).name == "int8"
    for variant in ("int8", "fp32"):
        m = load_artifact(encoder_artifact / variant)
        assert m.kind == "encoder" and m.variant == variant
        assert m.extra == {
            "pooling": "mean",
            "normalize": True,
            "max_length": 256,
            "dimension": 384,
        }
        assert m.outputs == ["last_hidden_state"] and "input_ids" in m.inputs
        assert {"model.onnx", "tokenizer.json", "config.json"} <= set(m.files)
        floor = 0.999 if variant == "fp32" else 0.95
        assert m.parity["checked"] and m.parity["min_cosine"] > floor
    quant = load_artifact(encoder_artifact / "int8").quantization
    assert quant["per_channel"] is True and quant["weight_type"] == "QUInt8"
    # One fused attention per layer (six in MiniLM-L6), quantized along with the MatMuls.
    assert quant["fused"]["Attention"] == 6 and quant["fused"]["SkipLayerNormalization"] == 12
    ops = {n.op_type for n in onnx.load(str(encoder_artifact / "int8" / "model.onnx")).graph.node}
    assert {"QAttention", "MatMulInteger", "SkipLayerNormalization"} <= ops


def test_embeddings_are_unit_and_independent_of_padding(encoder_artifact: Path) -> None:
    model = EmbeddingModel(encoder_artifact, variant="fp32")
    found, hit = model.embed("book a table for two")
    assert not hit and model.embed("book a table for two")[1]
    assert abs(float((found.vector**2).sum()) - 1.0) < 1e-5
    # [CLS] and [SEP] are not among the token vectors; no padding ever enters.
    assert found.token_count == len(found.tokens) + 2 == 7


def test_tampered_artifact_is_refused(tmp_path: Path, encoder_artifact: Path) -> None:
    copy = tmp_path / "minilm"
    shutil.copytree(encoder_artifact, copy)
    with (copy / "int8" / "tokenizer.json").open("a") as handle:
        handle.write(" ")
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        asyncio.run(EncoderEngine(copy).start())


def test_decoder_artifact_is_refused(tiny_artifacts: Path) -> None:
    with pytest.raises(EngineUnavailable, match="encoder artifact"):
        EmbeddingModel(tiny_artifacts, variant="fp32")


def test_unknown_encoder_variant(tmp_path: Path) -> None:
    result = run_export("--model", "minilm", "--out", str(tmp_path), "--variants", "int4")
    assert result.returncode == 2
    assert "not available for an encoder" in result.stderr and "int8" in result.stderr
    assert not (tmp_path / "minilm" / "int4").exists()
