"""Serving rewrites of the exported decoder graph: the same work per real row, less around it.

Optimum's export of transformers' SDPA attention spends more time on masks than on matmuls at
router prompt lengths (a few hundred new tokens after a cached route-set prefix). The rewrites:

- the additive attention bias is built once for all layers from the model's boolean mask, with
  float32's lowest finite value instead of -inf (what transformers' eager attention uses);
- with no -inf in the bias a softmax row cannot be NaN, so each layer's IsNaN/Where guard after
  the softmax goes (a fully masked row, e.g. left padding, now averages instead of zeroing);
- grouped-query attention without repeat_kv: the query heads that share a KV head become the rows
  of one matmul against that head, instead of one copy of it per query head;
- an optional `attention_mask_4d` input ([batch, 1, seq, past+seq] int64, 1 = may attend;
  default one 1 that broadcasts) narrows that mask further, so that a trie of continuations can
  be scored in one sequence (each token attends to the prompt and its own ancestors);
- an optional `logits_to_keep` input (0, the default: every position; n: the last n; -m: each
  right-padded row's last m real tokens) slices the hidden states: a prefill needs one position
  per row (or its last token and a trie of continuations fed after it), not a [seq, vocab]
  float matrix, and past its K/V projections (which every position needs, for the cache) the
  last layer runs on the kept rows only.

Both inputs are initializers a caller may override, so Optimum and other callers see the graph
they know. Every row's numbers stay independent of its batch neighbours, padding and the prefix
cache for the exact variants (the engine's tests prove it); the export's parity check compares
the result to PyTorch.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from grpc_router.engines.arch_router.graph import ALIGN as ROW_TILE
from grpc_router.engines.arch_router.graph import (
    KEEP_INPUT,
    KEEP_LAST_M,
    KEEP_META,
    MASK4D_INPUT,
)

LOGITS = "logits"
PREFIX = "streamline"
KEEP_START = f"/{PREFIX}/kept_hidden.start"
BIAS = f"{PREFIX}.attn_bias"


# Bumped whenever the rewrites change, so that built artifacts can tell they are stale.
VERSION = 3


@dataclass
class StreamlineReport:
    nan_guards_removed: int = 0
    mask_biases_shared: int = 0
    heads_grouped: int = 0
    logits_to_keep: bool = False
    last_layer_trimmed: bool = False
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "version": VERSION,
            "nan_guards_removed": self.nan_guards_removed,
            "mask_biases_shared": self.mask_biases_shared,
            "heads_grouped": self.heads_grouped,
            "logits_to_keep": self.logits_to_keep,
            "last_layer_trimmed": self.last_layer_trimmed,
            "skipped": self.skipped,
        }


class GraphEditor:
    """Producer/consumer maps over a graph's nodes (top level only)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        # One list of wrappers, held for the whole edit, so identity (id) is stable.
        self.nodes = list(graph.node)
        self.position = {id(node): i for i, node in enumerate(self.nodes)}
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                self.consumers[name].append(node)
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.before: dict[int, list[onnx.NodeProto]] = defaultdict(list)
        # (query reshape, scores + bias Add, attention output name) per grouped layer, in order.
        self.attention: list[tuple[onnx.NodeProto, onnx.NodeProto, str]] = []

    def insert_before(self, anchor: onnx.NodeProto | None, nodes: list[onnx.NodeProto]) -> None:
        """Queue `nodes` to go in front of `anchor` (None: first); `commit` applies it."""
        self.before[id(anchor) if anchor is not None else 0].extend(nodes)

    def commit(self) -> None:
        # Rebuilt from copies: a node removed from a repeated field no longer aliases it.
        order: list[onnx.NodeProto] = []

        def emit(node: onnx.NodeProto) -> None:  # inserted nodes may have their own inserts
            for first in self.before.get(id(node), []):
                emit(first)
            order.append(node)

        for node in [*self.before.get(0, []), *self.nodes]:
            emit(node)
        copies = []
        for node in order:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copies.append(copy)
        del self.graph.node[:]
        self.graph.node.extend(copies)
        self.before.clear()

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def drop(self, node: onnx.NodeProto) -> None:
        """Forget `node` as a reader (it is pruned at the end once nothing reads it)."""
        for name in node.input:
            self.consumers[name] = [n for n in self.consumers.get(name, []) if n is not node]

    def rewire(self, old: str, new: str) -> None:
        """Every reader of `old` reads `new` instead."""
        for node in self.consumers.pop(old, []):
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
            self.consumers[new].append(node)


