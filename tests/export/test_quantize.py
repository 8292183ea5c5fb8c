"""Row-wise int8 streams weights from external data and gives the same graph either way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from export.fuse import fuse_attention_file
from export.parity import GraphRunner
from export.quantize import all_tensors, quantize_rowwise_int8


def test_external_data_input_gives_the_same_int8_model(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    fp32 = tiny_artifacts / "fp32" / "model.onnx"
    external = tmp_path / "external" / "model.onnx"
    external.parent.mkdir()
    # Every tensor, Constant values included (as Optimum writes a >2 GB model), in one file.
    onnx.save_model(
        onnx.load(str(fp32)),
        str(external),
        save_as_external_data=True,
        location="model.onnx_data",
        size_threshold=0,
        convert_attribute=True,
    )
    graph = onnx.load(str(external), load_external_data=False).graph
    constants = [a.t for n in graph.node for a in n.attribute if a.HasField("t")]
    assert constants and all(t.data_location == onnx.TensorProto.EXTERNAL for t in constants)
    count = quantize_rowwise_int8(external, tmp_path / "q" / "model.onnx")
    assert count == 15  # 2 layers x 7 projections + lm_head
    graph = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMulIntegerToFloat" for n in graph.node) == count
    # The shipped variant also has its attention fused (export/fuse.py): do the same here.
    config = json.loads((tiny_artifacts / "int8" / "config.json").read_text())
    assert fuse_attention_file(tmp_path / "q" / "model.onnx", config) == 1  # not the last
    ours = GraphRunner(tmp_path / "q" / "model.onnx")
    shipped = GraphRunner(tiny_artifacts / "int8" / "model.onnx")
    # Ids within the fixture's own vocabulary, whichever tokenizer it was built with.
    ids = np.random.default_rng(1).integers(0, config["vocab_size"], (1, 33))
    mask, pos = np.ones_like(ids), np.arange(33)[None]
    assert np.array_equal(ours.run(ids, mask, pos)[0], shipped.run(ids, mask, pos)[0])
    # Nothing may point at the fp32 model's data file any more.
    written = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False)
    locations = {
        e.value
        for t in all_tensors(written.graph)
        for e in t[0].external_data
        if e.key == "location"
    }
    assert locations == {"model.onnx.data"}
