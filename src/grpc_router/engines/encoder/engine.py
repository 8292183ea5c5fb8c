"""The encoder engine: zero-shot routing by sentence-embedding similarity (all-MiniLM-L6-v2).

Routes: each route is embedded as "name: description" and as each phrase of its description
(plus its optional `examples:`), once per route set. A text's score for a route is a weighted mix
of the mean of its best phrase similarities and its whole-description similarity, plus a small
lexical (BM25) term for the words it shares with the route's text.

Conversation: turns are read latest first, earlier turns as decaying context (assistant turns
weaker), each turn weighted further by how strongly it matches any route, so that "Okay, thanks."
adds little. Reading stops as soon as the best route leads by `context_margin`: a request that is
clear on its own decides alone (faster, and a topic switch is not dragged back to the old topic).

Probabilities: a softmax over route scores plus an `other` logit at `other_threshold`, at a
temperature calibrated on labelled data (`grpc-router eval --calibrate`).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import structlog
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from grpc_router.engines.encoder.embedding import Embedding, EmbeddingModel
from grpc_router.engines.encoder.phrases import bm25_table, humanize, split_phrases, terms
from grpc_router.errors import EngineUnavailable, InvalidArgument, Overloaded
from grpc_router.settings.engines import EncoderSettings
from grpc_router.types import OTHER_ROUTE, Decision, Message, Role, RouteSpec, route_set_key

log = structlog.get_logger(__name__)

Scores = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class RouteIndex:
    """The embedded form of one route set."""

    names: tuple[str, ...]
    whole: npt.NDArray[np.float32]
    """(routes, dim): "name: description"."""
    phrases: npt.NDArray[np.float32]
    """(phrases, dim), all routes' phrases and examples."""
    slots: npt.NDArray[np.intp]
    """(routes, most phrases of a route): index into `phrases`, -1 where a route has fewer."""
    counts: npt.NDArray[np.intp]
    phrase_tokens: npt.NDArray[np.float32]
    """(all phrases' tokens, dim), phrase after phrase."""
    token_starts: npt.NDArray[np.intp]
    """(phrases,) offset of each phrase's first row in `phrase_tokens`."""
    token_counts: npt.NDArray[np.float64]
    lexical: dict[str, npt.NDArray[np.float64]]
    """term -> (routes,) BM25 weight (`phrases.bm25_table`)."""


def route_texts(route: RouteSpec) -> tuple[str, list[str]]:
    """("name: description", phrases + examples) of a route."""
    name = humanize(route.name)
    whole = f"{name}: {route.description}" if route.description else name
    phrases = split_phrases(route.description) or [name]
    return whole, list(dict.fromkeys([*phrases, *route.examples]))


def validate_routes(routes: Sequence[RouteSpec]) -> None:
    if not routes:
        raise InvalidArgument("routes", "at least one route is required")
    seen: set[str] = set()
    for i, route in enumerate(routes):
        if not route.name.strip():
            raise InvalidArgument(f"routes[{i}].name", "must not be empty")
        if route.name == OTHER_ROUTE:
            raise InvalidArgument(f"routes[{i}].name", f"{OTHER_ROUTE!r} is reserved")
        if route.name in seen:
            raise InvalidArgument(f"routes[{i}].name", f"duplicate route name {route.name!r}")
        if not route.description.strip() and not route.examples:
            raise InvalidArgument(
                f"routes[{i}].description", "needs a description (or examples) to route on"
            )
        seen.add(route.name)


def context_turns(
    messages: Sequence[Message], limit: int, roles: tuple[Role, ...] = (Role.USER, Role.ASSISTANT)
) -> list[tuple[Role, str]]:
    """Non-empty user and assistant turns, latest first, starting at the latest user turn's
    neighbourhood; raises when there is no user turn."""
    turns: list[tuple[Role, str]] = [
        (m.role, m.content.strip()) for m in messages if m.role in roles and m.content.strip()
    ]
    if not any(role is Role.USER for role, _ in turns):
        raise InvalidArgument("messages", "needs at least one non-empty user message")
    return turns[::-1][:limit]


