"""The `other` threshold of a route set, fitted from the route set itself, without labels.

When a route set's index is built, each of its own texts (description phrases and `examples:`)
is scored against the set as a request would be, with that text left out (leave-one-out): its
phrase slot, its share of its route's BM25 document and its place among its route's top phrases
are taken away. Two distributions come out of those pseudo-queries:

- **in scope** (examples only): an example's score for its own route, the others of the route
  still there. Examples are written like requests, so this is how a request about the route
  scores. Description phrases are not: in list-style descriptions ("pin change, apr") they score
  lower than real requests, in prose ones higher, so they never stand in for requests here.
- **background** (every text): a text's score for each route it does not belong to, averaged.
  That is the level at which text *not* about a route scores in this set's own vocabulary and
  style. (Capped at the median of the texts' scores for their own route, which it only reaches
  when routes paraphrase each other; the lint flags those.)

The thresholds, with q = `other_quantile` and n0 = `other_prior_examples`:

- set level: the background, moved towards the q-quantile of all the set's in-scope scores by
  N / (N + n0) for N examples (no examples: the background itself);
- a route with n examples: the set level, moved towards the q-quantile of its own examples'
  scores by n / (n + n0). With a few dozen examples a route's low quantile is close to its
  least typical example's score, so n0 keeps one odd example from deciding alone;
- a route without examples: the background (its requests score on the descriptions' scale).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from grpc_router.engines.encoder.phrases import Bm25, terms
from grpc_router.engines.encoder.scoring import RouteIndex, Scores, route_scores, token_interaction
from grpc_router.settings.engines import EncoderSettings

FALLBACK_THRESHOLD = 0.17
"""The threshold when nothing can be fitted (a one-route set): the old fixed default, the 1%
quantile of in-scope best scores on the development sets, descriptions only."""
FIT_BUDGET_MACS = 1e10
"""Most multiply-adds spent scoring pseudo-queries for one route set (about a second on one
core); a larger set scores an even sample of its texts across routes."""
_CHUNK_CELLS = 1 << 23
"""Phrase tokens x pseudo-query tokens per matrix product (32 MiB of float32)."""

Mode = Literal["auto", "fixed", "off"]


@dataclass(frozen=True, slots=True)
class PseudoScores:
    """A route set's own texts scored against it, each with itself left out."""

    phrase: npt.NDArray[np.intp]
    """(n,) which text of the index (`RouteIndex.texts`) each row is."""
    owner: npt.NDArray[np.intp]
    """(n,) the route the text belongs to."""
    is_example: npt.NDArray[np.bool_]
    scores: Scores
    """(n, routes) the text's route scores, itself left out."""
    skipped: int = 0
    """Texts not scored because of `FIT_BUDGET_MACS`."""

    @property
    def own(self) -> Scores:
        """(n,) each text's score for its own route."""
        own: Scores = self.scores[np.arange(len(self.owner)), self.owner]
        return own

    @property
    def nbytes(self) -> int:
        return int(
            self.phrase.nbytes + self.owner.nbytes + self.is_example.nbytes + self.scores.nbytes
        )


def pseudo_order(index: RouteIndex) -> list[int]:
    """Texts round-robin across routes, each route's examples before its phrases, so that a
    budget cut leaves an even sample."""
    per_route: list[list[int]] = [[] for _ in index.names]
    for j in np.flatnonzero(index.is_example):
        per_route[int(index.owners[j])].append(int(j))
    for j in np.flatnonzero(~index.is_example):
        per_route[int(index.owners[j])].append(int(j))
    order: list[int] = []
    for depth in range(max((len(p) for p in per_route), default=0)):
        order += [p[depth] for p in per_route if depth < len(p)]
    return order


def pseudo_scores(
    index: RouteIndex,
    bm25: Bm25,
    s: EncoderSettings,
    budget: float = FIT_BUDGET_MACS,
) -> PseudoScores:
    """Score each text of the route set (within `budget`) as a request, itself left out: the
    same `route_scores` as a real request, so both live on one scale."""
    dim, total_tokens = index.phrase_tokens.shape
    chosen: list[int] = []
    spent = 0.0
    order = pseudo_order(index)
    for j in order:
        cost = float(index.token_counts[j]) * total_tokens * dim
        if spent + cost > budget:
            break
        spent += cost
        chosen.append(j)
    rows = np.asarray(chosen, dtype=np.intp)
    n_routes = len(index.names)
    scores = np.zeros((len(rows), n_routes))
    starts, lengths = index.token_starts, index.token_counts.astype(np.intp)
    begin = 0
    while begin < len(rows):
        # A chunk of pseudo-queries whose tokens together fit _CHUNK_CELLS.
        end, cells = begin, 0
        while end < len(rows) and (
            end == begin or cells + lengths[rows[end]] * total_tokens <= _CHUNK_CELLS
        ):
            cells += int(lengths[rows[end]]) * total_tokens
            end += 1
        chunk = rows[begin:end]
        tokens = np.concatenate(
            [index.phrase_tokens[:, starts[j] : starts[j] + lengths[j]].T for j in chunk]
        )
        offsets = np.concatenate([[0], np.cumsum(lengths[chunk])[:-1]]).astype(np.intp)
        sims = (index.phrases[chunk] @ index.phrases.T).astype(np.float64)
        if s.token_weight > 0:
            sims += s.token_weight * token_interaction(index, tokens, offsets)
        local = np.arange(len(chunk))
        sims[local, chunk] = -np.inf  # the text itself is left out
        counts = np.repeat(index.counts[None, :], len(chunk), axis=0)
        counts[local, index.owners[chunk]] -= 1
        whole = (index.phrases[chunk] @ index.whole.T).astype(np.float64)
        scores[begin:end] = route_scores(index, sims, whole, s, counts)
        begin = end
    if s.lexical_weight > 0:
        for i, j in enumerate(rows):
            words = terms(index.texts[j])
            scores[i] += s.lexical_weight * bm25.row(
                words, minus=(int(index.owners[j]), Counter(words))
            )
    return PseudoScores(
        phrase=rows,
        owner=index.owners[rows].astype(np.intp),
        is_example=index.is_example[rows].astype(bool),
        scores=scores,
        skipped=len(order) - len(rows),
    )