def _remove_nan_guards(g: GraphEditor, report: StreamlineReport) -> None:
    for softmax in [n for n in g.nodes if n.op_type == "Softmax"]:
        users = g.consumers.get(softmax.output[0], [])
        isnan = next((u for u in users if u.op_type == "IsNaN"), None)
        where = next(
            (
                u
                for u in users
                if u.op_type == "Where" and isnan is not None and u.input[0] == isnan.output[0]
            ),
            None,
        )
        if isnan is None or where is None or where.input[2] != softmax.output[0]:
            continue
        if where.output[0] in g.outputs:
            continue
        g.rewire(where.output[0], softmax.output[0])
        g.drop(where)
        g.drop(isnan)
        report.nan_guards_removed += 1


def _share_mask_bias(g: GraphEditor, report: StreamlineReport) -> None:
    """Each layer's `scores + Where(Slice(mask), 0, -inf)` -> `scores + bias` with one bias."""
    lowest = np.finfo(np.float32).min
    per_layer = _masked_score_adds(g)
    masks = {mask for _, _, mask in per_layer}
    if len(masks) != 1:
        if per_layer:
            report.skipped.append(f"mask bias: {len(masks)} distinct boolean masks, expected 1")
        return
    (mask,) = masks
    zero_name, low_name, bias = f"{PREFIX}.zero", f"{PREFIX}.lowest", BIAS
    g.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(0.0, np.float32), zero_name),
            numpy_helper.from_array(np.array(lowest, np.float32), low_name),
        ]
    )
    # The caller's optional 4-D mask narrows the model's own (causal + padding) one: scoring
    # packs a whole trie of continuations into one sequence, each token seeing its ancestors.
    g.graph.initializer.append(
        numpy_helper.from_array(np.ones((1, 1, 1, 1), np.int64), MASK4D_INPUT)
    )
    g.graph.input.append(
        helper.make_tensor_value_info(
            MASK4D_INPUT, TensorProto.INT64, ["batch_size", 1, "sequence_length", "total_length"]
        )
    )
    nodes = [
        helper.make_node(
            "Cast", [MASK4D_INPUT], [f"{bias}.extra"], to=TensorProto.BOOL, name=f"/{PREFIX}/M4"
        ),
        helper.make_node(
            "And", [mask, f"{bias}.extra"], [f"{bias}.allowed"], name=f"/{PREFIX}/And"
        ),
        helper.make_node(
            "Where", [f"{bias}.allowed", zero_name, low_name], [bias], name=f"/{PREFIX}/Bias"
        ),
    ]
    g.insert_before(per_layer[0][0], nodes)  # the first reader: the mask exists by then
    for add, where, _ in per_layer:
        for i, name in enumerate(add.input):
            if name == where.output[0]:
                add.input[i] = bias
    report.mask_biases_shared = len(per_layer)


def _masked_score_adds(g: GraphEditor) -> list[tuple[onnx.NodeProto, onnx.NodeProto, str]]:
    """(scores + bias Add, its Where(Slice(mask), 0, -inf), the boolean mask) of every layer."""
    per_layer: list[tuple[onnx.NodeProto, onnx.NodeProto, str]] = []
    for add in [n for n in g.nodes if n.op_type == "Add"]:
        for slot, name in enumerate(add.input):
            where = g.producer.get(name)
            if where is None or where.op_type != "Where":
                continue
            zero, neg = g.constant(where.input[1]), g.constant(where.input[2])
            cond = g.producer.get(where.input[0])
            if (
                zero is None
                or neg is None
                or zero.size != 1
                or neg.size != 1
                or float(zero.reshape(())) != 0.0
                or not np.isneginf(neg.reshape(()))
                or cond is None
                or cond.op_type != "Slice"
            ):
                continue
            other = g.producer.get(add.input[1 - slot])
            if other is None or other.op_type not in ("MatMul", "FusedMatMul"):
                continue
            per_layer.append((add, where, cond.input[0]))
    return per_layer