def text_scores(
    index: RouteIndex, raw: Sequence[str], texts: Sequence[Embedding], s: EncoderSettings
) -> Scores:
    """(texts, routes) route scores of each text (`raw`) and its embedding (`texts`)."""
    vectors = np.stack([t.vector for t in texts])
    sims = (vectors @ index.phrases.T).astype(np.float64)
    if s.token_weight > 0:
        for i, text in enumerate(texts):
            best_token = (index.phrase_tokens @ text.tokens.T).max(axis=1)
            per_phrase = np.add.reduceat(best_token, index.token_starts) / index.token_counts
            sims[i] += s.token_weight * per_phrase
    padded = np.where(index.slots >= 0, sims[:, index.slots], -np.inf)
    best = -np.sort(-padded, axis=2)
    k = np.minimum(index.counts, s.phrase_top_k)
    rank = np.arange(best.shape[2])
    top = np.where(rank[None, None, :] < k[None, :, None], best, 0.0).sum(axis=2) / k
    whole = (vectors @ index.whole.T).astype(np.float64)
    w = s.description_weight
    result: Scores = (top + w * whole) / (1.0 + s.token_weight + w)
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


def probabilities(scores: Scores, s: EncoderSettings) -> Scores:
    """Softmax over routes plus `other` (last)."""
    other = s.other_threshold if s.other_threshold is not None else -math.inf
    logits = np.append(scores, other) / s.temperature
    logits -= logits.max()
    p = np.exp(logits)
    result: Scores = p / p.sum()
    return result