@dataclass(frozen=True, slots=True)
class OtherFit:
    """The `other` thresholds of one route set: `other` wins when the best route's score is
    below that route's threshold."""

    mode: Mode
    source: str
    """auto: "examples", "descriptions" or "fallback"; fixed: "config"; off: "off"."""
    threshold: float | None
    """The set-level threshold: the background moved towards the in-scope quantile by all the
    set's examples (None when off)."""
    route_thresholds: tuple[float, ...]
    """Per route, in route order (empty when off): from the route's own examples where it has
    some, else the background (auto), or the fixed value."""
    route_examples: tuple[int, ...] = ()
    """Per route, the examples its threshold was fitted from (0: none, not its own)."""
    background: float | None = None
    """Mean score of the set's texts for the routes they do not belong to."""
    in_scope: float | None = None
    """The `other_quantile` of the examples' own-route leave-one-out scores."""
    quantile: float | None = None
    examples: int = 0
    """Examples scored as in-scope pseudo-queries."""
    pseudo_queries: int = 0
    skipped: int = 0

    def logit(self, route: int) -> float:
        """The `other` logit when `route` is the best route."""
        return self.route_thresholds[route] if self.route_thresholds else -math.inf

    def summary(self, names: Sequence[str]) -> dict[str, Any]:
        """The fields of the fit's log line."""
        out: dict[str, Any] = {
            "mode": self.mode,
            "source": self.source,
            "threshold": _round(self.threshold),
        }
        if self.mode == "auto":
            out.update(
                background=_round(self.background),
                in_scope=_round(self.in_scope),
                quantile=self.quantile,
                examples=self.examples,
                pseudo_queries=self.pseudo_queries,
            )
            if self.skipped:
                out["skipped"] = self.skipped
            own = {
                n: round(t, 4)
                for n, t, k in zip(names, self.route_thresholds, self.route_examples, strict=True)
                if k
            }
            if own:
                out["route_thresholds"] = own
        return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def fit_other(
    n_routes: int, pseudo: PseudoScores | None, s: EncoderSettings, quantile: float | None = None
) -> OtherFit:
    """The thresholds `s.other_threshold` asks for: a number is fixed for every route, None
    never answers `other`, "auto" fits them from `pseudo` (see the module note). `quantile`
    overrides `s.other_quantile` (the eval's trade-off curve)."""
    if s.other_threshold is None:
        return OtherFit("off", "off", None, ())
    if not isinstance(s.other_threshold, str):
        value = float(s.other_threshold)
        return OtherFit("fixed", "config", value, (value,) * n_routes, (0,) * n_routes)
    q = s.other_quantile if quantile is None else quantile
    none = (0,) * n_routes
    if pseudo is None or n_routes < 2 or len(pseudo.owner) == 0:
        fallback = (FALLBACK_THRESHOLD,) * n_routes
        return OtherFit("auto", "fallback", FALLBACK_THRESHOLD, fallback, none, quantile=q)
    foreign = np.ones(pseudo.scores.shape, dtype=bool)
    foreign[np.arange(len(pseudo.owner)), pseudo.owner] = False
    # Routes that paraphrase each other make "foreign" texts about the route after all: the
    # background never exceeds what the set's texts typically score for their own route.
    background = min(float(pseudo.scores[foreign].mean()), float(np.median(pseudo.own)))
    own = pseudo.own[pseudo.is_example]
    owners = pseudo.owner[pseudo.is_example]
    if own.size == 0:
        return OtherFit(
            "auto",
            "descriptions",
            background,
            (background,) * n_routes,
            none,
            background=background,
            quantile=q,
            pseudo_queries=len(pseudo.owner),
            skipped=pseudo.skipped,
        )
    n0 = s.other_prior_examples
    in_scope = float(np.quantile(own, q))
    threshold = background + own.size / (own.size + n0) * (in_scope - background)
    per_route, counts = [], []
    for r in range(n_routes):
        mine = own[owners == r]
        counts.append(int(mine.size))
        if mine.size == 0:
            per_route.append(background)
            continue
        route_q = float(np.quantile(mine, q))
        per_route.append(threshold + mine.size / (mine.size + n0) * (route_q - threshold))
    return OtherFit(
        "auto",
        "examples",
        threshold,
        tuple(per_route),
        tuple(counts),
        background=background,
        in_scope=in_scope,
        quantile=q,
        examples=int(own.size),
        pseudo_queries=len(pseudo.owner),
        skipped=pseudo.skipped,
    )
