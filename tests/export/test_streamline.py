"""The serving rewrites of the decoder graph keep its numbers and its Optimum interface."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.decoder_variants import export_fp32
from export.parity import GraphRunner
from export.streamline import VERSION, streamline, streamline_file
from grpc_router.engines.arch_router.graph import KEEP_INPUT, KEEP_META


def _session(path: Path) -> ort.InferenceSession:
    return GraphRunner(path).session


def _feed(session: ort.InferenceSession, ids: np.ndarray, mask: np.ndarray) -> dict[str, object]:
    """Right- or left-padded rows from position 0, with an empty past."""
    past = next(i for i in session.get_inputs() if i.name == "past_key_values.0.key")
    empty = np.zeros((ids.shape[0], int(past.shape[1]), 0, int(past.shape[3])), np.float32)
    names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": np.maximum(np.cumsum(mask, axis=1) - 1, 0),
        **dict.fromkeys(names, empty),
    }


@pytest.fixture(scope="module")
def raw_and_streamlined(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[
    Path, Path, dict[str, object]
]:  # fmt: skip
    root = tmp_path_factory.mktemp("streamline")
    raw = export_fp32(tiny_checkpoint, root / "raw")
    (root / "streamlined").mkdir()
    for item in raw.parent.iterdir():
        shutil.copy(item, root / "streamlined" / item.name)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    report = streamline_file(root / "streamlined" / raw.name, config).as_dict()
    return raw, root / "streamlined" / raw.name, report


Streamlined = tuple[Path, Path, dict[str, object]]


def test_every_layer_is_rewritten(raw_and_streamlined: Streamlined) -> None:
    raw, new, report = raw_and_streamlined
    assert report == {
        "version": VERSION,
        "nan_guards_removed": 2,
        "mask_biases_shared": 2,
        "heads_grouped": 2,
        "logits_to_keep": True,
        "last_layer_trimmed": True,
        "skipped": [],
    }
    ops = [n.op_type for n in onnx.load(str(new)).graph.node]
    assert "IsNaN" not in ops
    assert len(ops) < len(onnx.load(str(raw)).graph.node)
    onnx.checker.check_model(str(new))


def test_same_logits_and_kv_as_the_optimum_graph(
    raw_and_streamlined: tuple[Path, Path, dict[str, object]],
) -> None:
    raw, new, _ = raw_and_streamlined
    a, b = _session(raw), _session(new)
    ids = np.random.default_rng(0).integers(3, 200, (2, 37)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 30:] = 0  # a right-padded row
    out_a = a.run(None, _feed(a, ids, mask))
    out_b = b.run(None, _feed(b, ids, mask))  # logits_to_keep left at its default: all
    assert out_b[0].shape == out_a[0].shape
    # Grouped heads apply the attention scale once instead of twice: last-bit differences only.
    np.testing.assert_allclose(out_b[0][0], out_a[0][0], rtol=0, atol=2e-5)
    np.testing.assert_allclose(out_b[0][1, :30], out_a[0][1, :30], rtol=0, atol=2e-5)
    for x, y in zip(out_a[1:], out_b[1:], strict=True):  # present KV [batch, heads, seq, dim]
        np.testing.assert_allclose(y[0], x[0], rtol=0, atol=2e-5)
        np.testing.assert_allclose(y[1, :, :30], x[1, :, :30], rtol=0, atol=2e-5)


def test_logits_to_keep_gives_the_last_positions_exactly(
    raw_and_streamlined: tuple[Path, Path, dict[str, object]],
) -> None:
    _, new, _ = raw_and_streamlined
    session = _session(new)
    ids = np.random.default_rng(1).integers(3, 200, (1, 21)).astype(np.int64)
    feed = _feed(session, ids, np.ones_like(ids))
    full = session.run(None, feed)
    for keep in (1, 5, 21):
        part = session.run(None, {**feed, KEEP_INPUT: np.asarray(keep, np.int64)})
        assert part[0].shape == (1, keep, full[0].shape[2])
        assert np.array_equal(part[0], full[0][:, -keep:])
        assert all(np.array_equal(x, y) for x, y in zip(part[1:], full[1:], strict=True))


def test_logits_to_keep_minus_m_gives_each_rows_last_m_tokens(
    raw_and_streamlined: Streamlined,
) -> None:
    """-m: right-padded rows of different lengths each get their own last m real positions
    (-1: a prompt's last token; more: that token and the trie fed after it, in one run)."""
    _, new, _ = raw_and_streamlined
    assert onnx.load(str(new), load_external_data=False).metadata_props[-1].key == KEEP_META
    session = _session(new)
    ids = np.random.default_rng(4).integers(3, 200, (3, 40)).astype(np.int64)
    mask = np.ones_like(ids)
    lengths = (40, 9, 23)
    for row, n in enumerate(lengths):
        mask[row, n:] = 0
    feed = _feed(session, ids, mask)
    full = session.run(None, feed)
    for m in (1, 2, 7):
        kept = session.run(None, {**feed, KEEP_INPUT: np.asarray(-m, np.int64)})
        assert kept[0].shape == (3, m, full[0].shape[2])
        for row, n in enumerate(lengths):
            assert np.array_equal(kept[0][row], full[0][row, n - m : n])
        assert all(np.array_equal(x, y) for x, y in zip(kept[1:], full[1:], strict=True))


def test_a_fully_masked_row_is_finite(
    raw_and_streamlined: tuple[Path, Path, dict[str, object]],
) -> None:
    """Left padding leaves the pad positions nothing to attend to: with a finite bias they
    average instead of turning into NaN that would leak into the real rows' attention."""
    _, new, _ = raw_and_streamlined
    session = _session(new)
    ids = np.random.default_rng(2).integers(3, 200, (2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    logits = session.run(None, _feed(session, ids, mask))[0]
    assert np.isfinite(logits).all()
    alone = session.run(None, _feed(session, ids[1:, 5:], mask[1:, 5:]))[0]
    np.testing.assert_allclose(logits[1, 5:], alone[0], rtol=0, atol=1e-4)


def test_a_graph_without_the_patterns_is_left_alone(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph)
    report = streamline(model, heads=4, kv_heads=2)
    assert report.as_dict()["nan_guards_removed"] == 0
    assert [n.op_type for n in model.graph.node] == ["Relu"]


def test_optimum_still_generates_with_the_shipped_artifact(
    tiny_checkpoint: Path, tiny_artifacts: Path
) -> None:
    """Baseline B and any Optimum user load the artifact as they always did."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 9, 88, 3]])
    ort_model = ORTModelForCausalLM.from_pretrained(
        tiny_artifacts / "fp32", file_name="model.onnx", use_cache=True, use_io_binding=False
    )
    ours = ort_model.generate(ids, max_new_tokens=6, do_sample=False)
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    ref = ref_model.generate(ids, max_new_tokens=6, do_sample=False)
    assert ours.tolist() == ref.tolist()
