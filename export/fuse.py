"""Fused attention for the CPU variant: each layer's attention as one GroupQueryAttention node.

After `streamline`, a layer's attention is still ~12 nodes (KV concat, transposes, two grouped
matmuls, bias add, softmax, reshapes) that each pass over a [heads, seq, past+seq] float tensor.
onnxruntime's CPU kernel for com.microsoft.GroupQueryAttention does the same maths per head, in
cache, and writes the present KV itself. Measured on the 1.5B shapes (int8, 425 tokens after
727 cached, 2 threads): one layer's attention 19.8 -> 15.9 ms, the whole prefill about -12%.

What stays the same: rotary stays in the graph (positions come from position_ids as before),
the query/key scales fold into the node's `scale`, and the shared bias (causal, padding and
the caller's attention_mask_4d) is the node's attention_bias. `seqlens_k` is every row's full
width, so the node's own causal window never hides a key the bias allows (right padding is
masked by the bias, as before). The layer whose queries are cut to the kept rows stays as it is.

The cost: the kernel refuses a batch of more than one row with a past and more than one new
token, so a graph with this fusion is marked (metadata `grpc_router.attention`) and the engine
prefills one request per run. On 2 cores that is what it measured fastest anyway.

The fp16 (GPU) variant keeps the operators: fused the same way, it ran correctly on an H200
(same routes; CUDA's kernel takes the tree-mask bias), but its warm decisions were not faster
than the unfused graph's in earlier runs there (19.4 ms against 15.8-21.1 ms, scores off;
44.2 ms against 34.0 ms with scores), so there is no measured reason to switch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.streamline import _PREFIX, BIAS, _Graph, _perm, _prune

ATTENTION_META = "grpc_router.attention"
FUSED = "GroupQueryAttention"
SEQLENS, TOTAL = f"{_PREFIX}.gqa.seqlens_k", f"{_PREFIX}.gqa.total"
_BSH = f"{_PREFIX}.gqa.bsh"


def _only_reader(g: _Graph, name: str, op: str) -> onnx.NodeProto | None:
    readers = g.consumers.get(name, [])
    if len(readers) != 1 or readers[0].op_type != op:
        return None
    return readers[0]


def _scalar(g: _Graph, node: onnx.NodeProto) -> tuple[str, float] | None:
    """(the other input, the constant) of a Mul by a scalar constant."""
    for slot in (0, 1):
        value = g.constant(node.input[1 - slot])
        if value is not None and value.size == 1:
            return node.input[slot], float(value.reshape(()))
    return None


def _softmax_last_axis(node: onnx.NodeProto) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    return axis in (-1, 3)


@dataclass
class _Layer:
    """One layer's streamlined attention: what the fused node reads, and what it replaces."""

    index: int
    query: str  # rotated queries [batch, heads, seq, dim], before their scale
    key: str  # new keys and values [batch, kv_heads, seq, dim]
    value: str
    scale: float  # the query scale times the key scale
    anchor: onnx.NodeProto  # the old AV matmul: the fused node goes in front of it
    replaced: tuple[onnx.NodeProto, ...]  # producers of the names the fused node now writes
    output: str  # [batch, seq, heads * dim]

    def nodes(self, heads: int, kv_heads: int) -> list[onnx.NodeProto]:
        p = f"/{_PREFIX}/fused{self.index}"
        made: list[onnx.NodeProto] = []
        for part, source in (("q", self.query), ("k", self.key), ("v", self.value)):
            # [batch, heads, seq, dim] -> [batch, seq, heads * dim], the node's layout
            t, packed = f"{p}.{part}t", f"{p}.{part}"
            made += [
                helper.make_node("Transpose", [source], [t], perm=[0, 2, 1, 3], name=f"{t}/T"),
                helper.make_node("Reshape", [t, _BSH], [packed], name=f"{packed}/R"),
            ]
        i = self.index
        made.append(
            helper.make_node(
                FUSED,
                [f"{p}.q", f"{p}.k", f"{p}.v", f"past_key_values.{i}.key",
                 f"past_key_values.{i}.value", SEQLENS, TOTAL, "", "", "", BIAS],
                [self.output, f"present.{i}.key", f"present.{i}.value"],
                domain="com.microsoft", name=f"{p}/{FUSED}",
                num_heads=heads, kv_num_heads=kv_heads, scale=self.scale,
            )
        )  # fmt: skip
        return made