def _chain(g: GraphEditor, name: str, ops: Sequence[str]) -> list[onnx.NodeProto] | None:
    """The producers of `name`, following input 0, if their op types are `ops` in order."""
    found = []
    for op in ops:
        node = g.producer.get(name)
        if node is None or node.op_type != op:
            return None
        found.append(node)
        name = node.input[0]
    return found


def transpose_perm(node: onnx.NodeProto) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


@dataclass
class _RepeatKv:
    """One layer's attention as transformers' repeat_kv leaves it."""

    keys: str  # the keys before repeat_kv, [batch, kv_heads, total, dim]
    values: str
    scale: str
    add: onnx.NodeProto  # scores + bias
    softmax: onnx.NodeProto
    av: onnx.NodeProto  # MatMul(probabilities, repeated values)


def _repeat_kv_attention(g: GraphEditor, matmul: onnx.NodeProto) -> _RepeatKv | None:
    """The repeat_kv attention whose scores `matmul` computes, or None."""
    k_side = _chain(g, matmul.input[1], ("Mul", "Transpose", "Reshape", "Expand", "Unsqueeze"))
    if k_side is None or transpose_perm(k_side[1]) != [0, 1, 3, 2]:
        return None
    users = g.consumers.get(matmul.output[0], [])
    add = users[0] if len(users) == 1 and users[0].op_type == "Add" else None
    softmax_users = g.consumers.get(add.output[0], []) if add else []
    softmax = softmax_users[0] if len(softmax_users) == 1 else None
    if add is None or softmax is None or softmax.op_type != "Softmax":
        return None
    readers = g.consumers.get(softmax.output[0], [])
    av = [u for u in readers if u.op_type == "MatMul"]
    if len(av) != 1 or len(readers) != 1:
        return None
    v_side = _chain(g, av[0].input[1], ("Reshape", "Expand", "Unsqueeze"))
    if v_side is None:
        return None
    keys, values = k_side[-1].input[0], v_side[-1].input[0]
    return _RepeatKv(keys, values, k_side[0].input[1], add, softmax, av[0])


def _group_query_heads(g: GraphEditor, report: StreamlineReport, heads: int, kv_heads: int) -> None:
    """repeat_kv copies each KV head to its query heads before two batched matmuls; fold the
    query heads that share a KV head into the rows of one matmul instead (no copies, and one
    [group * seq, dim] x [dim, total] product per KV head rather than one per query head)."""
    if kv_heads >= heads or heads % kv_heads:
        return
    to_group, to_heads = f"{PREFIX}.to_group", f"{PREFIX}.to_heads"
    shapes_added = False
    for matmul in [n for n in g.nodes if n.op_type == "MatMul"]:
        found = _repeat_kv_attention(g, matmul)
        if found is None:
            continue
        if not shapes_added:
            g.graph.initializer.extend(
                [
                    numpy_helper.from_array(np.array([0, kv_heads, -1, 0], np.int64), to_group),
                    numpy_helper.from_array(np.array([0, heads, -1, 0], np.int64), to_heads),
                ]
            )
            shapes_added = True
        p = f"/{PREFIX}/gqa{report.heads_grouped}"
        q_in, scores, av_out = matmul.input[0], matmul.output[0], found.av.output[0]
        q_node = helper.make_node("Reshape", [q_in, to_group], [f"{p}.q"], name=f"{p}/Q")
        g.insert_before(
            matmul,
            [
                q_node,
                helper.make_node(
                    "Transpose", [found.keys], [f"{p}.kt"], perm=[0, 1, 3, 2], name=f"{p}/Kt"
                ),
                helper.make_node(
                    "Mul", [f"{p}.kt", found.scale], [f"{p}.kts"], name=f"{p}/KtScale"
                ),
                helper.make_node("MatMul", [f"{p}.q", f"{p}.kts"], [f"{p}.s"], name=f"{p}/QK"),
                helper.make_node("Reshape", [f"{p}.s", to_heads], [f"{p}.scores"], name=f"{p}/S"),
            ],
        )
        g.insert_before(
            found.av,
            [
                helper.make_node(
                    "Reshape", [found.softmax.output[0], to_group], [f"{p}.p"], name=f"{p}/P"
                ),
                helper.make_node("MatMul", [f"{p}.p", found.values], [f"{p}.o"], name=f"{p}/AV"),
                helper.make_node("Reshape", [f"{p}.o", to_heads], [f"{p}.out"], name=f"{p}/O"),
            ],
        )
        g.rewire(scores, f"{p}.scores")
        g.rewire(av_out, f"{p}.out")
        g.attention.append((q_node, found.add, f"{p}.out"))
        report.heads_grouped += 1


