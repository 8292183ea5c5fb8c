"""Route scores from embeddings: the route index of a route set, a text's score for each route,
conversation scores and the softmax with `other`.

A text's score for a route mixes the mean of its `phrase_top_k` best phrase similarities (cosine
plus token-level late interaction), the whole-description similarity and a small BM25 term. The
same functions score real requests (`text_scores`) and the route set's own texts left out one at
a time (`grpc_router.engines.encoder.fit`), so that both live on one scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from grpc_router.engines.encoder.embedding import Embedding
from grpc_router.engines.encoder.phrases import humanize, split_phrases, terms
from grpc_router.settings.engines import EncoderSettings
from grpc_router.types import Role, RouteSpec

if TYPE_CHECKING:
    from grpc_router.engines.encoder.fit import OtherFit, PseudoScores
    from grpc_router.engines.encoder.lint import Finding

Scores = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class RouteIndex:
    """The embedded form of one route set, with its fitted `other` thresholds and lint."""

    names: tuple[str, ...]
    whole: npt.NDArray[np.float32]
    """(routes, dim): "name: description"."""
    phrases: npt.NDArray[np.float32]
    """(phrases, dim), all routes' phrases and examples."""
    slots: npt.NDArray[np.intp]
    """(routes, most phrases of a route): index into `phrases`, -1 where a route has fewer."""
    counts: npt.NDArray[np.intp]
    phrase_tokens: npt.NDArray[np.float32]
    """(dim, all phrases' tokens): the token vectors as columns, phrase after phrase, so that a
    text's tokens (rows) multiply it in one product whose per-token maxima run along rows,
    not across a short axis."""
    token_starts: npt.NDArray[np.intp]
    """(phrases,) offset of each phrase's first column in `phrase_tokens`."""
    token_counts: npt.NDArray[np.float64]
    lexical: dict[str, npt.NDArray[np.float64]]
    """term -> (routes,) BM25 weight (`phrases.bm25_table`)."""
    texts: tuple[str, ...] = ()
    """(phrases,) the text of each phrase or example."""
    owners: npt.NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, dtype=np.intp))
    """(phrases,) the route each phrase belongs to."""
    is_example: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, dtype=bool))
    """(phrases,) True for an `examples:` utterance, False for a description phrase."""
    other: OtherFit | None = None
    """The `other` thresholds in force for this route set (`fit.fit_other`)."""
    pseudo: PseudoScores | None = None
    """The route set's own texts scored against it, each left out (`fit.pseudo_scores`)."""
    findings: tuple[Finding, ...] = ()
    """What `lint.lint_index` flags in this route set."""
    nbytes: int = 0
    """About how much memory the index holds (the route-set cache's byte bound counts this)."""

    def other_logit(self, read: Conversation) -> float:
        """The `other` logit of a conversation read: `other` wins exactly when no turn read
        scores the best route at or above that route's threshold (-inf when `other` is off).
        One turn: the threshold itself."""
        if self.other is None:
            return -math.inf
        best = int(np.argmax(read.scores))
        threshold = self.other.logit(best)
        # The combined score is a weighted mean of the turns' scores, so at most their best:
        # moving the logit down by the difference compares the best turn with the threshold.
        return threshold - (float(read.evidence[best]) - float(read.scores[best]))


@dataclass(frozen=True, slots=True)
class Conversation:
    """A conversation as the engine read it."""

    scores: Scores
    """(routes,) the combined route scores."""
    turns: Scores
    """(turns read, routes) each turn's route scores, latest first."""
    tokens: int = 0
    """Tokens embedded."""
    cached: int = 0
    """Of which from the turn cache."""

    @property
    def evidence(self) -> Scores:
        """(routes,) the best score of each route over the turns read: whether any turn read is
        about a route, which is what `other` asks (a vague last turn such as "yes, please"
        scores low on its own, yet the conversation it ends is in scope)."""
        best: Scores = self.turns.max(axis=0)
        return best


def route_texts(route: RouteSpec) -> tuple[str, list[str], int]:
    """("name: description", phrases + examples, how many of them are description phrases)."""
    name = humanize(route.name)
    whole = f"{name}: {route.description}" if route.description else name
    phrases = list(dict.fromkeys(split_phrases(route.description) or [name]))
    examples = [e for e in dict.fromkeys(route.examples) if e not in phrases]
    return whole, [*phrases, *examples], len(phrases)