def _match(g: _Graph, i: int) -> _Layer | None:
    """Layer i's attention as `streamline` leaves it, or None where it looks different."""
    key, value = f"present.{i}.key", f"present.{i}.value"
    concats = []
    for name, past in ((key, f"past_key_values.{i}.key"), (value, f"past_key_values.{i}.value")):
        concat = g.producer.get(name)
        if concat is None or concat.op_type != "Concat" or list(concat.input)[:1] != [past]:
            return None
        if len(concat.input) != 2:
            return None
        concats.append(concat)
    kt = _only_reader(g, key, "Transpose")
    if kt is None or _perm(kt) != [0, 1, 3, 2]:
        return None
    mul_k = _only_reader(g, kt.output[0], "Mul")
    k_scale = _scalar(g, mul_k) if mul_k else None
    qk = _only_reader(g, mul_k.output[0], "MatMul") if mul_k else None
    if mul_k is None or k_scale is None or qk is None or qk.input[1] != mul_k.output[0]:
        return None
    group_q = g.producer.get(qk.input[0])
    mul_q = g.producer.get(group_q.input[0]) if group_q and group_q.op_type == "Reshape" else None
    q_scale = _scalar(g, mul_q) if mul_q and mul_q.op_type == "Mul" else None
    if q_scale is None:
        return None
    chain: list[onnx.NodeProto] = []
    name = qk.output[0]
    for op in ("Reshape", "Add", "Softmax", "Reshape", "MatMul", "Reshape", "Transpose", "Reshape"):
        node = _only_reader(g, name, op)
        if node is None:
            return None
        chain.append(node)
        name = node.output[0]
    add, softmax, av, transpose, out = chain[1], chain[2], chain[4], chain[6], chain[7]
    if (
        BIAS not in add.input  # the last layer's bias is cut to the kept rows: left alone
        or not _softmax_last_axis(softmax)
        or av.input[1] != value
        or g.consumers.get(value, []) != [av]
        or _perm(transpose) != [0, 2, 1, 3]
    ):
        return None
    return _Layer(
        index=i,
        query=q_scale[0],
        key=concats[0].input[1],
        value=concats[1].input[1],
        scale=q_scale[1] * k_scale[1],
        anchor=av,
        replaced=(concats[0], concats[1], out),
        output=out.output[0],
    )


def _lengths() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """seqlens_k = width - 1 for every row (int32 [batch]) and total = width (int32 scalar)."""
    p = f"/{_PREFIX}/gqa"
    consts = {
        "zero": np.array(0, np.int64),
        "one": np.array(1, np.int64),
        "axis0": np.array([0], np.int64),
    }
    names = {k: f"{_PREFIX}.gqa.{k}" for k in consts}
    inits = [numpy_helper.from_array(v, names[k]) for k, v in consts.items()]
    inits.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), _BSH))
    nodes = [
        helper.make_node("Shape", ["attention_mask"], [f"{p}.shape"], name=f"{p}/Shape"),
        helper.make_node("Gather", [f"{p}.shape", names["one"]], [f"{p}.width"], axis=0,
                         name=f"{p}/Width"),
        helper.make_node("Gather", [f"{p}.shape", names["zero"]], [f"{p}.batch"], axis=0,
                         name=f"{p}/Batch"),
        helper.make_node("Cast", [f"{p}.width"], [TOTAL], to=TensorProto.INT32, name=f"{p}/Total"),
        helper.make_node("Sub", [f"{p}.width", names["one"]], [f"{p}.last"], name=f"{p}/Last"),
        helper.make_node("Unsqueeze", [f"{p}.batch", names["axis0"]], [f"{p}.batch1"],
                         name=f"{p}/Batch1"),
        helper.make_node("Expand", [f"{p}.last", f"{p}.batch1"], [f"{p}.rows"], name=f"{p}/Rows"),
        helper.make_node("Cast", [f"{p}.rows"], [SEQLENS], to=TensorProto.INT32,
                         name=f"{p}/Seqlens"),
    ]  # fmt: skip
    return nodes, inits


def fuse_attention(model: onnx.ModelProto, *, heads: int, kv_heads: int) -> int:
    """Rewrite `model` in place; returns how many layers were fused (0: left unchanged)."""
    if heads % kv_heads:
        return 0
    g = _Graph(model.graph)
    layers = []
    i = 0
    while f"present.{i}.key" in g.producer:
        layer = _match(g, i)
        if layer is not None:
            layers.append(layer)
        i += 1
    if not layers:
        return 0
    nodes, inits = _lengths()
    model.graph.initializer.extend(inits)
    g.insert_before(None, nodes)
    replaced: set[int] = set()
    for layer in layers:
        # Before the old attention's output matmul: its inputs exist there, its readers follow.
        g.insert_before(layer.anchor, layer.nodes(heads, kv_heads))
        for old in layer.replaced:
            g.drop(old)
            replaced.add(id(old))
    g.nodes = [n for n in g.nodes if id(n) not in replaced]
    g.commit()
    _prune(model.graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    meta = {p.key: p for p in model.metadata_props}
    entry = meta.get(ATTENTION_META) or model.metadata_props.add()
    entry.key, entry.value = ATTENTION_META, FUSED
    return len(layers)


def fuse_attention_file(path: Path, config: dict[str, Any]) -> int:
    """Fuse the graph at `path` in place; its weights (external data) are not read."""
    heads = int(config.get("num_attention_heads") or 0)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if not heads or not kv_heads:
        return 0
    model = onnx.load(str(path), load_external_data=False)
    fused = fuse_attention(model, heads=heads, kv_heads=kv_heads)
    if fused:
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    return fused


def attention_kind(path: Path) -> str:
    """What a built graph's attention is: FUSED, or plain operators."""
    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return meta.get(ATTENTION_META, "plain operators")
