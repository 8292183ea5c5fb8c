"""Route-set lint: what in a route set will make the encoder hesitate or answer wrongly.

Everything is read off the route set's own index, with the same leave-one-out scores that fit
the `other` thresholds (`fit.pseudo_scores`): each description phrase and example scored as a
request against the set, itself left out.

- **overlap** (a pair of routes): their descriptions are close (cosine of the "name:
  description" embeddings at least `DESCRIPTION_SIMILARITY`), or phrases or examples of one
  collide with the other's (cosine at least `COLLISION`), or at least `CROSSOVER` of one route's
  texts (two or more) score the other route highest: requests like them will go there.
- **example_elsewhere**: an example that, left out, scores another route higher than its own: a
  request like it will go there.
- **vague** (a route): its own texts, left out, barely prefer it: the margin of their score for
  the route over their score for each other route (median over its texts), taken at the median
  over the other routes, is below `VAGUE_MARGIN`. Such a description does not say what sets the
  route apart from any other (where overlap is about one other route).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from grpc_router.engines.encoder.scoring import RouteIndex

if TYPE_CHECKING:
    from grpc_router.engines.encoder.fit import PseudoScores

DESCRIPTION_SIMILARITY = 0.7
"""Cosine between two routes' "name: description" embeddings from which they overlap."""
COLLISION = 0.75
"""Cosine between a phrase or example of one route and one of another from which they collide
(paraphrases score about 0.75 and up with all-MiniLM-L6-v2)."""
CROSSOVER = 0.5
"""Share of a route's texts (at least two) whose best route is another one, from which the pair
overlaps."""
VAGUE_MARGIN = 0.05
"""Route-score margin (median over the other routes) under which a route's own texts do not
separate it from the others."""
MAX_PAIRS = 3
"""Colliding text pairs reported per overlap."""

