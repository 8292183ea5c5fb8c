"""From trie-node logits to a decision: the greedy route and every route's probability."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from grpc_router.engines.arch_router.runtime import FloatArray
from grpc_router.engines.arch_router.trie import Trie


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


def normalise(trie: Trie, node_logits: dict[int, FloatArray]) -> Outcome:
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
        return normalise(trie, node_logits)
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
