"""Constrained decoding over a route-name trie, and per-route probabilities.

A decision must not depend on its batch neighbours, on padding or on the prefix cache. Measured
on onnxruntime's CPU kernels: padding *before* a row's tokens (left padding, or a gap between
its past and its new tokens) changes the last bits of its logits, and so do quantized MatMul
tiles that straddle two rows. So only the prefill is batched across requests, over one shared
past length, with every row right-padded to a multiple of ALIGN; the trie runs after it use one
request's rows only (tests prove the property per variant).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from grpc_router.errors import InvalidArgument
from grpc_router.runtime import DecoderSession, FloatArray, Int64Array, KVTensor, on_host

PAD_ID = 0
# Prefill widths and the cached prefix length are multiples of this. Quantized MatMul kernels
# tile the flattened [batch*seq] rows; aligning every row's start keeps its numbers independent
# of its batch neighbours (measured: unaligned rows differ in the last bits for int4/int8).
ALIGN = 16


@dataclass(slots=True)
class Node:
    children: dict[int, int] = field(default_factory=dict)
    routes: list[str] = field(default_factory=list)
    """Every answer name whose path passes through (or ends at) this node."""
    depth: int = 0


class Trie:
    """Token paths of the answer names; node 0 is the root."""

    def __init__(self, paths: dict[str, tuple[int, ...]]) -> None:
        self.paths = paths
        self.nodes: list[Node] = [Node(routes=list(paths))]
        self.leaf: dict[str, int] = {}
        for name, path in paths.items():
            at = 0
            for tok in path:
                nxt = self.nodes[at].children.get(tok)
                if nxt is None:
                    nxt = len(self.nodes)
                    self.nodes.append(Node(depth=self.nodes[at].depth + 1))
                    self.nodes[at].children[tok] = nxt
                at = nxt
                self.nodes[at].routes.append(name)
            self.leaf[name] = at
        for name, at in self.leaf.items():
            if self.nodes[at].children or len(self.nodes[at].routes) > 1:
                raise InvalidArgument(
                    "routes", f"route name {name!r} tokenizes as a prefix of another name"
                )

    def unique(self, node: int) -> bool:
        return len(self.nodes[node].routes) == 1

    def descend(self, node: int, token: int) -> int:
        return self.nodes[node].children[token]

    def scoring_rows(self) -> list[tuple[int, ...]]:
        """Token sequences whose logits cover every internal node: each leaf's path minus its
        last token, skipping those that are a prefix of another (their logits come for free)."""
        rows = sorted({p[:-1] for p in self.paths.values() if len(p) > 1})
        keep = [
            r for i, r in enumerate(rows) if not (i + 1 < len(rows) and _is_prefix(r, rows[i + 1]))
        ]
        # Shortest first, so that a run's rows need little padding.
        return sorted(keep, key=lambda r: (len(r), r))


def _is_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) < len(b) and b[: len(a)] == a


@dataclass(slots=True)
class Rows:
    """The KV state of a batch of sequences. The KV may live on the session's device
    (OrtValues); what only numpy can do brings it back to the host first."""

    past: list[KVTensor]
    mask: Int64Array
    """[batch, past_len]: 1 for real tokens, 0 for padding."""
    next_pos: Int64Array
    """[batch]: position id of each row's next token (its count of real tokens)."""

    @property
    def batch(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def take(self, index: Sequence[int]) -> Rows:
        idx = np.asarray(index, dtype=np.int64)
        return Rows(
            [np.take(p, idx, axis=0) for p in on_host(self.past)],
            np.take(self.mask, idx, axis=0),
            np.take(self.next_pos, idx, axis=0),
        )

    def row(self, i: int, length: int) -> Rows:
        """Row i alone, cut to its first `length` positions (dropping trailing padding)."""
        if self.batch == 1 and length == self.length:
            return self  # nothing to cut: a device-resident KV stays where it is
        return Rows(
            [p[i : i + 1, :, :length] for p in on_host(self.past)],
            self.mask[i : i + 1, :length],
            self.next_pos[i : i + 1],
        )

    def copy(self) -> Rows:
        """A compact copy that does not keep a larger batch's arrays alive."""
        past = [np.ascontiguousarray(p) if isinstance(p, np.ndarray) else p for p in self.past]
        return Rows(past, self.mask.copy(), self.next_pos)

    @staticmethod
    def stack(rows: Sequence[Rows]) -> Rows:
        """Concatenate rows of equal length along the batch axis."""
        if len(rows) == 1:
            return rows[0]
        return Rows(
            [
                np.concatenate(layer, axis=0)
                for layer in zip(*(on_host(r.past) for r in rows), strict=True)
            ],
            np.concatenate([r.mask for r in rows], axis=0),
            np.concatenate([r.next_pos for r in rows], axis=0),
        )


def extend(
    session: DecoderSession,
    rows: Rows,
    tokens: Sequence[Sequence[int]],
    *,
    align: int = 1,
    last_only: bool = False,
) -> tuple[list[FloatArray], Rows]:
    """Feed each row its tokens (right-padded to a multiple of `align`) in one run; return
    each row's logits: at every new position, or with `last_only` at its last real one (the
    graph then computes only those, and its last layer only the rows that lead to them)."""
    width = -(-max(len(t) for t in tokens) // align) * align
    ids = np.full((rows.batch, width), PAD_ID, dtype=np.int64)
    new_mask = np.zeros((rows.batch, width), dtype=np.int64)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = t
        new_mask[i, : len(t)] = 1
    positions = rows.next_pos[:, None] + np.arange(width, dtype=np.int64)[None, :]
    mask = np.concatenate([rows.mask, new_mask], axis=1)
    per_row = last_only and session.has_keep
    out = session.run(ids, mask, positions, rows.past, keep=-1 if per_row else 0)
    counts = np.asarray([len(t) for t in tokens], dtype=np.int64)
    if per_row:  # [batch, 1, vocab]: each row's last real position
        logits = [out.logits[i] for i in range(len(tokens))]
    elif last_only:
        logits = [out.logits[i, len(t) - 1][None] for i, t in enumerate(tokens)]
    else:
        logits = [out.logits[i, : len(t)] for i, t in enumerate(tokens)]
    return logits, Rows(out.present, mask, rows.next_pos + counts)


def log_softmax_at(logits: FloatArray, tokens: Sequence[int]) -> dict[int, float]:
    """Full-vocabulary log-probabilities of `tokens`.

    float32 with one scratch row: after subtracting the max every term is in (0, 1], and
    numpy's pairwise sum keeps the normaliser within ~1e-7 of a float64 one, at a third of
    the time (this runs once per trie node, over the whole vocabulary)."""
    top = logits.max()
    scratch = np.subtract(logits, top, dtype=np.float32)
    np.exp(scratch, out=scratch)
    lse = float(top) + math.log(float(scratch.sum()))
    return {t: float(logits[t]) - lse for t in tokens}


def best_child(trie: Trie, node: int, logits: FloatArray) -> int:
    """The child token with the highest logit (ties: the lowest token id, like argmax)."""
    toks = sorted(trie.nodes[node].children)
    vals = logits[np.asarray(toks, dtype=np.int64)]
    return toks[int(np.argmax(vals))]


@dataclass(slots=True)
class Outcome:
    route: str
    confidence: float
    scores: dict[str, float]


def score_all(
    session: DecoderSession,
    trie: Trie,
    prompt: Rows,
    root_logits: FloatArray,
    *,
    rows_per_run: int = 8,
) -> tuple[Outcome, int]:
    """Greedy route plus normalised P(route) for every answer name. Returns the outcome and the
    number of model runs.

    With a graph that takes `attention_mask_4d`, the whole trie goes in one run after the
    prompt's KV (`packed_trie_logits`); otherwise each batch row is one scoring sequence after
    a copy of that KV, right-padded, `rows_per_run` rows a run. Either way the runs hold only
    this prompt's tokens, laid out the same way every time, so the numbers never depend on
    other requests."""
    if session.has_mask4d:
        return _normalise(trie, packed_trie_logits(session, trie, prompt, root_logits)), 1
    seqs = trie.scoring_rows()
    if session.one_row_prefill:  # fused attention: one row per run after a past
        rows_per_run = 1
    node_logits: dict[int, FloatArray] = {0: root_logits}
    runs = 0
    for start in range(0, len(seqs), rows_per_run):
        part = seqs[start : start + rows_per_run]
        logits, _ = extend(session, prompt.take([0] * len(part)), part)
        runs += 1
        for seq, out in zip(part, logits, strict=True):
            at = 0
            for d, tok in enumerate(seq):
                at = trie.descend(at, tok)
                node_logits.setdefault(at, out[d].copy())
    return _normalise(trie, node_logits), runs


def packed_trie_logits(
    session: DecoderSession, trie: Trie, prompt: Rows, root_logits: FloatArray
) -> dict[int, FloatArray]:
    """Logits at every internal trie node from one run: the internal nodes (parents before
    children) form one sequence after the prompt; each is placed at its depth's position and
    may attend to the prompt, its ancestors and itself. The prompt's KV is used as it is, not
    copied per continuation."""
    order: list[int] = []
    parent: dict[int, int] = {}
    stack = [0]
    while stack:  # depth-first, children by token id: the same layout every time
        at = stack.pop()
        for _, child in sorted(trie.nodes[at].children.items(), reverse=True):
            if trie.nodes[child].children:  # leaves need no logits
                parent[child] = at
                stack.append(child)
        if at:
            order.append(at)
    node_logits: dict[int, FloatArray] = {0: root_logits}
    if not order:
        return node_logits
    slot = {node: i for i, node in enumerate(order)}
    token = {child: tok for n in trie.nodes for tok, child in n.children.items()}
    past_len, size = prompt.length, len(order)
    allowed = np.zeros((1, 1, size, past_len + size), dtype=np.int64)
    allowed[..., :past_len] = prompt.mask[0]
    for i, node in enumerate(order):
        at = node
        while at:
            allowed[0, 0, i, past_len + slot[at]] = 1
            at = parent.get(at, 0)
    ids = np.asarray([[token[n] for n in order]], dtype=np.int64)
    positions = prompt.next_pos[:, None] + np.asarray(
        [[trie.nodes[n].depth - 1 for n in order]], dtype=np.int64
    )
    mask = np.concatenate([prompt.mask, np.ones((1, size), dtype=np.int64)], axis=1)
    out = session.run(ids, mask, positions, prompt.past, mask4d=allowed)
    for i, node in enumerate(order):
        node_logits[node] = out.logits[0, i]  # views: this run's logits are not reused
    return node_logits


def _normalise(trie: Trie, node_logits: dict[int, FloatArray]) -> Outcome:
    logp: dict[str, float] = {}
    cache: dict[int, dict[int, float]] = {}
    for name, path in trie.paths.items():
        at, total = 0, 0.0
        for tok in path:
            if at not in cache:
                cache[at] = log_softmax_at(node_logits[at], list(trie.nodes[at].children))
            total += cache[at][tok]
            at = trie.descend(at, tok)
        logp[name] = total
    top = max(logp.values())
    weights = {n: math.exp(v - top) for n, v in logp.items()}
    norm = sum(weights.values())
    scores = {n: w / norm for n, w in weights.items()}
    at = 0
    while not trie.unique(at):
        at = trie.descend(at, best_child(trie, at, node_logits[at]))
    route = trie.nodes[at].routes[0]
    return Outcome(route, scores[route], scores)


def greedy(
    session: DecoderSession, trie: Trie, prompt: Rows, root_logits: FloatArray
) -> tuple[Outcome, int]:
    """Constrained greedy decode, stopping as soon as the route is unique.

    Runs the model only at branching nodes; a single-child chain is fed in one run.
    Confidence is the product of the chosen tokens' full-vocabulary probabilities at those
    branching nodes (the probability of the decoded path up to uniqueness)."""
    at, logp, logits, rows, runs = 0, 0.0, root_logits, prompt, 0
    while True:
        tok = best_child(trie, at, logits)
        logp += log_softmax_at(logits, [tok])[tok]
        at = trie.descend(at, tok)
        fed = [tok]
        while not trie.unique(at) and len(trie.nodes[at].children) == 1:
            only = next(iter(trie.nodes[at].children))
            at = trie.descend(at, only)
            fed.append(only)
        if trie.unique(at):
            return Outcome(trie.nodes[at].routes[0], math.exp(logp), {}), runs
        out, rows = extend(session, rows, [fed], last_only=True)
        logits = out[0][-1]
        runs += 1


def prompt_rows(
    session: DecoderSession,
    past: list[KVTensor],
    past_len: int,
    suffixes: Sequence[Sequence[int]],
    *,
    chunk_tokens: int = 512,
    align: int = ALIGN,
) -> tuple[list[FloatArray], list[Rows]]:
    """Prefill the suffixes after a shared-length past, batched and right-padded to multiples
    of `align`; returns each prompt's last logits and its KV state cut to its own length.
    (`align` 1 for a lone prompt whose KV stays on a device: no padding, so nothing to cut.)

    Long suffixes go in chunks (a multiple of ALIGN per row, about `chunk_tokens` per run):
    this bounds the activations' memory (and an older graph's every-position logits). A chunk
    boundary is like a cached-prefix boundary: aligned, it leaves the numbers unchanged."""
    batch = len(suffixes)
    if session.one_row_prefill and batch > 1:  # fused attention: one prompt per run
        lasts: list[FloatArray] = []
        states: list[Rows] = []
        for i, suffix in enumerate(suffixes):
            own = [p[i : i + 1] for p in on_host(past)]
            (last_i,), (rows_i,) = prompt_rows(
                session, own, past_len, [suffix], chunk_tokens=chunk_tokens, align=align
            )
            lasts.append(last_i)
            states.append(rows_i)
        return lasts, states
    per_row = max(ALIGN, chunk_tokens // batch // ALIGN * ALIGN)
    rows = Rows(
        past,
        np.ones((batch, past_len), dtype=np.int64),
        np.full((batch,), past_len, dtype=np.int64),
    )
    last: dict[int, FloatArray] = {}
    done: dict[int, Rows] = {}
    active = list(range(batch))
    offset = 0
    while active:
        pieces = [suffixes[i][offset : offset + per_row] for i in active]
        logits, rows = extend(session, rows, pieces, align=align, last_only=True)
        offset += per_row
        keep: list[int] = []
        for r, i in enumerate(active):
            if len(suffixes[i]) <= offset:
                last[i] = logits[r][-1].copy()
                done[i] = rows.row(r, past_len + len(suffixes[i]))
                if rows.batch > 1:  # a view would keep the whole batch's KV alive
                    done[i] = done[i].copy()
            else:
                keep.append(r)
        del logits
        if keep and len(keep) < len(active):
            rows = rows.take(keep)
        active = [active[r] for r in keep]
    return [last[i] for i in range(batch)], [done[i] for i in range(batch)]
