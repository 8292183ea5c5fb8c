"""Constrained decoding over a route-name trie, and per-route probabilities.

Rows of a batch share one layout, so a row's numbers never depend on its neighbours:
`[its past | padding | its new tokens | padding]`, with the padding masked. Rows in one run
always have the same past length (the engine groups requests by it); padding only ever comes
after real tokens, which keeps each row bit-identical to running it alone (tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from grpc_router.errors import InvalidArgument
from grpc_router.runtime import DecoderSession, FloatArray, Int64Array

PAD_ID = 0


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
        return keep


def _is_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) < len(b) and b[: len(a)] == a


@dataclass(slots=True)
class Rows:
    """The KV state of a batch of sequences."""

    past: list[FloatArray]
    mask: Int64Array
    """[batch, past_len]: 1 for real tokens, 0 for padding."""
    next_pos: Int64Array
    """[batch]: position id of each row's next token (its count of real tokens)."""

    @property
    def batch(self) -> int:
        return int(self.mask.shape[0])

    def take(self, index: Sequence[int]) -> Rows:
        idx = np.asarray(index, dtype=np.int64)
        return Rows(
            [np.take(p, idx, axis=0) for p in self.past],
            np.take(self.mask, idx, axis=0),
            np.take(self.next_pos, idx, axis=0),
        )


def extend(
    session: DecoderSession, rows: Rows, tokens: Sequence[Sequence[int]]
) -> tuple[list[FloatArray], Rows]:
    """Feed each row its tokens (right-padded) in one run; return each row's logits."""
    width = max(len(t) for t in tokens)
    ids = np.full((rows.batch, width), PAD_ID, dtype=np.int64)
    new_mask = np.zeros((rows.batch, width), dtype=np.int64)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = t
        new_mask[i, : len(t)] = 1
    positions = rows.next_pos[:, None] + np.arange(width, dtype=np.int64)[None, :]
    mask = np.concatenate([rows.mask, new_mask], axis=1)
    out = session.run(ids, mask, positions, rows.past)
    counts = np.asarray([len(t) for t in tokens], dtype=np.int64)
    logits = [out.logits[i, : len(t)] for i, t in enumerate(tokens)]
    return logits, Rows(out.present, mask, rows.next_pos + counts)


def log_softmax_at(logits: FloatArray, tokens: Sequence[int]) -> dict[int, float]:
    """Full-vocabulary log-probabilities of `tokens` (float64 for a stable normaliser)."""
    row = logits.astype(np.float64)
    top = float(row.max())
    lse = top + math.log(float(np.exp(row - top).sum()))
    return {t: float(row[t]) - lse for t in tokens}


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
    steps: int
    """Model runs after the prompt that this request took part in."""


def score_all(
    session: DecoderSession, trie: Trie, prompt_rows: Rows, root_logits: list[FloatArray]
) -> tuple[list[Outcome], int]:
    """Greedy route plus normalised P(route) for every name, for each request of a batch.

    All requests share `trie`. One run covers every trie node of every request."""
    seqs = trie.scoring_rows()
    n_req = prompt_rows.batch
    node_logits: list[dict[int, FloatArray]] = [{0: root_logits[i]} for i in range(n_req)]
    runs = 0
    if seqs:
        index = [i for i in range(n_req) for _ in seqs]
        logits, _ = extend(
            session, prompt_rows.take(index), [s for _ in range(n_req) for s in seqs]
        )
        runs = 1
        for r, out in enumerate(logits):
            i, seq = index[r], seqs[r % len(seqs)]
            at = 0
            for d, tok in enumerate(seq):
                at = trie.descend(at, tok)
                node_logits[i].setdefault(at, out[d])
    outcomes = []
    for i in range(n_req):
        logp: dict[str, float] = {}
        cache: dict[int, dict[int, float]] = {}
        for name, path in trie.paths.items():
            at, total = 0, 0.0
            for tok in path:
                if at not in cache:
                    cache[at] = log_softmax_at(node_logits[i][at], list(trie.nodes[at].children))
                total += cache[at][tok]
                at = trie.descend(at, tok)
            logp[name] = total
        top = max(logp.values())
        weights = {n: math.exp(v - top) for n, v in logp.items()}
        norm = sum(weights.values())
        scores = {n: w / norm for n, w in weights.items()}
        at = 0
        while not trie.unique(at):
            at = trie.descend(at, best_child(trie, at, node_logits[i][at]))
        route = trie.nodes[at].routes[0]
        outcomes.append(Outcome(route, scores[route], scores, runs))
    return outcomes, runs


def greedy(
    session: DecoderSession, trie: Trie, prompt_rows: Rows, root_logits: list[FloatArray]
) -> tuple[list[Outcome], int]:
    """Constrained greedy decode, stopping as soon as the route is unique.

    Runs the model only at branching nodes; single-child chains are fed in one run. Confidence
    is the product of the chosen tokens' full-vocabulary probabilities up to that point."""
    n_req = prompt_rows.batch
    at = [0] * n_req
    logp = [0.0] * n_req
    logits = list(root_logits)
    rows = prompt_rows
    live = list(range(n_req))  # request index of each row in `rows`
    runs = 0
    while True:
        pending: list[tuple[int, list[int]]] = []
        for r, i in enumerate(live):
            fed: list[int] = []
            tok = best_child(trie, at[i], logits[i])
            logp[i] += log_softmax_at(logits[i], [tok])[tok]
            at[i] = trie.descend(at[i], tok)
            fed.append(tok)
            while not trie.unique(at[i]) and len(trie.nodes[at[i]].children) == 1:
                only = next(iter(trie.nodes[at[i]].children))
                at[i] = trie.descend(at[i], only)
                fed.append(only)
            if not trie.unique(at[i]):
                pending.append((r, fed))
        if not pending:
            break
        rows = rows.take([r for r, _ in pending])
        live = [live[r] for r, _ in pending]
        out, rows = extend(session, rows, [fed for _, fed in pending])
        runs += 1
        for (_, _fed), i, lg in zip(pending, live, out, strict=True):
            logits[i] = lg[-1]
    return [
        Outcome(trie.nodes[at[i]].routes[0], math.exp(logp[i]), {}, runs) for i in range(n_req)
    ], runs


def prompt_rows(
    session: DecoderSession,
    past: list[npt.NDArray[Any]],
    past_len: int,
    suffixes: Sequence[Sequence[int]],
) -> tuple[list[FloatArray], Rows]:
    """Prefill the suffixes after a shared-length past; returns each row's last logits."""
    batch = len(suffixes)
    start = Rows(
        past,
        np.ones((batch, past_len), dtype=np.int64),
        np.full((batch,), past_len, dtype=np.int64),
    )
    logits, rows = extend(session, start, suffixes)
    return [lg[-1] for lg in logits], rows
