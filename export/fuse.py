"""Fused attention for the CPU variant: each layer's attention as one GroupQueryAttention node.

After `streamline`, a layer's attention is still a dozen nodes (KV concat, transposes, two
grouped matmuls, bias add, softmax, reshapes), each a pass over a [heads, seq, past+seq] float
tensor. onnxruntime's CPU kernel for com.microsoft.GroupQueryAttention does the same maths per
head while the data is in cache, and writes the present KV itself, so the int8 variant replaces
those nodes with it.

Where the graph's rotary is transformers' unscaled rotate_half form, the node takes that over
too: it reads the q/k/v projections as they come ([batch, seq, heads * dim], no transposes) and
rotates q and k from `position_ids` (so the trie's depth-based positions still hold), with
cos/sin caches built from the graph's own inv_freq the way the graph computes them (float32
angle, then cos/sin), so a layer's output stays within float rounding of the plain graph's.

What stays the same: the query/key scales fold into the node's `scale`, and the shared bias
(causal, padding and the caller's attention_mask_4d) is the node's attention_bias. `seqlens_k`
is every row's full width, so the node's own causal window never hides a key the bias allows
(right padding is masked by the bias, as before). The last layer, whose queries are cut to the
kept rows, stays as it is.

The cost: the kernel refuses a batch of more than one row with a past and more than one new
token, so a graph with this fusion is marked (metadata `grpc_router.attention`) and the engine
prefills one request per run.

Only the int8 (CPU) variant is fused. The fp16 (GPU) variant keeps the operators: CUDA's kernel
runs the fused graph correctly, but it has not been shown to decide faster there than the
operators it replaces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.quantize import point_to_external, write_aligned
from export.streamline import BIAS, PREFIX, GraphEditor, prune_unread, transpose_perm
from grpc_router.engines.arch_router.graph import ATTENTION_META, FUSED_ATTENTION

FUSED_ROTARY = "GroupQueryAttention, rotary inside"
SEQLENS, TOTAL = f"{PREFIX}.gqa.seqlens_k", f"{PREFIX}.gqa.total"
COS, SIN = f"{PREFIX}.gqa.cos_cache", f"{PREFIX}.gqa.sin_cache"
_BSH = f"{PREFIX}.gqa.bsh"


def _only_reader(g: GraphEditor, name: str, op: str) -> onnx.NodeProto | None:
    readers = g.consumers.get(name, [])
    if len(readers) != 1 or readers[0].op_type != op:
        return None
    return readers[0]


def _scalar(g: GraphEditor, node: onnx.NodeProto) -> tuple[str, float] | None:
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
    # The [batch, seq, heads * dim] projections behind query/key/value when the rotary is
    # transformers' rotate_half form: the node then rotates them itself (do_rotary).
    projections: tuple[str, str, str] | None
    anchor: onnx.NodeProto  # the old AV matmul: the fused node goes in front of it
    replaced: tuple[onnx.NodeProto, ...]  # producers of the names the fused node now writes
    output: str  # [batch, seq, heads * dim]

    def nodes(self, heads: int, kv_heads: int, rotary: bool) -> list[onnx.NodeProto]:
        p, i = f"/{PREFIX}/fused{self.index}", self.index
        past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value", SEQLENS, TOTAL]
        outputs = [self.output, f"present.{i}.key", f"present.{i}.value"]
        attrs: dict[str, Any] = {"num_heads": heads, "kv_num_heads": kv_heads, "scale": self.scale}
        if rotary and self.projections is not None:
            inputs = [*self.projections, *past, COS, SIN, "position_ids", BIAS]
            node = helper.make_node(
                FUSED_ATTENTION, inputs, outputs, domain="com.microsoft",
                name=f"{p}/{FUSED_ATTENTION}", do_rotary=1, rotary_interleaved=0, **attrs,
            )  # fmt: skip
            return [node]
        made: list[onnx.NodeProto] = []
        for part, source in (("q", self.query), ("k", self.key), ("v", self.value)):
            # [batch, heads, seq, dim] -> [batch, seq, heads * dim], the node's layout
            t, packed = f"{p}.{part}t", f"{p}.{part}"
            made += [
                helper.make_node("Transpose", [source], [t], perm=[0, 2, 1, 3], name=f"{t}/T"),
                helper.make_node("Reshape", [t, _BSH], [packed], name=f"{packed}/R"),
            ]
        made.append(
            helper.make_node(
                FUSED_ATTENTION, [f"{p}.q", f"{p}.k", f"{p}.v", *past, "", "", "", BIAS], outputs,
                domain="com.microsoft", name=f"{p}/{FUSED_ATTENTION}", **attrs,
            )
        )  # fmt: skip
        return made


def _heads_first(g: GraphEditor, name: str) -> str | None:
    """The [batch, seq, heads * dim] tensor behind Transpose(0, 2, 1, 3)(Reshape(x))."""
    t = g.producer.get(name)
    if t is None or t.op_type != "Transpose" or transpose_perm(t) != [0, 2, 1, 3]:
        return None
    reshape = g.producer.get(t.input[0])
    return reshape.input[0] if reshape is not None and reshape.op_type == "Reshape" else None


def _unrotated(g: GraphEditor, rotated: str) -> str | None:
    """The projection behind transformers' rotary `x * cos + rotate_half(x) * sin`, where
    rotate_half(x) = Concat(Neg(Slice(x)), Slice(x)) and x = Transpose(Reshape(projection))."""
    add = g.producer.get(rotated)
    if add is None or add.op_type != "Add":
        return None
    muls = [g.producer.get(n) for n in add.input]
    for plain, turned in (muls, muls[::-1]):
        if plain is None or turned is None or plain.op_type != "Mul" or turned.op_type != "Mul":
            continue
        x = plain.input[0]
        concat = g.producer.get(turned.input[0])
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
            continue
        neg, second = (g.producer.get(n) for n in concat.input)
        first = g.producer.get(neg.input[0]) if neg is not None and neg.op_type == "Neg" else None
        if all(n is not None and n.op_type == "Slice" and n.input[0] == x for n in (first, second)):
            return _heads_first(g, x)
    return None


def _match(g: GraphEditor, i: int) -> _Layer | None:
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
    if kt is None or transpose_perm(kt) != [0, 1, 3, 2]:
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
        or transpose_perm(transpose) != [0, 2, 1, 3]
    ):
        return None
    query, key_new, value_new = q_scale[0], concats[0].input[1], concats[1].input[1]
    found = (_unrotated(g, query), _unrotated(g, key_new), _heads_first(g, value_new))
    return _Layer(
        index=i,
        query=query,
        key=key_new,
        value=value_new,
        scale=q_scale[1] * k_scale[1],
        projections=(found[0], found[1], found[2]) if None not in found else None,  # type: ignore[arg-type]
        anchor=av,
        replaced=(concats[0], concats[1], out),
        output=out.output[0],
    )


def _lengths() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """seqlens_k = width - 1 for every row (int32 [batch]) and total = width (int32 scalar)."""
    p = f"/{PREFIX}/gqa"
    consts = {
        "zero": np.array(0, np.int64),
        "one": np.array(1, np.int64),
        "axis0": np.array([0], np.int64),
    }
    names = {k: f"{PREFIX}.gqa.{k}" for k in consts}
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


def _inv_freq(g: GraphEditor) -> np.ndarray | None:
    """The graph's own rotary frequencies (transformers' export: Cos(Concat(Transpose(MatMul(
    Cast(Expand(inv_freq)), positions)))) with an attention scaling of 1), or None."""
    cos = [n for n in g.nodes if n.op_type == "Cos"]
    if len(cos) != 1:
        return None
    for reader in g.consumers.get(cos[0].output[0], []):
        scaling = _scalar(g, reader) if reader.op_type == "Mul" else None
        if scaling is not None and scaling[1] != 1.0:
            return None  # a scaled rotary: left to the graph
    node = g.producer.get(cos[0].input[0])
    for op in ("Concat", "Transpose", "MatMul"):
        if node is None or node.op_type != op:
            return None
        node = g.producer.get(node.input[0])
    while node is not None and node.op_type == "Cast":
        node = g.producer.get(node.input[0])
    if node is None or node.op_type != "Expand":
        return None
    value = g.constant(node.input[0])
    return None if value is None else value.reshape(-1).astype(np.float32)


def rotary_caches(inv_freq: np.ndarray, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [positions, len(inv_freq)] as the graph computes them: the float32 product
    of position and frequency (a one-term MatMul there), then Cos and Sin in float32."""
    angles = np.arange(positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def fuse_attention(
    model: onnx.ModelProto, *, heads: int, kv_heads: int, max_positions: int | None = None
) -> int:
    """Rewrite `model` in place; returns how many layers were fused (0: left unchanged).
    With `max_positions` the node also applies the rotary itself, from `position_ids`, where
    the graph's rotary is transformers' unscaled one (caches for that many positions)."""
    if heads % kv_heads:
        return 0
    g = GraphEditor(model.graph)
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
    inv_freq = _inv_freq(g) if max_positions else None
    rotary = inv_freq is not None and all(layer.projections for layer in layers)
    if inv_freq is not None and max_positions and rotary:
        cos, sin = rotary_caches(inv_freq, max_positions)
        model.graph.initializer.extend(
            [numpy_helper.from_array(cos, COS), numpy_helper.from_array(sin, SIN)]
        )
    g.insert_before(None, nodes)
    replaced: set[int] = set()
    for layer in layers:
        # Before the old attention's output matmul: its inputs exist there, its readers follow.
        g.insert_before(layer.anchor, layer.nodes(heads, kv_heads, rotary))
        for old in layer.replaced:
            g.drop(old)
            replaced.add(id(old))
    g.nodes = [n for n in g.nodes if id(n) not in replaced]
    g.commit()
    prune_unread(model.graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    meta = {p.key: p for p in model.metadata_props}
    entry = meta.get(ATTENTION_META) or model.metadata_props.add()
    entry.key, entry.value = ATTENTION_META, FUSED_ATTENTION
    return len(layers)


def fuse_attention_file(path: Path, config: dict[str, Any]) -> int:
    """Fuse the graph at `path` in place; its weights (external data) are not read."""
    heads = int(config.get("num_attention_heads") or 0)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if not heads or not kv_heads:
        return 0
    model = onnx.load(str(path), load_external_data=False)
    # Positions the rotary caches cover (the model's own limit; 8 MiB each at 32k x 64).
    max_positions = int(config.get("max_position_embeddings") or 32768)
    fused = fuse_attention(model, heads=heads, kv_heads=kv_heads, max_positions=max_positions)
    if fused:
        _move_to_external_data(model, path.parent, (COS, SIN))
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    return fused


def _move_to_external_data(model: onnx.ModelProto, folder: Path, names: tuple[str, ...]) -> None:
    """Append these initializers to the graph's existing external data file (page-aligned,
    like the weights) so that model.onnx stays small; left inline if the graph has none."""
    location = next(
        (
            entry.value
            for t in model.graph.initializer
            if t.data_location == TensorProto.EXTERNAL
            for entry in t.external_data
            if entry.key == "location"
        ),
        None,
    )
    tensors = [t for t in model.graph.initializer if t.name in names and t.raw_data]
    if location is None or not tensors:
        return
    with open(folder / location, "r+b") as handle:  # not "ab": appends ignore the alignment seek
        handle.seek(0, os.SEEK_END)
        for tensor in tensors:
            offset, length = write_aligned(handle, iter([tensor.raw_data]))
            point_to_external(tensor, location, offset, length)


def attention_kind(path: Path) -> str:
    """What a built graph's attention is: FUSED_ROTARY, FUSED_ATTENTION, or plain operators."""
    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    kind = meta.get(ATTENTION_META, "plain operators")
    rotary = any(
        a.name == "do_rotary" and a.i
        for n in model.graph.node
        if n.op_type == FUSED_ATTENTION
        for a in n.attribute
    )
    return FUSED_ROTARY if kind == FUSED_ATTENTION and rotary else kind
