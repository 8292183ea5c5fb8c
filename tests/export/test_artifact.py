"""The artifact layout, its manifest, and the server-side loader's refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export.manifest import ArtifactBuilder, recover_leftovers
from grpc_router.engines.artifact import (
    Manifest,
    list_variants,
    load_artifact,
    resolve_variant_dir,
)
from grpc_router.errors import ArtifactError
from tests.fixtures.models import TINY_VARIANTS


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_manifest_describes_the_variant(tiny_artifacts: Path, variant: str) -> None:
    manifest = load_artifact(tiny_artifacts / variant)
    assert manifest.kind == "decoder"
    assert manifest.variant == variant
    assert manifest.name == "tiny"
    assert manifest.source.id
    assert manifest.opset == 18
    assert manifest.inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.0.key" in manifest.inputs
    assert manifest.outputs[0] == "logits" and "present.1.value" in manifest.outputs
    assert manifest.io_dtypes["logits"] == "float32"
    # fp16 keeps its KV in float16 at the interface (it crosses PCIe every run on a GPU).
    kv_dtype = "float16" if variant == "fp16" else "float32"
    assert manifest.io_dtypes["past_key_values.0.key"] == kv_dtype
    assert manifest.io_dtypes["present.1.value"] == kv_dtype
    assert {"optimum", "onnx", "onnxruntime", "transformers"} <= set(manifest.versions)
    on_disk = {p.name for p in (tiny_artifacts / variant).iterdir()} - {"manifest.json"}
    assert set(manifest.files) == on_disk
    for required in ("model.onnx", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert required in manifest.files
    tok_config = json.loads((tiny_artifacts / variant / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    assert manifest.extra["num_layers"] == 2
    quant = manifest.quantization
    if variant == "int4":
        assert quant["method"] == "MatMulNBits"
        assert (quant["bits"], quant["block_size"], quant["accuracy_level"]) == (4, 128, 4)
    if variant == "int8":
        assert quant["method"] == "rowwise_dynamic_int8"
        assert quant["exact"] is True
    assert manifest.parity["checked"] is True
    assert manifest.parity["prompts"] >= 4


def test_default_variant_and_resolution(tiny_artifacts: Path) -> None:
    assert (tiny_artifacts / "default").read_text().strip() == "int8"
    assert resolve_variant_dir(tiny_artifacts, None) == tiny_artifacts / "int8"
    (tiny_artifacts / "default").unlink()  # the session copy: fall back to the documented order
    assert resolve_variant_dir(tiny_artifacts, None) == tiny_artifacts / "int8"
    (tiny_artifacts / "default").write_text("int8\n")
    assert resolve_variant_dir(tiny_artifacts, "fp32") == tiny_artifacts / "fp32"
    assert resolve_variant_dir(tiny_artifacts / "int8", None) == tiny_artifacts / "int8"
    with pytest.raises(ArtifactError, match="available: fp16, fp32, int4, int8"):
        resolve_variant_dir(tiny_artifacts, "int3")
    with pytest.raises(ArtifactError, match="is the 'int8' variant"):
        resolve_variant_dir(tiny_artifacts / "int8", "int4")
    with pytest.raises(ArtifactError, match="make export"):
        resolve_variant_dir(tiny_artifacts.parent / "nothing-here", None)


@pytest.fixture
def int4_copy(tiny_artifacts: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_artifacts / "int4", tmp_path / "tiny" / "int4"))


def test_tampered_weights_are_refused_naming_the_file(int4_copy: Path) -> None:
    data = int4_copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"model\.onnx\.data: sha256 .* does not match"):
        load_artifact(int4_copy)
    load_artifact(int4_copy, verify_hashes=False)  # explicit opt-out only skips hashing


def test_tampered_tokenizer_and_missing_files_are_refused(int4_copy: Path) -> None:
    with (int4_copy / "tokenizer_config.json").open("a") as handle:
        handle.write(" ")
    with pytest.raises(ArtifactError, match=r"tokenizer_config\.json: sha256"):
        load_artifact(int4_copy)
    (int4_copy / "tokenizer_config.json").unlink()
    with pytest.raises(ArtifactError, match=r"tokenizer_config\.json: listed in the manifest but"):
        load_artifact(int4_copy, verify_hashes=False)


def test_missing_or_broken_manifest_says_to_run_make_export(int4_copy: Path) -> None:
    manifest = int4_copy / "manifest.json"
    manifest.write_text("{not json")
    with pytest.raises(ArtifactError, match=r"not a valid grpc-router manifest.*make export"):
        load_artifact(int4_copy)
    manifest.unlink()
    with pytest.raises(ArtifactError, match=r"no manifest\.json.*make export"):
        load_artifact(int4_copy)
    assert list_variants(int4_copy.parent) == []


def _manifest_fields(variant: str) -> dict[str, object]:
    return {
        "kind": "decoder",
        "name": "t",
        "source": {"id": "test"},
        "variant": variant,
        "model_file": "model.onnx",
        "opset": 18,
        "inputs": ["input_ids"],
        "outputs": ["logits"],
    }


def test_builder_replaces_only_on_success(tmp_path: Path) -> None:
    final = tmp_path / "t" / "v"
    with ArtifactBuilder(final) as builder:
        (builder.tmp / "model.onnx").write_text("first")
        builder.write_manifest(**_manifest_fields("v"))
    assert load_artifact(final).files["model.onnx"]
    with pytest.raises(RuntimeError, match="boom"), ArtifactBuilder(final) as builder:
        (builder.tmp / "model.onnx").write_text("second")
        raise RuntimeError("boom")
    assert (final / "model.onnx").read_text() == "first"
    with pytest.raises(ArtifactError, match="without write_manifest"), ArtifactBuilder(final) as b:
        (b.tmp / "model.onnx").write_text("third")
    assert (final / "model.onnx").read_text() == "first"
    assert sorted(p.name for p in final.parent.iterdir()) == ["v"]
    with ArtifactBuilder(final) as builder:
        (builder.tmp / "model.onnx").write_text("fourth")
        manifest = builder.write_manifest(**_manifest_fields("v"))
    assert isinstance(manifest, Manifest)
    assert (final / "model.onnx").read_text() == "fourth"
    assert sorted(p.name for p in final.parent.iterdir()) == ["v"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_recovers_from_a_kill_between_the_two_renames(tmp_path: Path) -> None:
    final = tmp_path / "t" / "v"
    with ArtifactBuilder(final) as builder:
        (builder.tmp / "model.onnx").write_text("old")
        builder.write_manifest(**_manifest_fields("v"))
    pid = _dead_pid()
    # A killed commit: old artifact moved aside, new one not yet renamed into place.
    final.rename(final.parent / f".old-v-{pid}-abcd")
    (final.parent / f".tmp-v-{pid}-abcd").mkdir()
    recover_leftovers(final)
    assert load_artifact(final).variant == "v"
    assert sorted(p.name for p in final.parent.iterdir()) == ["v"]