Kind = Literal["overlap", "example_elsewhere", "vague"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing the lint flags."""

    kind: Kind
    routes: tuple[str, ...]
    """overlap: the pair; example_elsewhere: (its route, the route it goes to); vague: one."""
    score: float
    """overlap: the strongest similarity (description or text pair); example_elsewhere: how
    much higher the other route scores; vague: the margin (lower is vaguer)."""
    message: str
    """One sentence saying what was found."""
    pairs: tuple[tuple[str, str, float], ...] = ()
    """overlap: colliding (text of the first route, text of the second, cosine)."""
    text: str = ""
    """example_elsewhere: the example."""
    details: dict[str, float] = field(default_factory=dict)
    """The measures behind the finding, rounded."""

    def line(self) -> str:
        """A short single-line form for logs."""
        return f"{self.kind} {'/'.join(self.routes)}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "routes": list(self.routes),
            "score": round(self.score, 4),
            "message": self.message,
            "pairs": [{"a": a, "b": b, "similarity": round(s, 4)} for a, b, s in self.pairs],
            "text": self.text,
            "details": self.details,
        }


def lint_index(index: RouteIndex) -> Iterator[Finding]:
    """Findings for a route set whose index holds its pseudo-query scores; overlaps first, then
    vague routes, then examples that go elsewhere (each group strongest first)."""
    pseudo = index.pseudo
    if pseudo is None or len(index.names) < 2:
        return
    yield from sorted(_overlaps(index, pseudo), key=lambda f: -f.score)
    yield from sorted(_vague(index.names, pseudo), key=lambda f: f.score)
    yield from sorted(_examples_elsewhere(index, pseudo), key=lambda f: -f.score)


@dataclass(frozen=True, slots=True)
class _Similarities:
    """What the overlap check compares for every pair of routes."""

    texts: npt.NDArray[np.object_]
    """(phrases,) the index's texts."""
    whole: npt.NDArray[np.float64]
    """(routes, routes) cosine of the "name: description" embeddings."""
    phrases: npt.NDArray[np.float64]
    """(phrases, phrases) cosine of the phrases and examples."""
    crossover: npt.NDArray[np.float64]
    """(routes, routes) [a, b]: share of a's scored texts whose best route is b."""
    scored: npt.NDArray[np.intp]
    """(routes,) how many of each route's texts were scored."""


def _similarities(index: RouteIndex, pseudo: PseudoScores) -> _Similarities:
    """The description and text similarities of a route set, and where its texts score best."""
    n_routes = len(index.names)
    crossover = np.zeros((n_routes, n_routes))
    best = pseudo.scores.argmax(axis=1)
    for a in range(n_routes):
        mine = pseudo.owner == a
        if mine.any():
            crossover[a] = np.bincount(best[mine], minlength=n_routes) / mine.sum()
    return _Similarities(
        texts=np.asarray(index.texts, dtype=object),
        whole=(index.whole @ index.whole.T).astype(np.float64),
        phrases=(index.phrases @ index.phrases.T).astype(np.float64),
        crossover=crossover,
        scored=np.bincount(pseudo.owner, minlength=n_routes),
    )


def _overlaps(index: RouteIndex, pseudo: PseudoScores) -> list[Finding]:
    """An overlap finding for each pair of routes that overlaps, in pair order."""
    sims = _similarities(index, pseudo)
    n_routes = len(index.names)
    found = (_overlap(index, sims, a, b) for a in range(n_routes) for b in range(a + 1, n_routes))
    return [f for f in found if f is not None]


def _overlap(index: RouteIndex, sims: _Similarities, a: int, b: int) -> Finding | None:
    """Routes a and b overlap when their descriptions are close, texts of theirs collide, or
    enough of one's texts score the other highest; None when none of that holds."""
    names = index.names
    ia = np.flatnonzero(index.owners == a)
    ib = np.flatnonzero(index.owners == b)
    block = sims.phrases[np.ix_(ia, ib)]
    hits = np.argwhere(block >= COLLISION)
    strongest = hits[np.argsort(-block[hits[:, 0], hits[:, 1]])][:MAX_PAIRS]
    pairs = tuple(
        (str(sims.texts[ia[i]]), str(sims.texts[ib[j]]), float(block[i, j])) for i, j in strongest
    )
    cross_ab = sims.crossover[a, b] if sims.scored[a] >= 2 else 0.0
    cross_ba = sims.crossover[b, a] if sims.scored[b] >= 2 else 0.0
    similar = float(sims.whole[a, b])
    if not (pairs or similar >= DESCRIPTION_SIMILARITY or max(cross_ab, cross_ba) >= CROSSOVER):
        return None
    reasons = []
    if similar >= DESCRIPTION_SIMILARITY:
        reasons.append(f"descriptions {similar:.2f} similar")
    if pairs:
        reasons.append(
            f"{len(hits)} text pair(s) collide, e.g. {pairs[0][0]!r} ~ {pairs[0][1]!r} "
            f"({pairs[0][2]:.2f})"
        )
    for src, dst, share in ((a, b, cross_ab), (b, a, cross_ba)):
        if share >= CROSSOVER:
            reasons.append(f"{share:.0%} of {names[src]}'s texts score {names[dst]} highest")
    return Finding(
        "overlap",
        (names[a], names[b]),
        max(similar, pairs[0][2] if pairs else 0.0),
        "; ".join(reasons),
        pairs=pairs,
        details={
            "description_similarity": round(similar, 4),
            "crossover_ab": round(float(cross_ab), 4),
            "crossover_ba": round(float(cross_ba), 4),
        },
    )


def _vague(names: tuple[str, ...], pseudo: PseudoScores) -> list[Finding]:
    """A vague finding for each route whose own texts, left out, barely prefer it over the
    others (median margin below `VAGUE_MARGIN`), in route order."""
    scores, owner, own = pseudo.scores, pseudo.owner, pseudo.own
    n_routes = len(names)
    vague = []
    for a in range(n_routes):
        mine = owner == a
        if not mine.any():
            continue
        margins = [float(np.median(own[mine] - scores[mine, b])) for b in range(n_routes) if b != a]
        margin = float(np.median(margins))
        if margin < VAGUE_MARGIN:
            vague.append(
                Finding(
                    "vague",
                    (names[a],),
                    margin,
                    f"its own texts score it only {margin:.2f} above the other routes (median): "
                    "say what sets it apart, or add examples",
                    details={"margin": round(margin, 4), "least": round(min(margins), 4)},
                )
            )
    return vague


def _examples_elsewhere(index: RouteIndex, pseudo: PseudoScores) -> list[Finding]:
    """An example_elsewhere finding for each example that, left out, scores another route
    higher than its own, in index order."""
    names = index.names
    scores, owner, own = pseudo.scores, pseudo.owner, pseudo.own
    elsewhere = []
    for i in np.flatnonzero(pseudo.is_example):
        a = int(owner[i])
        others = scores[i].copy()
        others[a] = -np.inf
        b = int(np.argmax(others))
        if others[b] > own[i]:
            gap = float(others[b] - own[i])
            elsewhere.append(
                Finding(
                    "example_elsewhere",
                    (names[a], names[b]),
                    gap,
                    f"left out, it scores {names[b]} {others[b]:.2f} against {names[a]} "
                    f"{own[i]:.2f}",
                    text=str(index.texts[pseudo.phrase[i]]),
                    details={"own": round(float(own[i]), 4), "other": round(float(others[b]), 4)},
                )
            )
    return elsewhere
