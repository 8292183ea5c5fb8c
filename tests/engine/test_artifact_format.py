"""One artifact generation: an older decoder artifact is refused with what to do about it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from grpc_router.engines.arch_router.graph import KEEP_META
from grpc_router.engines.arch_router.runtime import DecoderSession
from grpc_router.engines.artifact import FORMAT_VERSION, MANIFEST_NAME, load_artifact
from grpc_router.errors import ArtifactError


def _copy(tiny_artifacts: Path, tmp_path: Path) -> Path:
    variant = tmp_path / "int8"
    shutil.copytree(tiny_artifacts / "int8", variant)
    return variant


def test_the_manifest_carries_the_current_format(tiny_artifacts: Path) -> None:
    assert load_artifact(tiny_artifacts / "int8").format_version == FORMAT_VERSION


def test_an_older_decoder_manifest_is_refused(tiny_artifacts: Path, tmp_path: Path) -> None:
    variant = _copy(tiny_artifacts, tmp_path)
    path = variant / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"re-export it with `make export`"):
        load_artifact(variant)


def test_a_graph_without_the_trie_inputs_is_refused(tiny_artifacts: Path, tmp_path: Path) -> None:
    """A graph whose `logits_to_keep` reads -m as the last token only (the older exporter's)
    cannot feed a trie in the prompt's run: the session says to re-export it."""
    variant = _copy(tiny_artifacts, tmp_path)
    model_file = variant / "model.onnx"
    model = onnx.load(str(model_file), load_external_data=False)
    kept = [p for p in model.metadata_props if p.key != KEEP_META]
    assert len(kept) < len(model.metadata_props)
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(model_file))
    with pytest.raises(ArtifactError, match=r"re-export it with `make export`"):
        DecoderSession(model_file, provider="cpu")
