"""Row-wise dynamic int8: integer GEMM speed with logits that do not depend on the batch.

`quantize_dynamic` quantizes activations with ONE scale per call (DynamicQuantizeLinear), so a
row's result depends on every other row in the call. Here every MatMul with a constant weight
becomes

    scale_x = max(|x|, axis=-1) / 127                     per row (token), float
    x_q     = QuantizeLinear(x, scale_x, 128, axis=rows)  uint8 (u8 x s8 is the fast GEMM)
    y       = MatMulIntegerToFloat(x_q, w_q, 1, scale_w, 128) * scale_x

with `w_q` int8 and `scale_w` per output column (symmetric, no zero points). Each row's
quantization only sees that row, and the int32 accumulation is exact whatever the kernel's
tiling, so a row's output is bit-identical alone, padded, batched or after a cached prefix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QMAX = 127.0
# Floor of a row's scale so an all-zero row (padding) quantizes to zeros, not NaN.
MIN_SCALE = 1e-30


def _quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float -> int8 [K, N] and float32 scale [N] (symmetric, per output column)."""
    scale = np.abs(weight).max(axis=0).astype(np.float32) / np.float32(QMAX)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(weight / scale), -QMAX, QMAX).astype(np.int8)
    return q, scale


def rowwise_int8(model: onnx.ModelProto, *, min_weight_elements: int = 0) -> int:
    """Rewrite `model` in place; returns how many MatMuls were quantized."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    shared = {
        "axes": numpy_helper.from_array(np.array([-1], np.int64), "rowwise_q.axes"),
        "flat": numpy_helper.from_array(np.array([-1], np.int64), "rowwise_q.flat"),
        "qmax": numpy_helper.from_array(np.array(QMAX, np.float32), "rowwise_q.qmax"),
        "floor": numpy_helper.from_array(np.array(MIN_SCALE, np.float32), "rowwise_q.floor"),
        "one": numpy_helper.from_array(np.array(1.0, np.float32), "rowwise_q.one"),
        # uint8 activations with zero point 128: onnxruntime's fast integer GEMM is u8 x s8.
        "zp": numpy_helper.from_array(np.array(128, np.uint8), "rowwise_q.zp"),
    }
    new_nodes: list[onnx.NodeProto] = []
    replaced: set[str] = set()
    count = 0
    for node in graph.node:
        weight_name = node.input[1] if node.op_type == "MatMul" else ""
        init = inits.get(weight_name)
        if (
            init is None
            or len(init.dims) != 2
            or init.data_type != TensorProto.FLOAT
            or int(np.prod(init.dims)) < min_weight_elements
        ):
            new_nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        p = f"{node.name or y}/rowwise_q"
        w_q, w_scale = _quantize_weight(numpy_helper.to_array(init))
        graph.initializer.append(numpy_helper.from_array(w_q, f"{p}.w_q"))
        graph.initializer.append(numpy_helper.from_array(w_scale, f"{p}.w_scale"))
        if consumers.get(weight_name, 0) == 1:
            replaced.add(weight_name)
        k = int(init.dims[0])
        shape_2d = numpy_helper.from_array(np.array([-1, k], np.int64), f"{p}.shape2d")
        graph.initializer.append(shape_2d)
        new_nodes += [
            # One scale per row: max |x| over the row / 127 (floored so zero rows stay zero).
            helper.make_node("Abs", [x], [f"{p}.abs"], name=f"{p}/Abs"),
            helper.make_node(
                "ReduceMax",
                [f"{p}.abs", shared["axes"].name],
                [f"{p}.max"],
                keepdims=1,
                name=f"{p}/ReduceMax",
            ),
            helper.make_node("Div", [f"{p}.max", shared["qmax"].name], [f"{p}.s0"], name=f"{p}/S"),
            helper.make_node(
                "Max", [f"{p}.s0", shared["floor"].name], [f"{p}.x_scale"], name=f"{p}/Floor"
            ),
            # Rows flattened to [M, K] so QuantizeLinear's per-axis form applies one scale a row.
            helper.make_node(
                "Reshape", [f"{p}.x_scale", shared["flat"].name], [f"{p}.s1d"], name=f"{p}/S1d"
            ),
            helper.make_node("Shape", [f"{p}.s1d"], [f"{p}.rows"], name=f"{p}/Rows"),
            helper.make_node(
                "Expand", [shared["zp"].name, f"{p}.rows"], [f"{p}.zp1d"], name=f"{p}/Zp"
            ),
            helper.make_node("Reshape", [x, shape_2d.name], [f"{p}.x2d"], name=f"{p}/X2d"),
            helper.make_node(
                "QuantizeLinear",
                [f"{p}.x2d", f"{p}.s1d", f"{p}.zp1d"],
                [f"{p}.xq2d"],
                axis=0,
                name=f"{p}/Q",
            ),
            helper.make_node("Shape", [x], [f"{p}.xshape"], name=f"{p}/XShape"),
            helper.make_node("Reshape", [f"{p}.xq2d", f"{p}.xshape"], [f"{p}.x_q"], name=f"{p}/Xq"),
            # Exact int32 accumulation; the per-column weight scale is applied per element.
            helper.make_node(
                "MatMulIntegerToFloat",
                [f"{p}.x_q", f"{p}.w_q", shared["one"].name, f"{p}.w_scale", shared["zp"].name],
                [f"{p}.yw"],
                domain="com.microsoft",
                name=f"{p}/MatMulIntegerToFloat",
            ),
            helper.make_node("Mul", [f"{p}.yw", f"{p}.x_scale"], [y], name=f"{p}/MulX"),
        ]
        count += 1
    if count:
        graph.initializer.extend(shared.values())
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    kept = [init for init in graph.initializer if init.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return count


def quantize_rowwise_int8(fp32_model: Path, out_path: Path) -> int:
    """Load the fp32 graph, rewrite its weight MatMuls, save with external data."""
    from export.decoder import save_model

    model = onnx.load(str(fp32_model))
    count = rowwise_int8(model)
    save_model(model, out_path)
    return count