def lexical_documents(routes: Sequence[RouteSpec], wholes: Sequence[str]) -> list[str]:
    """Each route's BM25 document: "name: description" and its examples."""
    return [" ".join([whole, *r.examples]) for whole, r in zip(wholes, routes, strict=True)]


def token_interaction(
    index: RouteIndex, tokens: npt.NDArray[np.float32], starts: npt.NDArray[np.intp]
) -> Scores:
    """(texts, phrases): for each text (its token rows begin at `starts` in `tokens`) and each
    phrase, the mean over the phrase's tokens of the best cosine with one of the text's."""
    best = np.maximum.reduceat(tokens @ index.phrase_tokens, starts, axis=0)
    per_phrase = np.add.reduceat(best, index.token_starts, axis=1)
    out: Scores = per_phrase / index.token_counts[None, :]
    return out


def route_scores(
    index: RouteIndex,
    sims: Scores,
    whole: Scores,
    s: EncoderSettings,
    counts: npt.NDArray[np.intp] | None = None,
) -> Scores:
    """(texts, routes) from phrase similarities (texts, phrases) and whole-description
    similarities (texts, routes): the mean of each route's `phrase_top_k` best phrases mixed
    with the whole description. `counts` (texts, routes) overrides how many phrases each route
    has for each text (a phrase left out is -inf in `sims`)."""
    padded = np.where(index.slots >= 0, sims[:, index.slots], -np.inf)
    best = -np.sort(-padded, axis=2)
    k = np.minimum(index.counts[None, :] if counts is None else counts, s.phrase_top_k)
    rank = np.arange(best.shape[2])
    top = np.where(rank[None, None, :] < k[:, :, None], best, 0.0).sum(axis=2) / np.maximum(k, 1)
    w = s.description_weight
    result: Scores = (top + w * whole) / (1.0 + s.token_weight + w)
    return result


def text_scores(
    index: RouteIndex, raw: Sequence[str], texts: Sequence[Embedding], s: EncoderSettings
) -> Scores:
    """(texts, routes) route scores of each text (`raw`) and its embedding (`texts`)."""
    vectors = np.stack([t.vector for t in texts])
    sims = (vectors @ index.phrases.T).astype(np.float64)
    if s.token_weight > 0:
        for i, text in enumerate(texts):
            best_token = (text.tokens @ index.phrase_tokens).max(axis=0)
            per_phrase = np.add.reduceat(best_token, index.token_starts) / index.token_counts
            sims[i] += s.token_weight * per_phrase
    whole = (vectors @ index.whole.T).astype(np.float64)
    result = route_scores(index, sims, whole, s)
    if s.lexical_weight > 0:
        result += s.lexical_weight * lexical_scores(index, raw)
    return result


def lexical_scores(index: RouteIndex, raw: Sequence[str]) -> Scores:
    """(texts, routes) BM25 scores. Exact words are evidence the embedding can miss in long
    prose descriptions ("bus", "therapist"); the weight stays small because shared words are
    also what confuses list-style routes ("card" in banking and credit cards)."""
    out = np.zeros((len(raw), len(index.names)))
    for i, text in enumerate(raw):
        for term in set(terms(text)):
            row = index.lexical.get(term)
            if row is not None:
                out[i] += row
    return out


def score_margin(scores: Scores) -> float:
    """Best minus second-best route score (inf with one route)."""
    if scores.size < 2:
        return math.inf
    top = np.partition(scores, scores.size - 2)[-2:]
    return float(top[1] - top[0])


def conversation_scores(
    roles: Sequence[Role], per_text: Scores, s: EncoderSettings
) -> tuple[Scores, Scores]:
    """Combine per-turn route scores (latest first) into one row; returns (scores, weights)."""
    base = np.empty(len(roles))
    users_seen = 0
    for i, role in enumerate(roles):
        if role is Role.USER:
            base[i] = s.context_decay**users_seen
            users_seen += 1
        else:
            base[i] = s.assistant_weight * s.context_decay**users_seen
    best = per_text.max(axis=1)
    weights = base * np.exp((best - best.max()) / s.context_sharpness)
    weights /= weights.sum()
    combined: Scores = weights @ per_text
    return combined, weights


def probabilities(scores: Scores, temperature: float, other: float) -> Scores:
    """Softmax over routes plus `other` (last), whose logit is `other` (-inf: never)."""
    logits = np.append(scores, other) / temperature
    logits -= logits.max()
    p = np.exp(logits)
    result: Scores = p / p.sum()
    return result
