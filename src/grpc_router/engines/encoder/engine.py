"""The encoder engine: zero-shot routing by sentence-embedding similarity (all-MiniLM-L6-v2).

Routes: each route is embedded as "name: description" and as each phrase of its description
(plus its optional `examples:`), once per route set. A text's score for a route is a weighted mix
of the mean of its best phrase similarities and its whole-description similarity, plus a small
lexical (BM25) term for the words it shares with the route's text.

Conversation: turns are read latest first, earlier turns as decaying context (assistant turns
weaker), each turn weighted further by how strongly it matches any route, so that "Okay, thanks."
adds little. Reading stops as soon as the best route leads by `context_margin`: a request that is
clear on its own decides alone (faster, and a topic switch is not dragged back to the old topic).

Probabilities: a softmax over route scores plus an `other` logit at the best route's `other`
threshold, at a temperature calibrated on labelled data (`grpc-router eval --calibrate`). The
thresholds are fitted to each route set, without labels, when its index is built
(`grpc_router.engines.encoder.fit`); the same pass lints the set (`lint`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import structlog
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from grpc_router.engines.cpus import available_cpus
from grpc_router.engines.encoder.embedding import EmbeddingModel
from grpc_router.engines.encoder.fit import OtherFit, fit_other, pseudo_scores
from grpc_router.engines.encoder.lint import Finding, lint_index
from grpc_router.engines.encoder.phrases import Bm25
from grpc_router.engines.encoder.scoring import (
    Conversation,
    RouteIndex,
    Scores,
    conversation_scores,
    lexical_documents,
    lexical_scores,
    probabilities,
    route_texts,
    score_margin,
    text_scores,
)
from grpc_router.errors import EngineUnavailable, InvalidArgument, Overloaded
from grpc_router.settings.engines import EncoderSettings
from grpc_router.types import OTHER_ROUTE, Decision, Message, Role, RouteSpec, route_set_key

log = structlog.get_logger(__name__)

__all__ = [
    "Conversation",
    "EncoderEngine",
    "RouteIndex",
    "Scores",
    "context_turns",
    "conversation_scores",
    "lexical_scores",
    "probabilities",
    "route_texts",
    "score_margin",
    "text_scores",
    "validate_routes",
]


MAX_AUTO_THREADS = 4
"""Most intra-op threads `threads: null` gives one call."""


def intra_op_threads(s: EncoderSettings) -> int:
    """`s.threads`, or (None) the CPUs this process may use (`available_cpus`: its affinity
    and its container's CPU limit) shared among `s.workers`, at most `MAX_AUTO_THREADS`. One
    decision at a time then uses the cores an idle replica has: onnxruntime's workers spin
    between nodes, so even a short text's many small nodes run faster on more threads."""
    if s.threads is not None:
        return s.threads
    return max(1, min(MAX_AUTO_THREADS, available_cpus() // s.workers))


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


def index_nbytes(index: RouteIndex) -> int:
    """About how many bytes an index holds: its arrays, BM25 table, texts and fit."""
    arrays = sum(
        a.nbytes
        for a in (
            index.whole,
            index.phrases,
            index.slots,
            index.counts,
            index.phrase_tokens,
            index.token_starts,
            index.token_counts,
            index.owners,
            index.is_example,
        )
    )
    # A dict entry, its key and a small numpy array cost about 200 bytes beyond the data.
    lexical = sum(len(k) + v.nbytes + 200 for k, v in index.lexical.items())
    texts = sum(len(t.encode()) + 50 for t in index.texts)
    pseudo = index.pseudo.nbytes if index.pseudo is not None else 0
    return int(arrays + lexical + texts + pseudo + 64 * len(index.findings))


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
        self._index_bytes = 0
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
                threads=intra_op_threads(s),
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
            log.info("encoder loaded", **self._model.summary, threads=self._model.threads)
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
        read = self.conversation(messages, index)
        scores, tokens, cached = read.scores, read.tokens, read.cached
        s = self._settings
        p = probabilities(scores, s.temperature, index.other_logit(read))
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
        read = self.conversation(messages, index)
        return read.scores, read.tokens, read.cached

    def conversation(self, messages: Sequence[Message], index: RouteIndex) -> Conversation:
        """A conversation's route scores, with the scores of each turn read."""
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
            per_text = np.stack(rows)
        tokens = sum(found.token_count for found, _ in results)
        cached = sum(found.token_count for found, hit in results if hit)
        return Conversation(combined, per_text, tokens, cached)

    def index(self, routes: Sequence[RouteSpec]) -> RouteIndex:
        """The route set's embeddings, `other` thresholds and lint, from the cache or built
        now (and cached within `route_set_cache` sets and `route_set_cache_bytes`)."""
        assert self._model is not None
        key = route_set_key(routes)
        with self._index_lock:
            found = self._indexes.get(key)
            if found is not None:
                self._indexes.move_to_end(key)
                return found
        index = self.build_index(routes)
        self._keep(key, index)
        return index

    def build_index(self, routes: Sequence[RouteSpec], *, lint: bool | None = None) -> RouteIndex:
        """Embed a route set, fit its `other` thresholds and lint it (`lint`: None as
        `lint_on_load` says); the index is not cached."""
        assert self._model is not None
        s = self._settings
        lint = s.lint_on_load if lint is None else lint
        start = time.perf_counter()
        wholes, phrase_texts, owners, examples = [], [], [], []
        for i, route in enumerate(routes):
            whole, texts, n_phrases = route_texts(route)
            wholes.append(whole)
            phrase_texts += texts
            owners += [i] * len(texts)
            examples += [False] * n_phrases + [True] * (len(texts) - n_phrases)
        owner_ids = np.asarray(owners, dtype=np.intp)
        counts = np.bincount(owner_ids, minlength=len(routes)).astype(np.intp)
        slots = np.full((len(routes), int(counts.max())), -1, dtype=np.intp)
        fill = np.zeros(len(routes), dtype=np.intp)
        for j, owner in enumerate(owners):
            slots[owner, fill[owner]] = j
            fill[owner] += 1
        # The index keeps these embeddings itself: they do not go through the turn cache.
        phrases = [self._model.embed(t, cache=False)[0] for t in phrase_texts]
        token_counts = np.asarray([len(p.tokens) for p in phrases], dtype=np.intp)
        bm25 = Bm25(lexical_documents(routes, wholes))
        index = RouteIndex(
            names=tuple(r.name for r in routes),
            whole=np.stack([self._model.embed(w, cache=False)[0].vector for w in wholes]),
            phrases=np.stack([p.vector for p in phrases]),
            slots=slots,
            counts=counts,
            phrase_tokens=np.ascontiguousarray(np.concatenate([p.tokens for p in phrases]).T),
            token_starts=np.concatenate([[0], np.cumsum(token_counts)[:-1]]).astype(np.intp),
            token_counts=token_counts.astype(np.float64),
            lexical=bm25.table(),
            texts=tuple(phrase_texts),
            owners=owner_ids,
            is_example=np.asarray(examples, dtype=bool),
        )
        t_embed = time.perf_counter()
        pseudo = None
        if s.other_threshold == "auto" or lint:
            pseudo = pseudo_scores(index, bm25, s)
        other = fit_other(len(routes), pseudo, s)
        index = replace(index, other=other, pseudo=pseudo)
        findings = tuple(lint_index(index)) if lint else ()
        index = replace(index, findings=findings, nbytes=index_nbytes(index))
        end = time.perf_counter()
        log.info(
            "encoder route set fitted",
            routes=len(routes),
            texts=len(phrase_texts),
            **other.summary(index.names),
            embed_ms=round((t_embed - start) * 1e3, 1),
            fit_ms=round((end - t_embed) * 1e3, 1),
            bytes=index.nbytes,
        )
        if findings:
            log.warning(
                "route set lint: overlapping or vague routes (run `grpc-router lint` on the "
                "routes for the details)",
                findings=len(findings),
                first=[f.line() for f in findings[:8]],
            )
        return index

    def _keep(self, key: str, index: RouteIndex) -> None:
        s = self._settings
        with self._index_lock:
            if key in self._indexes:
                self._indexes.move_to_end(key)
                return
            if index.nbytes > s.route_set_cache_bytes:
                log.warning(
                    "route set larger than engine.encoder.route_set_cache_bytes: used, not kept",
                    bytes=index.nbytes,
                    bound=s.route_set_cache_bytes,
                )
                return
            self._indexes[key] = index
            self._index_bytes += index.nbytes
            while (
                len(self._indexes) > s.route_set_cache
                or self._index_bytes > s.route_set_cache_bytes
            ):
                _, dropped = self._indexes.popitem(last=False)
                self._index_bytes -= dropped.nbytes

    @property
    def cached_route_sets(self) -> tuple[int, int]:
        """(route sets kept, their bytes)."""
        with self._index_lock:
            return len(self._indexes), self._index_bytes

    def other_thresholds(self, routes: Sequence[RouteSpec]) -> OtherFit:
        """The `other` thresholds in force for `routes` (building the index if needed)."""
        return self._require_index(routes).other or fit_other(len(routes), None, self._settings)

    def lint(self, routes: Sequence[RouteSpec]) -> tuple[Finding, ...]:
        """What the lint flags in `routes` (from the cached index when it was linted)."""
        index = self._require_index(routes)
        if self._settings.lint_on_load:
            return index.findings
        if index.pseudo is None:
            return self.build_index(routes, lint=True).findings
        return tuple(lint_index(index))

    def _require_index(self, routes: Sequence[RouteSpec]) -> RouteIndex:
        if self._model is None:
            raise EngineUnavailable("encoder engine is not started")
        validate_routes(routes)
        return self.index(routes)

    async def prepare(self, routes: Sequence[RouteSpec]) -> OtherFit:
        """Build (or find) the route set's index off the event loop: embeddings, `other`
        thresholds, lint warnings. Returns the thresholds."""
        return await asyncio.to_thread(self.other_thresholds, routes)

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
        with self._index_lock:
            self._indexes.clear()
            self._index_bytes = 0
