"""Constrained decoding over a route-name trie, and per-route probabilities.

A decision must not depend on its batch neighbours, on padding or on the prefix cache. Measured
on onnxruntime's CPU kernels: padding *before* a row's tokens (left padding, or a gap between
its past and its new tokens) changes the last bits of its logits, and so do quantized MatMul
tiles that straddle two rows. So only the prefill is batched across requests, over one shared
past length, with every row right-padded to a multiple of ALIGN. The trie nodes a decision needs
follow each prompt in its own row of that run (`prompt_and_trie`: one pass over the weights per
decision); graphs exported before that was possible run them afterwards, on one request's rows
only (tests prove the property per variant).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from grpc_router.errors import ArtifactError, InvalidArgument
from grpc_router.runtime import DecoderSession, FloatArray, Int64Array, KVTensor, on_host

PAD_ID = 0
# Prefill widths are multiples of this. Quantized MatMul kernels tile the flattened [batch*seq]
# rows; aligning every row's start keeps its numbers independent of its batch neighbours
# (measured: unaligned rows differ in the last bits for int4/int8). Where a past ends does not
# matter (tested: any cached prefix length gives the same bits).
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
        self._tails: dict[bool, TrieTail] = {}
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

    def tail(self, *, full: bool) -> TrieTail:
        """The nodes whose logits a decision needs, as one tree-masked sequence: every internal
        node for full scores, else those still shared by several routes (the greedy walk stops
        at the first unique one)."""
        found = self._tails.get(full)
        if found is None:
            found = self._tails[full] = TrieTail.of(self, full=full)
        return found

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


@dataclass(frozen=True, slots=True, eq=False)  # arrays inside: identity, not value
class TrieTail:
    """Trie nodes fed after a prompt in one sequence, parents before children (depth first,
    children by token id: the same layout every time). Each sits at its depth's position and
    may attend to the prompt, its ancestors and itself, so one run gives every node's
    next-token logits: the prompt's own prefill run, or one of their own after its KV."""

    nodes: tuple[int, ...]
    tokens: tuple[int, ...]
    offsets: npt.NDArray[np.int64]
    """Position of each node after the prompt's last token: its depth - 1."""
    sees: npt.NDArray[np.int64]
    """[n, n]: 1 where node i may attend to node j (an ancestor, or itself)."""

    @staticmethod
    def of(trie: Trie, *, full: bool) -> TrieTail:
        def wanted(node: int) -> bool:
            return bool(trie.nodes[node].children) if full else not trie.unique(node)

        order: list[int] = []
        parent: dict[int, int] = {}
        token: dict[int, int] = {}
        stack = [0]
        while stack:
            at = stack.pop()
            for tok, child in sorted(trie.nodes[at].children.items(), reverse=True):
                if wanted(child):  # wanted nodes' ancestors are wanted too
                    parent[child], token[child] = at, tok
                    stack.append(child)
            if at:
                order.append(at)
        slot = {node: i for i, node in enumerate(order)}
        sees = np.zeros((len(order), len(order)), dtype=np.int64)
        for i, node in enumerate(order):
            at = node
            while at:
                sees[i, slot[at]] = 1
                at = parent[at]
        return TrieTail(
            tuple(order),
            tuple(token[n] for n in order),
            np.asarray([trie.nodes[n].depth - 1 for n in order], dtype=np.int64),
            sees,
        )

    def __len__(self) -> int:
        return len(self.nodes)


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

    def cut(self, length: int) -> Rows:
        """Every row cut to its first `length` positions (rows of equal real length)."""
        return Rows(
            [p[:, :, :length] for p in on_host(self.past)],
            self.mask[:, :length],
            self.next_pos,
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
    ids, new_mask, positions = _layout(rows, tokens, align)
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


def _layout(
    rows: Rows, tokens: Sequence[Sequence[int]], align: int
) -> tuple[Int64Array, Int64Array, Int64Array]:
    """input_ids, the new tokens' mask and position_ids of a run: each row's tokens
    right-padded to a width that is a multiple of `align`, positions continuing its past."""
    width = -(-max(len(t) for t in tokens) // align) * align
    ids = np.full((rows.batch, width), PAD_ID, dtype=np.int64)
    new_mask = np.zeros((rows.batch, width), dtype=np.int64)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = t
        new_mask[i, : len(t)] = 1
    positions = rows.next_pos[:, None] + np.arange(width, dtype=np.int64)[None, :]
    return ids, new_mask, positions


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
    """Logits at every internal trie node from one run after the prompt's KV, for graphs that
    cannot take the trie in the prompt's own run."""
    return tail_logits(session, trie.tail(full=True), prompt, root_logits)


def tail_logits(
    session: DecoderSession, tail: TrieTail, prompt: Rows, root_logits: FloatArray
) -> dict[int, FloatArray]:
    """A tail's node logits from one run after the prompt's KV, used as it is (not copied per
    continuation)."""
    node_logits: dict[int, FloatArray] = {0: root_logits}
    if not tail:
        return node_logits
    past_len, size = prompt.length, len(tail)
    allowed = np.zeros((1, 1, size, past_len + size), dtype=np.int64)
    allowed[..., :past_len] = prompt.mask[0]
    allowed[0, 0, :, past_len:] = tail.sees
    ids = np.asarray([tail.tokens], dtype=np.int64)
    positions = prompt.next_pos[:, None] + tail.offsets[None, :]
    mask = np.concatenate([prompt.mask, np.ones((1, size), dtype=np.int64)], axis=1)
    out = session.run(ids, mask, positions, prompt.past, mask4d=allowed)
    for i, node in enumerate(tail.nodes):
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


def outcome_of(trie: Trie, node_logits: dict[int, FloatArray], *, full: bool) -> Outcome:
    """The decision from the logits of a `Trie.tail(full=...)` (root included): normalised
    scores of every route, or (`full` False) the greedy route alone, with the confidence
    `greedy` gives it."""
    if full:
        return _normalise(trie, node_logits)
    at, logp = 0, 0.0
    while True:  # the steps of `greedy`, reading the logits instead of running the model
        tok = best_child(trie, at, node_logits[at])
        logp += log_softmax_at(node_logits[at], [tok])[tok]
        at = _chain_end(trie, trie.descend(at, tok))
        if trie.unique(at):
            return Outcome(trie.nodes[at].routes[0], math.exp(logp), {})


def _chain_end(trie: Trie, at: int) -> int:
    """Past single-child nodes that are still shared: their one continuation is not a choice."""
    while not trie.unique(at) and len(trie.nodes[at].children) == 1:
        at = trie.descend(at, next(iter(trie.nodes[at].children)))
    return at


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
    logits, rows = _prefill(session, past, past_len, suffixes, None, chunk_tokens, align)
    return [node_logits[0] for node_logits in logits], rows


def prompt_and_trie(
    session: DecoderSession,
    past: list[KVTensor],
    past_len: int,
    suffixes: Sequence[Sequence[int]],
    tails: Sequence[TrieTail],
    *,
    chunk_tokens: int = 512,
    align: int = ALIGN,
) -> list[dict[int, FloatArray]]:
    """`prompt_rows` with each prompt's trie tail fed after its last token in the same run
    (graphs with `keeps_last_m`): the logits of every node a decision needs (0: the prompt's
    last token) from one pass over the weights, instead of a run per step or a trie run after
    the prefill. The tail starts where the prompt ends, whatever the batch, so a row's numbers
    do not depend on its neighbours."""
    if not session.keeps_last_m:
        raise ArtifactError("the graph cannot keep a trie's logits per row; re-run make export")
    logits, _ = _prefill(session, past, past_len, suffixes, tails, chunk_tokens, align)
    return logits


def _prefill(
    session: DecoderSession,
    past: list[KVTensor],
    past_len: int,
    suffixes: Sequence[Sequence[int]],
    tails: Sequence[TrieTail] | None,
    chunk_tokens: int,
    align: int,
) -> tuple[list[dict[int, FloatArray]], list[Rows]]:
    """Each prompt's node logits (0: its last token) and KV state: cut to the prompt, or, for a
    prompt fed with a tail, the run's state as it is (nothing extends a trie's KV)."""
    batch = len(suffixes)
    if session.one_row_prefill and tails and any(tails) and not past_len:
        # The fused kernel rotates a run without a past by index, not by position_ids: the
        # trie (positions by depth) goes in a run with one (an aligned chunk boundary, which
        # changes no number), or after the prompt if it is too short to split.
        split: list[dict[int, FloatArray]] = []
        split_rows: list[Rows] = []
        for suffix, tail in zip(suffixes, tails, strict=True):
            head = (len(suffix) - 1) // ALIGN * ALIGN
            if not head:
                (root,), (alone,) = _prefill(
                    session, session.empty_past(1), 0, [suffix], None, chunk_tokens, align
                )
                split.append(tail_logits(session, tail, alone, root[0]))
                split_rows.append(alone)
                continue
            _, (state,) = _prefill(
                session, session.empty_past(1), 0, [suffix[:head]], None, chunk_tokens, ALIGN
            )
            (last_i,), (rows_i,) = _prefill(
                session, state.past, head, [suffix[head:]], [tail], chunk_tokens, align
            )
            split.append(last_i)
            split_rows.append(rows_i)
        return split, split_rows
    if session.one_row_prefill and batch > 1:  # fused attention: one prompt per run
        lasts: list[dict[int, FloatArray]] = []
        states: list[Rows] = []
        for i, suffix in enumerate(suffixes):
            own = [p[i : i + 1] for p in on_host(past)]
            (last_i,), (rows_i,) = _prefill(
                session, own, past_len, [suffix], tails and tails[i : i + 1], chunk_tokens, align
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
    last: dict[int, dict[int, FloatArray]] = {}
    done: dict[int, Rows] = {}
    active = list(range(batch))
    offset = 0
    while active:
        pieces = [suffixes[i][offset : offset + per_row] for i in active]
        offset += per_row
        ending = [len(suffixes[i]) <= offset for i in active]
        row_tails = [
            tails[i] if tails and end else None for i, end in zip(active, ending, strict=True)
        ]
        logits, rows = _feed(session, rows, pieces, row_tails, align)
        keep: list[int] = []
        for r, i in enumerate(active):
            if ending[r]:
                # [batch, m, vocab] views; an older graph's every-position logits are copied
                last[i] = (
                    logits[r] if session.has_keep else {n: o.copy() for n, o in logits[r].items()}
                )
                if row_tails[r]:  # its KV ends with the trie's, which nothing extends: left
                    done[i] = rows  # as it is (on a device, cutting it would copy it out)
                    continue
                done[i] = rows.row(r, past_len + len(suffixes[i]))
                if rows.batch > 1:  # a view would keep the whole batch's KV alive
                    done[i] = done[i].copy()
            else:
                keep.append(r)
        del logits
        if keep and len(keep) < len(active):
            rows = rows.take(keep)
        if keep and rows.length > past_len + offset:  # a neighbour's trie made the run wider
            rows = rows.cut(past_len + offset)
        active = [active[r] for r in keep]
    return [last[i] for i in range(batch)], [done[i] for i in range(batch)]


def _feed(
    session: DecoderSession,
    rows: Rows,
    pieces: Sequence[Sequence[int]],
    tails: Sequence[TrieTail | None],
    align: int,
) -> tuple[list[dict[int, FloatArray]], Rows]:
    """One prefill run: each row's piece, then its tail if it has one; each row's logits at
    its piece's last token (key 0) and at its tail's nodes."""
    if not any(tails):
        logits, rows = extend(session, rows, pieces, align=align, last_only=True)
        return [{0: row[-1]} for row in logits], rows
    counts = [len(p) for p in pieces]
    seqs = [[*p, *(t.tokens if t else ())] for p, t in zip(pieces, tails, strict=True)]
    ids, new_mask, positions = _layout(rows, seqs, align)
    width = ids.shape[1]
    # [batch, 1, seq, past+seq], ANDed with the graph's causal and padding mask
    allowed = np.ones((rows.batch, 1, width, rows.length + width), dtype=np.int64)
    for r, (n, tail) in enumerate(zip(counts, tails, strict=True)):
        if tail:
            k, at = len(tail), rows.length + n
            positions[r, n : n + k] = rows.next_pos[r] + n + tail.offsets
            allowed[r, 0, n : n + k, at : at + k] = tail.sees
    keep = 1 + max(len(t) if t else 0 for t in tails)  # each row's last real `keep` tokens
    mask = np.concatenate([rows.mask, new_mask], axis=1)
    out = session.run(ids, mask, positions, rows.past, keep=-keep, mask4d=allowed)
    result: list[dict[int, FloatArray]] = []
    for r, tail in enumerate(tails):
        k = len(tail) if tail else 0
        node_logits = {0: out.logits[r, keep - 1 - k]}  # the piece's last token
        for i, node in enumerate(tail.nodes if tail else ()):
            node_logits[node] = out.logits[r, keep - k + i]
        result.append(node_logits)
    return result, Rows(out.present, mask, rows.next_pos + np.asarray(counts, dtype=np.int64))
