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

A row's quantization does not change when the row is scaled, so where a product only reaches
the next quantized MatMul through an element-wise Mul (the MLP's up projection: `act(gate) *
up` -> down), its `* scale_x` moves to that MatMul's output as one factor per row: a pass over
a [tokens, intermediate] tensor less per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

QMAX = 127.0
# Floor of a row's scale so an all-zero row (padding) quantizes to zeros, not NaN.
MIN_SCALE = 1e-30
# Weights are read and quantized this many bytes of float32 at a time (memory stays flat).
CHUNK_BYTES = 64 << 20
INLINE_MAX_BYTES = 1024
DATA_ALIGN = 4096  # external data offsets page-aligned so onnxruntime can map them
_DATA_FIELDS = (
    "raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
    "string_data",
)  # fmt: skip


class TensorSource:
    """Reads initializers of a graph loaded without its external data, one at a time."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        if tensor.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        info = {entry.key: entry.value for entry in tensor.external_data}
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.memmap(
            self.base_dir / info["location"],
            dtype=dtype,
            mode="r",
            offset=int(info.get("offset", 0)),
            shape=tuple(tensor.dims),
        )


def _row_chunks(weight: np.ndarray) -> Iterator[np.ndarray]:
    rows = max(1, CHUNK_BYTES // max(1, weight.shape[1] * 4))
    for start in range(0, weight.shape[0], rows):
        yield np.asarray(weight[start : start + rows], dtype=np.float32)


def column_scales(weight: np.ndarray) -> np.ndarray:
    """Symmetric int8 scale per output column of a [K, N] weight (streamed over rows)."""
    peak = np.zeros(weight.shape[1], np.float32)
    for chunk in _row_chunks(weight):
        np.maximum(peak, np.abs(chunk).max(axis=0), out=peak)
    scale = peak / np.float32(QMAX)
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def quantized_chunks(weight: np.ndarray, scale: np.ndarray) -> Iterator[bytes]:
    for chunk in _row_chunks(weight):
        yield np.clip(np.rint(chunk / scale), -QMAX, QMAX).astype(np.int8).tobytes()


def _placeholder(name: str, data_type: int, dims: Sequence[int]) -> onnx.TensorProto:
    tensor = onnx.TensorProto()
    tensor.name, tensor.data_type = name, data_type
    tensor.dims.extend(dims)
    return tensor


def rowwise_int8(model: onnx.ModelProto, *, min_weight_elements: int = 0) -> dict[str, str]:
    """Rewrite `model`'s graph in place. The new `<w>.w_q` / `<w>.w_scale` initializers are
    left empty; returns {new initializer name: fp32 weight name} for `write_weights` to fill."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}

    def eligible(node: onnx.NodeProto) -> bool:
        init = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        return (
            init is not None
            and len(init.dims) == 2
            and init.data_type == TensorProto.FLOAT
            and int(np.prod(init.dims)) >= min_weight_elements
        )

    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    shared = _shared_constants()
    deferred = _deferred_row_scales(graph, eligible)
    row_scale: dict[str, str] = {}  # MatMul output -> its x_scale
    new_nodes: list[onnx.NodeProto] = []
    replaced: set[str] = set()
    plan: dict[str, str] = {}
    for node in graph.node:
        if not eligible(node):
            new_nodes.append(node)
            continue
        weight_name = node.input[1]
        init = inits[weight_name]
        x, y = node.input[0], node.output[0]
        p = f"{node.name or y}/rowwise_q"
        row_scale[y] = f"{p}.x_scale"
        shape_2d = _plan_weight(graph, p, init, plan)
        if consumers.get(weight_name, 0) == 1:
            replaced.add(weight_name)
        new_nodes += _quantize_rows(p, x, shape_2d, shared)
        new_nodes += _integer_matmul(p, y, shared, deferred, row_scale)
    if row_scale:
        graph.initializer.extend(shared.values())
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    for index in reversed(range(len(graph.initializer))):  # in place: no copies of weights
        if graph.initializer[index].name in replaced:
            del graph.initializer[index]
    del graph.node[:]
    graph.node.extend(new_nodes)
    return plan


def _shared_constants() -> dict[str, onnx.TensorProto]:
    """The scalars and axes every quantized MatMul reads (added once, if any is quantized)."""
    return {
        "axes": numpy_helper.from_array(np.array([-1], np.int64), "rowwise_q.axes"),
        "flat": numpy_helper.from_array(np.array([-1], np.int64), "rowwise_q.flat"),
        "qmax": numpy_helper.from_array(np.array(QMAX, np.float32), "rowwise_q.qmax"),
        "floor": numpy_helper.from_array(np.array(MIN_SCALE, np.float32), "rowwise_q.floor"),
        "one": numpy_helper.from_array(np.array(1.0, np.float32), "rowwise_q.one"),
        # uint8 activations with zero point 128: onnxruntime's fast integer GEMM is u8 x s8.
        "zp": numpy_helper.from_array(np.array(128, np.uint8), "rowwise_q.zp"),
    }


def _deferred_row_scales(
    graph: onnx.GraphProto, eligible: Callable[[onnx.NodeProto], bool]
) -> dict[str, str]:
    """{second MatMul output: first MatMul output} where the first one's output only reaches
    the second as its x through one element-wise Mul: the second's output then takes the first
    one's row scale too, and the first one's output is left unscaled."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    deferred: dict[str, str] = {}
    for node in graph.node:
        if not eligible(node):
            continue
        (mul, *more) = readers.get(node.output[0], [None])
        if more or mul is None or mul.op_type != "Mul":
            continue
        (nxt, *more) = readers.get(mul.output[0], [None])
        if not more and nxt is not None and eligible(nxt) and nxt.input[0] == mul.output[0]:
            deferred[nxt.output[0]] = node.output[0]
    return deferred


def _plan_weight(
    graph: onnx.GraphProto, p: str, init: onnx.TensorProto, plan: dict[str, str]
) -> str:
    """Add the empty int8 weight and column scale initializers of the MatMul named `p`, and the
    [-1, K] shape its rows are flattened to; returns that shape's name."""
    graph.initializer.append(_placeholder(f"{p}.w_q", TensorProto.INT8, init.dims))
    graph.initializer.append(_placeholder(f"{p}.w_scale", TensorProto.FLOAT, init.dims[1:]))
    plan[f"{p}.w_q"] = plan[f"{p}.w_scale"] = init.name
    k = int(init.dims[0])
    shape_2d = numpy_helper.from_array(np.array([-1, k], np.int64), f"{p}.shape2d")
    graph.initializer.append(shape_2d)
    return shape_2d.name


def _quantize_rows(
    p: str, x: str, shape_2d: str, shared: dict[str, onnx.TensorProto]
) -> list[onnx.NodeProto]:
    """x -> `{p}.x_q` (uint8, x's shape) and `{p}.x_scale` (one scale per row)."""
    return [
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
        helper.make_node("Expand", [shared["zp"].name, f"{p}.rows"], [f"{p}.zp1d"], name=f"{p}/Zp"),
        helper.make_node("Reshape", [x, shape_2d], [f"{p}.x2d"], name=f"{p}/X2d"),
        helper.make_node(
            "QuantizeLinear",
            [f"{p}.x2d", f"{p}.s1d", f"{p}.zp1d"],
            [f"{p}.xq2d"],
            axis=0,
            name=f"{p}/Q",
        ),
        helper.make_node("Shape", [x], [f"{p}.xshape"], name=f"{p}/XShape"),
        helper.make_node("Reshape", [f"{p}.xq2d", f"{p}.xshape"], [f"{p}.x_q"], name=f"{p}/Xq"),
    ]


def _integer_matmul(
    p: str,
    y: str,
    shared: dict[str, onnx.TensorProto],
    deferred: dict[str, str],
    row_scale: dict[str, str],
) -> list[onnx.NodeProto]:
    """`{p}.x_q` x `{p}.w_q` -> y: exact int32 accumulation, the per-column weight scale applied
    per element, then the row scale (this MatMul's own, none when it is deferred to the next
    MatMul, or its own times the deferred one)."""
    integer = helper.make_node(
        "MatMulIntegerToFloat",
        [f"{p}.x_q", f"{p}.w_q", shared["one"].name, f"{p}.w_scale", shared["zp"].name],
        [f"{p}.yw"],
        domain="com.microsoft",
        name=f"{p}/MatMulIntegerToFloat",
    )
    if y in deferred.values():  # its row scale is applied after the next MatMul
        integer.output[0] = y
        return [integer]
    if y in deferred:
        return [
            integer,
            helper.make_node(
                "Mul", [f"{p}.x_scale", row_scale[deferred[y]]], [f"{p}.x_scale2"],
                name=f"{p}/Scale2",
            ),
            helper.make_node("Mul", [f"{p}.yw", f"{p}.x_scale2"], [y], name=f"{p}/MulX"),
        ]  # fmt: skip
    return [integer, helper.make_node("Mul", [f"{p}.yw", f"{p}.x_scale"], [y], name=f"{p}/MulX")]


def write_aligned(handle: BinaryIO, pieces: Iterator[bytes]) -> tuple[int, int]:
    """Write `pieces` at the next DATA_ALIGN boundary from the handle's position; returns
    (offset, length) for the tensor's external data entries."""
    offset = -handle.tell() % DATA_ALIGN + handle.tell()
    handle.seek(offset)
    length = 0
    for piece in pieces:
        handle.write(piece)
        length += len(piece)
    return offset, length


def point_to_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make `tensor` read its bytes from `location` (beside the graph) at `offset`, its inline
    data dropped."""
    for field in _DATA_FIELDS:
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def all_tensors(
    graph: onnx.GraphProto, *, top: bool = True
) -> Iterator[tuple[onnx.TensorProto, bool]]:
    """(tensor, is a top-level initializer) for initializers and tensor attributes (Constant
    values), subgraphs included."""
    for tensor in graph.initializer:
        yield tensor, top
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t, False
            for tensor in attr.tensors:
                yield tensor, False
            for sub in (attr.g, *attr.graphs) if attr.HasField("g") else attr.graphs:
                yield from all_tensors(sub, top=False)


def write_weights(
    model: onnx.ModelProto, source: TensorSource, originals: dict[str, onnx.TensorProto],
    plan: dict[str, str], data_path: Path,
) -> None:  # fmt: skip
    """Fill the planned int8 weights and move every sizeable initializer into `data_path`,
    one tensor at a time."""
    scales: dict[str, np.ndarray] = {}
    with data_path.open("wb") as handle:
        for tensor, initializer in all_tensors(model.graph):
            external = tensor.data_location == TensorProto.EXTERNAL
            if initializer and tensor.name in plan:
                weight = source.array(originals[plan[tensor.name]])
                if plan[tensor.name] not in scales:
                    scales[plan[tensor.name]] = column_scales(weight)
                scale = scales[plan[tensor.name]]
                if tensor.data_type == TensorProto.INT8:
                    pieces = quantized_chunks(weight, scale)
                else:
                    pieces = iter([scale.tobytes()])
            elif external or initializer:
                array = source.array(tensor)
                if array.nbytes <= INLINE_MAX_BYTES:
                    if external:  # small ones inline: shape inference needs their values
                        raw = np.ascontiguousarray(array).tobytes()
                        del tensor.external_data[:]
                        tensor.data_location = TensorProto.DEFAULT
                        tensor.raw_data = raw
                    continue
                pieces = (chunk.tobytes() for chunk in np.array_split(array.reshape(-1), 64))
            else:
                continue  # inline attribute tensors stay inline
            offset, length = write_aligned(handle, pieces)
            point_to_external(tensor, data_path.name, offset, length)


def quantize_rowwise_int8(fp32_model: Path, out_path: Path) -> int:
    """Rewrite the fp32 graph with row-wise int8 MatMuls, streaming its weights from disk (peak
    memory: one chunk, not the model); returns the number of weights quantized."""
    model = onnx.load(str(fp32_model), load_external_data=False)
    originals: dict[str, onnx.TensorProto] = {}
    for tensor in model.graph.initializer:  # rowwise_int8 drops these from the graph
        if len(tensor.dims) == 2 and tensor.data_type == TensorProto.FLOAT:
            originals[tensor.name] = onnx.TensorProto()
            originals[tensor.name].CopyFrom(tensor)
    plan = rowwise_int8(model)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data_path = out_path.with_name(out_path.name + ".data")
    write_weights(model, TensorSource(fp32_model.parent), originals, plan, data_path)
    onnx.save(model, str(out_path))
    return len(set(plan.values()))