def _lm_head(g: GraphEditor) -> tuple[str, list[onnx.NodeProto]] | None:
    """The hidden-state tensor that lm_head reads, and the lm_head nodes reading it: the
    MatMul of the fp32 export, or its quantized rewrite (nodes named under /lm_head/)."""
    head = g.producer.get(LOGITS)
    if head is None:
        return None
    if head.op_type == "MatMul" and head.input[1] in g.inits:
        return head.input[0], [head]
    inside = [n for n in g.nodes if n.name.startswith("/lm_head/")]
    names = {id(n) for n in inside}
    entry = {
        i
        for n in inside
        for i in n.input
        if i in g.producer and id(g.producer[i]) not in names and i not in g.inits
    }
    if head not in inside or len(entry) != 1:
        return None
    (hidden,) = entry
    return hidden, [n for n in inside if hidden in n.input]


_KEEP = f"/{PREFIX}/keep"
"""Name prefix of the nodes and values `_add_logits_to_keep` adds."""
_KEEP_CONSTANTS = {
    "axes": np.array([1], np.int64),
    "axis0": np.array([0], np.int64),
    "end": np.array([np.iinfo(np.int64).max], np.int64),
    "zero": np.array(0, np.int64),
    "one": np.array(1, np.int64),
    "row_shape": np.array([-1, 1, 1], np.int64),
    "step_shape": np.array([1, -1, 1], np.int64),
    "tile": np.array(ROW_TILE, np.int64),
    "tile_less_one": np.array(ROW_TILE - 1, np.int64),
}
_K = {k: f"{PREFIX}.keep.{k}" for k in _KEEP_CONSTANTS}
"""Initializer names of `_KEEP_CONSTANTS`."""


def _kv(out: str) -> str:
    """The name of a value `_add_logits_to_keep` computes."""
    return f"{_KEEP}.{out}"


def _keep_node(op: str, inputs: list[str], out: str, **attrs: Any) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [_kv(out)], name=f"{_KEEP}/{out}", **attrs)


def _add_logits_to_keep(g: GraphEditor, report: StreamlineReport) -> None:
    """`logits_to_keep` n: 0 = every position, n > 0 = the last n, -m = each row's last m
    tokens whose attention_mask is 1 (right-padded rows: [batch, m, vocab])."""
    if LOGITS not in g.outputs or KEEP_INPUT in {i.name for i in g.graph.input}:
        return
    found = _lm_head(g)
    if found is None:
        report.skipped.append("logits_to_keep: lm_head not found")
        return
    hidden, readers = found
    g.graph.initializer.extend(
        numpy_helper.from_array(v, _K[k]) for k, v in _KEEP_CONSTANTS.items()
    )
    g.graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), KEEP_INPUT))
    g.graph.input.append(helper.make_tensor_value_info(KEEP_INPUT, TensorProto.INT64, []))
    g.insert_before(None, _kept_rows_nodes())
    first = min(readers, key=lambda n: g.position[id(n)])
    g.insert_before(first, _select_kept_nodes(hidden))
    for reader in readers:
        for i, name in enumerate(reader.input):
            if name == hidden:
                reader.input[i] = _kv("selected")
    report.logits_to_keep = True