class EncoderEngine:
    """Routes by embedding similarity with an encoder artifact on onnxruntime (CPU)."""

    def __init__(self, artifact: Path, settings: EncoderSettings | None = None) -> None:
        self._artifact = Path(artifact)
        self._settings = settings or EncoderSettings()
        self._model: EmbeddingModel | None = None
        self._ready = False
        self._start_lock = asyncio.Lock()
        self._index_lock = threading.Lock()
        self._indexes: OrderedDict[str, RouteIndex] = OrderedDict()
        self._executor: ThreadPoolExecutor | None = None
        self._turn_pool: ThreadPoolExecutor | None = None
        self._blas_limit: threadpool_limits | None = None
        self._pending = 0

    @property
    def name(self) -> str:
        return "encoder"

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def settings(self) -> EncoderSettings:
        return self._settings

    @property
    def model(self) -> EmbeddingModel | None:
        return self._model

    async def start(self) -> None:
        async with self._start_lock:
            if self._ready:
                return
            s = self._settings
            self._model = await asyncio.to_thread(
                EmbeddingModel,
                self._artifact,
                variant=s.variant,
                threads=s.threads,
                max_length=s.max_length,
                cache_size=s.text_cache,
            )
            if s.blas_threads is not None:
                self._blas_limit = threadpool_limits(limits=s.blas_threads, user_api="blas")
            self._executor = ThreadPoolExecutor(s.workers, thread_name_prefix="encoder")
            if s.turn_threads > 1:
                self._turn_pool = ThreadPoolExecutor(s.turn_threads, thread_name_prefix="turns")
            if s.warmup:
                await asyncio.to_thread(self._model.embed, "Hello, can you help me?")
            log.info("encoder loaded", **self._model.summary, threads=s.threads)
            self._ready = True

    async def decide(
        self,
        messages: Sequence[Message],
        routes: Sequence[RouteSpec],
        *,
        full_scores: bool = True,
    ) -> Decision:
        if self._model is None or self._executor is None:
            raise EngineUnavailable("encoder engine is not started")
        validate_routes(routes)
        context_turns(messages, self._settings.max_context_messages)
        if self._pending >= self._settings.max_queue:
            raise Overloaded(f"encoder queue is full ({self._settings.max_queue} waiting)")
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._executor, self.decide_sync, tuple(messages), tuple(routes), full_scores
            )
        finally:
            self._pending -= 1

    def decide_sync(
        self, messages: Sequence[Message], routes: Sequence[RouteSpec], full_scores: bool = True
    ) -> Decision:
        """One decision on the calling thread (the executor's, or a benchmark's)."""
        start = time.perf_counter()
        index = self.index(routes)
        t_index = time.perf_counter()
        scores, tokens, cached = self.raw_scores(messages, index)
        s = self._settings
        p = probabilities(scores, s)
        names = [*index.names, OTHER_ROUTE]
        best = int(p.argmax())
        end = time.perf_counter()
        return Decision(
            route=names[best],
            confidence=float(p[best]),
            scores={n: float(v) for n, v in zip(names, p, strict=True)} if full_scores else {},
            engine=self.name,
            timings_ms={
                "route_index": (t_index - start) * 1e3,
                "embed_score": (end - t_index) * 1e3,
                "total": (end - start) * 1e3,
            },
            prompt_tokens=tokens,
            cached_tokens=cached,
        )

    def raw_scores(self, messages: Sequence[Message], index: RouteIndex) -> tuple[Scores, int, int]:
        """Route scores of a conversation (before the softmax), tokens embedded, tokens cached."""
        assert self._model is not None
        s = self._settings
        roles = (Role.USER, Role.ASSISTANT) if s.assistant_weight > 0 else (Role.USER,)
        turns = context_turns(messages, s.max_context_messages, roles)
        turn_roles = [role for role, _ in turns]
        if s.context_margin is None:
            texts = [text for _, text in turns]
            if self._turn_pool is not None and len(texts) > 1:
                results = list(self._turn_pool.map(self._model.embed, texts))
            else:
                results = [self._model.embed(t) for t in texts]
            per_text = text_scores(index, texts, [found for found, _ in results], s)
            combined, _ = conversation_scores(turn_roles, per_text, s)
        else:
            # Latest first, one turn at a time (the latest user turn at least), until the
            # combined scores clear the margin: older turns are embedded only when needed.
            first = next((i for i, role in enumerate(turn_roles) if role is Role.USER), 0)
            results, rows = [], []
            for j, (_, text) in enumerate(turns):
                results.append(self._model.embed(text))
                rows.append(text_scores(index, [text], [results[-1][0]], s)[0])
                if j < first:
                    continue
                combined, _ = conversation_scores(turn_roles[: j + 1], np.stack(rows), s)
                if score_margin(combined) >= s.context_margin:
                    break
        tokens = sum(found.token_count for found, _ in results)
        cached = sum(found.token_count for found, hit in results if hit)
        return combined, tokens, cached

    def index(self, routes: Sequence[RouteSpec]) -> RouteIndex:
        """The route set's embeddings, from the cache or computed now."""
        assert self._model is not None
        key = route_set_key(routes)
        with self._index_lock:
            found = self._indexes.get(key)
            if found is not None:
                self._indexes.move_to_end(key)
                return found
        wholes, phrase_texts, owners = [], [], []
        for i, route in enumerate(routes):
            whole, texts = route_texts(route)
            wholes.append(whole)
            phrase_texts += texts
            owners += [i] * len(texts)
        counts = np.bincount(np.asarray(owners), minlength=len(routes)).astype(np.intp)
        slots = np.full((len(routes), int(counts.max())), -1, dtype=np.intp)
        fill = np.zeros(len(routes), dtype=np.intp)
        for j, owner in enumerate(owners):
            slots[owner, fill[owner]] = j
            fill[owner] += 1
        phrases = self._model.embed_many(phrase_texts)
        token_counts = np.asarray([len(p.tokens) for p in phrases], dtype=np.intp)
        index = RouteIndex(
            names=tuple(r.name for r in routes),
            whole=np.stack([e.vector for e in self._model.embed_many(wholes)]),
            phrases=np.stack([p.vector for p in phrases]),
            slots=slots,
            counts=counts,
            phrase_tokens=np.concatenate([p.tokens for p in phrases]),
            token_starts=np.concatenate([[0], np.cumsum(token_counts)[:-1]]).astype(np.intp),
            token_counts=token_counts.astype(np.float64),
            lexical=bm25_table(
                [" ".join([whole, *r.examples]) for whole, r in zip(wholes, routes, strict=True)]
            ),
        )
        with self._index_lock:
            self._indexes[key] = index
            while len(self._indexes) > self._settings.route_set_cache:
                self._indexes.popitem(last=False)
        return index

    async def close(self) -> None:
        self._ready = False
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._turn_pool is not None:
            self._turn_pool.shutdown(wait=True)
            self._turn_pool = None
        if self._blas_limit is not None:
            self._blas_limit.restore_original_limits()
            self._blas_limit = None
        self._model = None
