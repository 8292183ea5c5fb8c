"""The route-name trie: the token paths of every answer a route set allows.

A decision needs the next-token logits at the trie's branching nodes. `TrieTail` lays those
nodes out as one tree-masked sequence, so that they can ride in the prompt's own prefill run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from grpc_router.errors import InvalidArgument


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