def _kept_rows_nodes() -> list[onnx.NodeProto]:
    """From the graph inputs: KEEP_START = -n, where n is how many trailing positions the last
    layer and lm_head keep; in per-row mode, `first` (each row's first kept position) and `m`."""
    v = _kv
    return [
        # seq = new tokens; last[b] = index among them of row b's last real token.
        _keep_node("Shape", ["input_ids"], "ids_shape"),
        _keep_node("Gather", [v("ids_shape"), _K["one"]], "seq", axis=0),
        _keep_node("Shape", ["attention_mask"], "mask_shape"),
        _keep_node("Gather", [v("mask_shape"), _K["one"]], "total", axis=0),
        _keep_node("Sub", [v("total"), v("seq")], "past"),
        _keep_node("ReduceSum", ["attention_mask", _K["axes"]], "real", keepdims=0),
        _keep_node("Sub", [v("real"), v("past")], "count"),
        _keep_node("Sub", [v("count"), _K["one"]], "last"),
        # per-row mode: m = -keep rows end at each row's last real token
        _keep_node("Less", [KEEP_INPUT, _K["zero"]], "per_row"),
        _keep_node("Neg", [KEEP_INPUT], "neg_keep"),
        _keep_node("Max", [v("neg_keep"), _K["one"]], "m"),
        _keep_node("Sub", [v("last"), v("m")], "before_first"),
        _keep_node("Add", [v("before_first"), _K["one"]], "first"),
        _keep_node("ReduceMin", [v("first")], "first_last", keepdims=0),
        # ... rounded up to whole 16-row tiles (the engine aligns rows the same way).
        _keep_node("Sub", [v("seq"), v("first_last")], "span"),
        _keep_node("Add", [v("span"), _K["tile_less_one"]], "span_up"),
        _keep_node("Div", [v("span_up"), _K["tile"]], "tiles"),
        _keep_node("Mul", [v("tiles"), _K["tile"]], "tiled"),
        _keep_node("Min", [v("tiled"), v("seq")], "rows_n"),
        # n = the rows the last layer and lm_head keep; start = -n (0 keeps them all).
        _keep_node("Where", [v("per_row"), v("rows_n"), KEEP_INPUT], "n"),
        _keep_node("Neg", [v("n")], "neg"),
        helper.make_node("Unsqueeze", [v("neg"), _K["axis0"]], [KEEP_START], name=f"{_KEEP}/S"),
    ]


def _select_kept_nodes(hidden: str) -> list[onnx.NodeProto]:
    """`hidden`'s last n positions, then (per-row mode) each row's own last m of them: the
    value `selected` that lm_head reads instead of `hidden`."""
    v, kept = _kv, _kv("hidden")
    return [
        helper.make_node(
            "Slice", [hidden, KEEP_START, _K["end"], _K["axes"]], [kept], name=f"{_KEEP}/Slice",
        ),
        # [batch, m, hidden] target of the per-row gather's index
        helper.make_node("Shape", [kept], [v("kdims")], name=f"{_KEEP}/kdims"),
        _keep_node("Gather", [v("kdims"), _K["axis0"]], "b"),
        helper.make_node("Shape", [kept], [v("hdim")], name=f"{_KEEP}/hdim", start=2),
        _keep_node("Unsqueeze", [v("m"), _K["axis0"]], "m1"),
        _keep_node("Concat", [v("b"), v("m1"), v("hdim")], "expand_to", axis=0),
        helper.make_node(
            "If", [v("per_row")], [v("selected")], name=f"{_KEEP}/If",
            then_branch=_per_row_branch(kept), else_branch=_keep_all_branch(kept),
        ),
    ]  # fmt: skip


def _per_row_branch(kept: str) -> onnx.GraphProto:
    """Per-row mode: each row's own last m positions out of the kept window, [batch, m, hidden]."""
    v = _kv
    return helper.make_graph(
        [
            _keep_node("Sub", [v("seq"), v("n")], "window"),
            _keep_node("Sub", [v("first"), v("window")], "at"),
            _keep_node("Reshape", [v("at"), _K["row_shape"]], "at3"),
            _keep_node("Range", [_K["zero"], v("m"), _K["one"]], "steps"),
            _keep_node("Reshape", [v("steps"), _K["step_shape"]], "steps3"),
            _keep_node("Add", [v("at3"), v("steps3")], "at_m"),
            _keep_node("Expand", [v("at_m"), v("expand_to")], "index"),
            _keep_node("GatherElements", [kept, v("index")], "row_last", axis=1),
        ],
        "keep_row_last",
        [],
        [helper.make_tensor_value_info(v("row_last"), TensorProto.FLOAT, None)],
    )


def _keep_all_branch(kept: str) -> onnx.GraphProto:
    """Otherwise the kept window itself."""
    return helper.make_graph(
        [_keep_node("Identity", [kept], "all_kept")],
        "keep_all",
        [],
        [helper.make_tensor_value_info(_kv("all_kept"), TensorProto.FLOAT, None)],
    )


