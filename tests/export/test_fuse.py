"""Fused attention (export/fuse.py): the same numbers as the plain operators, on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.decoder_variants import QuantSettings, build_variant
from export.fuse import FUSED_ROTARY, attention_kind, fuse_attention_file
from grpc_router.engines.arch_router.graph import ATTENTION_META, FUSED_ATTENTION
from grpc_router.engines.arch_router.prefill import prompt_rows
from grpc_router.engines.arch_router.prompt import PromptBuilder
from grpc_router.engines.arch_router.runtime import DecoderSession
from grpc_router.engines.arch_router.trie import Trie
from grpc_router.engines.artifact import read_manifest
from tests.engine.test_decoder import MESSAGES, ROUTES, packed_trie_logits


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.fixture(scope="module")
def fused_fp32(tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny fp32 variant with its attention fused (weights exact: only the attention
    kernel differs from the plain graph)."""
    out = tmp_path_factory.mktemp("fused") / "fp32"
    shutil.copytree(tiny_artifacts / "fp32", out)
    config = json.loads((out / "config.json").read_text())
    assert fuse_attention_file(out / "model.onnx", config) == config["num_hidden_layers"] - 1
    return out


def test_the_int8_variant_ships_fused_and_the_others_do_not(tiny_artifacts: Path) -> None:
    config = json.loads((tiny_artifacts / "int8" / "config.json").read_text())
    ops = _ops(tiny_artifacts / "int8" / "model.onnx")
    # Every layer but the last, whose queries are cut to the kept rows (streamline).
    assert ops.count(FUSED_ATTENTION) == config["num_hidden_layers"] - 1
    assert read_manifest(tiny_artifacts / "int8").extra["attention"] == FUSED_ROTARY
    graph = onnx.load(str(tiny_artifacts / "int8" / "model.onnx"), load_external_data=False).graph
    fused = [n for n in graph.node if n.op_type == FUSED_ATTENTION]
    # The node rotates q and k itself, from position_ids, reading the projections directly.
    assert all(("do_rotary", 1) in {(a.name, a.i) for a in n.attribute} for n in fused)
    assert all(n.input[9] == "position_ids" for n in fused)
    for variant in ("int4", "fp16", "fp32"):
        assert FUSED_ATTENTION not in _ops(tiny_artifacts / variant / "model.onnx")
        assert read_manifest(tiny_artifacts / variant).extra["attention"] == "plain operators"
    assert DecoderSession(tiny_artifacts / "int8" / "model.onnx").one_row_prefill
    assert not DecoderSession(tiny_artifacts / "int4" / "model.onnx").one_row_prefill


def test_fused_attention_gives_the_plain_graphs_logits(
    tiny_artifacts: Path, fused_fp32: Path
) -> None:
    plain = DecoderSession(tiny_artifacts / "fp32" / "model.onnx")
    fused = DecoderSession(fused_fp32 / "model.onnx")
    assert fused.one_row_prefill and not plain.one_row_prefill
    prompt = PromptBuilder.from_dir(fused_fp32).build(MESSAGES, ROUTES, budget=2048)
    ids = np.asarray([prompt.ids])
    n = ids.shape[1]
    args = (ids, np.ones((1, n), np.int64), np.arange(n)[None])
    a, b = plain.run(*args, plain.empty_past(1)), fused.run(*args, fused.empty_past(1))
    np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-5)
    for x, y in zip(a.present, b.present, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
    # After a cached prefix, right-padded to the engine's alignment, and a trie in one run
    # under the 4-D tree mask: the paths the engine takes.
    trie = Trie({"a": (7, 9, 11, 3), "b": (7, 9, 12, 3), "c": (8, 3)})
    for x, y in zip(_engine_path(plain, prompt.ids, trie), _engine_path(fused, prompt.ids, trie),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)


def _engine_path(session: DecoderSession, ids: tuple[int, ...], trie: Trie) -> list[np.ndarray]:
    half = len(ids) // 2
    _, (pre,) = prompt_rows(session, session.empty_past(1), 0, [ids[:half]])
    (last,), (rows,) = prompt_rows(session, pre.past, half, [ids[half:]])
    return [last, *packed_trie_logits(session, trie, rows, last).values()]


def test_fused_graph_is_exact_under_a_cached_prefix(fused_fp32: Path) -> None:
    """The kernel's softmax spans each query's causal window: a cached prefix cut where the
    engine cuts it (whole 16-row tiles, the suffix padded to them) changes no bit."""
    session = DecoderSession(fused_fp32 / "model.onnx")
    prompt = PromptBuilder.from_dir(fused_fp32).build(MESSAGES, ROUTES, budget=2048)
    (full,), (full_rows,) = prompt_rows(session, session.empty_past(1), 0, [prompt.ids])
    for cut in (16, 32, len(prompt.ids) // 2 // 16 * 16):
        _, (pre,) = prompt_rows(session, session.empty_past(1), 0, [prompt.ids[:cut]])
        (last,), (rows,) = prompt_rows(session, pre.past, cut, [prompt.ids[cut:]])
        assert np.array_equal(full, last)
        for x, y in zip(full_rows.past, rows.past, strict=True):
            assert np.array_equal(x, y)


def test_plain_attention_is_kept_when_asked(tiny_artifacts: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_artifacts / "fp32" / "config.json").read_text())
    fp32 = tiny_artifacts / "fp32" / "model.onnx"
    plain = build_variant("int8", fp32, tmp_path, QuantSettings(fused_attention=False), config)
    assert FUSED_ATTENTION not in _ops(plain) and attention_kind(plain) == "plain operators"
    meta = {p.key: p.value for p in onnx.load(str(plain), load_external_data=False).metadata_props}
    assert ATTENTION_META not in meta