def _trim_last_layer(g: GraphEditor, report: StreamlineReport) -> None:
    """Only the kept positions' hidden states leave the last layer, so past its K/V projections
    (which every position needs, for the cache) the layer runs on those rows alone: queries,
    attention, o_proj, the residual and the MLP."""
    if not report.logits_to_keep or not g.attention or not report.mask_biases_shared:
        return
    q_node, add, out = g.attention[-1]
    transpose = g.consumers.get(out, [])
    reshape = g.consumers.get(transpose[0].output[0], []) if len(transpose) == 1 else []
    if len(reshape) != 1 or reshape[0].op_type != "Reshape" or transpose[0].op_type != "Transpose":
        report.skipped.append("last layer: attention output is not Transpose -> Reshape")
        return
    derived = {reshape[0].output[0]}
    residual: tuple[onnx.NodeProto, int] | None = None
    for node in g.nodes[g.position[id(reshape[0])] + 1 :]:  # topological order: one pass
        hits = [i for i, name in enumerate(node.input) if name in derived]
        if not hits:
            continue
        if node.op_type == "Add" and len(hits) == 1:
            other = 1 - hits[0]
            name = node.input[other]
            if name not in g.inits and g.constant(name) is None:
                residual = (node, other)
                break
        derived.update(node.output)
    if residual is None:
        report.skipped.append("last layer: residual Add not found")
        return
    seq_axis = {2: f"{PREFIX}.axis2", 1: _K["axes"]}
    keep_rows = f"{PREFIX}.keep_rows_shape"
    g.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([2], np.int64), seq_axis[2]),
            numpy_helper.from_array(np.array([0, 0, -1], np.int64), keep_rows),
        ]
    )
    end = _K["end"]
    cuts = [  # (reader, input slot, sequence axis)
        (q_node, 0, 2),  # queries [batch, heads, seq, dim]
        (add, list(add.input).index(BIAS), 2),  # bias [batch, 1, seq, total]
        (*residual, 1),  # residual stream [batch, seq, hidden]
    ]
    for reader, slot, axis in cuts:
        source = reader.input[slot]
        cut = f"{source}/{PREFIX}_kept"
        g.insert_before(
            reader,
            [
                helper.make_node(
                    "Slice", [source, KEEP_START, end, seq_axis[axis]], [cut],
                    name=f"{cut}/Slice",
                )
            ],
        )  # fmt: skip
        reader.input[slot] = cut
    reshape[0].input[1] = keep_rows  # [batch, kept, heads, dim] -> [batch, kept, hidden]
    report.last_layer_trimmed = True


def _reads(node: onnx.NodeProto) -> set[str]:
    """Names a node reads, including what its subgraphs (If branches) read from outside."""
    names = set(node.input)
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in sub.node:
                names |= _reads(inner)
    return names


def prune_unread(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing reads (the replaced guards and per-layer masks)."""
    needed = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed |= _reads(node)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name not in needed:
            del graph.initializer[index]


def streamline(
    model: onnx.ModelProto, *, heads: int | None = None, kv_heads: int | None = None
) -> StreamlineReport:
    """Apply the rewrites to `model` in place (weights untouched, external data stays put).
    `heads`/`kv_heads` (the config's attention heads) enable the grouped-query rewrite."""
    report = StreamlineReport()
    g = GraphEditor(model.graph)
    _remove_nan_guards(g, report)
    _share_mask_bias(g, report)
    if heads and kv_heads:
        _group_query_heads(g, report, heads, kv_heads)
    _add_logits_to_keep(g, report)
    _trim_last_layer(g, report)
    g.commit()
    prune_unread(model.graph)
    if report.logits_to_keep:
        onnx.helper.set_model_props(
            model, {**{p.key: p.value for p in model.metadata_props}, KEEP_META: KEEP_LAST_M}
        )
    return report


def streamline_file(path: Path, config: dict[str, Any]) -> StreamlineReport:
    """Rewrite the graph at `path` in place; its weights (inline or external) are not read."""
    model = onnx.load(str(path), load_external_data=False)
    heads = config.get("num_attention_heads")
    report = streamline(
        model,
        heads=int(heads) if heads else None,
        kv_heads=int(config.get("num_key_value_heads") or heads or 0) or None,
    )
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return report
