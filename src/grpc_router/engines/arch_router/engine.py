"""The Arch-Router engine: a conversation and a route set in, a Decision out.

It glues the prompt renderer, the onnxruntime session, the prefix KV cache, the route trie,
the prefill, the scoring and the dynamic batcher together. It knows nothing about gRPC.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from grpc_router.engines.arch_router.graph import ALIGN
from grpc_router.engines.arch_router.kvcache import KVEntry, Match, PrefixCache, stack_past
from grpc_router.engines.arch_router.prefill import Rows, prompt_and_trie, prompt_rows
from grpc_router.engines.arch_router.prompt import Prompt, PromptBuilder, answer_names
from grpc_router.engines.arch_router.runtime import CPU, DecoderSession, on_host
from grpc_router.engines.arch_router.scoring import Outcome, outcome_of
from grpc_router.engines.arch_router.trie import Trie
from grpc_router.engines.artifact import load_artifact, manifest_summary, resolve_variant_dir
from grpc_router.engines.batcher import Batcher, Job
from grpc_router.errors import EngineUnavailable, RouterError
from grpc_router.observability.metrics import (
    count_prefix_eviction,
    observe_batch_size,
    observe_prefill,
    observe_prefix_cache,
)
from grpc_router.settings.engines import (
    CPU_CHUNK_TOKENS,
    CPU_MAX_BATCH,
    GPU_CHUNK_TOKENS,
    GPU_MAX_BATCH,
    ArchRouterSettings,
)
from grpc_router.types import Decision, Message, Role, RouteSpec

log = structlog.get_logger(__name__)


def _kv_shape(variant_dir: Path) -> tuple[int, int, int] | None:
    """(layers, kv_heads, head_dim) from the artifact's config.json, for TensorRT profiles."""
    try:
        cfg = json.loads((variant_dir / "config.json").read_text(encoding="utf-8"))
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
        return int(cfg["num_hidden_layers"]), int(cfg["num_key_value_heads"]), head_dim
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True, slots=True)
class _Request:
    messages: tuple[Message, ...]
    routes: tuple[RouteSpec, ...]
    full_scores: bool


@dataclass(slots=True)
class _Prepared:
    job: int
    prompt: Prompt
    trie: Trie
    full_scores: bool
    match: Match | None = None
    """The kept KV this prompt continues, and how many of its tokens."""
    cached_tokens: int = 0
    """Tokens reused from the prefix cache."""
    block_tokens: int = 0
    """Tokens of a route set's block prefilled for this prompt (then kept)."""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def past_len(self) -> int:
        return self.match.length if self.match is not None else 0

    @property
    def prefilled_tokens(self) -> int:
        return len(self.prompt.ids) - self.past_len + self.block_tokens


class ArchRouterEngine:
    """Routes with Arch-Router-1.5B exported to ONNX, run on onnxruntime."""

    def __init__(self, artifact: Path, settings: ArchRouterSettings | None = None) -> None:
        self._artifact = Path(artifact)
        self._settings = settings or ArchRouterSettings()
        self._ready = False
        self._lock = asyncio.Lock()
        self._session: DecoderSession | None = None
        self._prompts: PromptBuilder | None = None
        self._cache = PrefixCache(self._settings.prefix_cache_bytes, on_evict=count_prefix_eviction)
        self._tries: dict[str, Trie] = {}
        self._batcher: Batcher[_Request, Decision] = Batcher(
            self._process,
            max_batch_size=self._settings.max_batch_size or CPU_MAX_BATCH,  # set again at load
            max_wait_us=self._settings.max_wait_us,
            max_queue=self._settings.max_queue,
        )
        self.variant = ""
        self.variant_dir: Path | None = None
        # Cached prefixes end anywhere for exact variants (their bits do not depend on where a
        # past ends); elsewhere at a multiple of ALIGN, where a full prefill's chunks end too.
        self._prefix_align = ALIGN

    @property
    def name(self) -> str:
        return "arch-router"

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def settings(self) -> ArchRouterSettings:
        return self._settings

    @property
    def provider(self) -> str:
        return self._session.provider if self._session else ""

    @property
    def chunk_tokens(self) -> int:
        """Prefill tokens per run: the configured number, else one chosen for the provider."""
        if self._settings.prefill_chunk_tokens is not None:
            return self._settings.prefill_chunk_tokens
        return CPU_CHUNK_TOKENS if self._on_cpu else GPU_CHUNK_TOKENS

    @property
    def max_batch_size(self) -> int:
        """Requests per prefill run: the configured number, else one chosen for the provider."""
        if self._settings.max_batch_size is not None:
            return self._settings.max_batch_size
        if self._session is not None and self._session.one_row_prefill:
            return 1  # fused attention: batched requests would still prefill one by one
        return CPU_MAX_BATCH if self._on_cpu else GPU_MAX_BATCH

    @property
    def _on_cpu(self) -> bool:
        return self.provider in ("", CPU)

    @property
    def prefix_cache(self) -> PrefixCache:
        return self._cache

    async def start(self) -> None:
        async with self._lock:
            if self._ready:
                return
            await asyncio.to_thread(self._load)
            self._batcher.start()
            if self._settings.warmup:
                await self.decide(
                    [Message(Role.USER, "Hello, can you help me?")],
                    [RouteSpec("warmup", "A route used once to warm the engine up.")],
                    full_scores=True,
                )
                self._cache.clear()
            self._ready = True

    def _load(self) -> None:
        s = self._settings
        variant_dir = resolve_variant_dir(self._artifact, s.variant)
        manifest = load_artifact(variant_dir)
        if manifest.kind != "decoder":
            raise EngineUnavailable(
                f"{variant_dir} holds a {manifest.kind!r} model; the arch-router engine needs "
                "a decoder artifact from `make export`"
            )
        self._prompts = PromptBuilder.from_dir(variant_dir)
        self._session = DecoderSession(
            variant_dir / manifest.model_file,
            provider=s.provider,
            intra_op_threads=s.intra_op_threads,
            inter_op_threads=s.inter_op_threads,
            trt_cache_dir=s.trt_cache_dir or variant_dir / "trt-cache",
            max_tokens=s.prompt_token_budget,
            max_batch=(s.max_batch_size or CPU_MAX_BATCH) * 32,
            kv_shape=_kv_shape(variant_dir),
            device_kv=s.kv_on_device,
        )
        self._batcher.max_batch_size = self.max_batch_size
        self._prefix_align = 1 if manifest.quantization.get("exact") is True else ALIGN
        self.variant, self.variant_dir = manifest.variant, variant_dir
        log.info(
            "arch-router loaded",
            **manifest_summary(manifest),
            provider=self.provider,
            max_batch_size=self.max_batch_size,
            prefill_chunk_tokens=self.chunk_tokens,
        )

    async def decide(
        self,
        messages: Sequence[Message],
        routes: Sequence[RouteSpec],
        *,
        full_scores: bool = True,
    ) -> Decision:
        if self._session is None:
            raise EngineUnavailable("arch-router engine is not started")
        answer_names(routes)  # fail fast on a bad route set, before queueing
        start = time.perf_counter()
        request = _Request(
            tuple(messages), tuple(routes), full_scores and self._settings.full_scores
        )
        decision = await self._batcher.submit(request)
        timings = dict(decision.timings_ms)
        timings["total"] = (time.perf_counter() - start) * 1e3
        return Decision(
            route=decision.route,
            confidence=decision.confidence,
            scores=decision.scores,
            engine=self.name,
            timings_ms=timings,
            prompt_tokens=decision.prompt_tokens,
            cached_tokens=decision.cached_tokens,
        )

    async def warm(self, routes: Sequence[RouteSpec]) -> None:
        """Compute and cache a route set's prefix KV now (e.g. the configured routes at start),
        so that its first real request is not the slow one."""
        await self.decide([Message(Role.USER, "warm-up")], routes, full_scores=False)

    async def close(self) -> None:
        self._ready = False
        await asyncio.to_thread(self._batcher.stop)

    # --- worker thread -------------------------------------------------------------------

    def _trie(self, routes: Sequence[RouteSpec], key: str) -> Trie:
        trie = self._tries.get(key)
        if trie is None:
            assert self._prompts is not None
            trie = Trie(self._prompts.route_paths(answer_names(routes)))
            if len(self._tries) >= 256:
                self._tries.pop(next(iter(self._tries)))
            self._tries[key] = trie
        return trie

    def _process(self, jobs: list[Job[_Request, Decision]]) -> list[Decision | BaseException]:
        assert self._prompts is not None and self._session is not None
        observe_batch_size(len(jobs))
        results: list[Decision | BaseException | None] = [None] * len(jobs)
        groups: dict[tuple[int, int], list[_Prepared]] = {}
        for k, job in enumerate(jobs):
            req = job.payload
            try:
                prompt = self._prompts.build(
                    req.messages, req.routes, self._settings.prompt_token_budget
                )
                trie = self._trie(req.routes, prompt.prefix.key)
            except RouterError as exc:
                results[k] = exc
                continue
            prep = _Prepared(k, prompt, trie, req.full_scores)
            self._reuse(prep)
            key = (id(prep.match.entry) if prep.match else 0, prep.past_len)
            groups.setdefault(key, []).append(prep)
        for group in groups.values():
            for prep, outcome in zip(group, self._run_group(group), strict=True):
                job = jobs[prep.job]
                queue_ms = (job.started - job.enqueued) * 1e3
                observe_prefill(prep.cached_tokens, prep.prefilled_tokens)
                results[prep.job] = Decision(
                    route=outcome.route,
                    confidence=outcome.confidence,
                    scores=outcome.scores,
                    engine=self.name,
                    timings_ms={"queue": queue_ms, **prep.timings},
                    prompt_tokens=len(prep.prompt.ids),
                    cached_tokens=prep.cached_tokens,
                )
        observe_prefix_cache(len(self._cache), self._cache.nbytes)
        return [r if r is not None else EngineUnavailable("no result") for r in results]

    def _reuse(self, prep: _Prepared) -> None:
        """Find the longest kept token prefix of the prompt (a previous turn of the same
        conversation, or its route set's block); compute and keep the route set's block
        first when nothing kept reaches that far."""
        cache = self._cache
        if cache.max_bytes <= 0:
            return
        ids = prep.prompt.ids
        # At least the last token is fed: its logits start the decision.
        match = cache.longest(ids, align=self._prefix_align, limit=len(ids) - 1)
        if match is not None:
            prep.cached_tokens = match.length
        block: tuple[int, ...] = ()
        if prep.prompt.prefix_len:
            block = prep.prompt.prefix.ids
            block = block[: len(block) // self._prefix_align * self._prefix_align]
        if len(block) > (match.length if match else 0):
            match = Match(self._route_set_entry(block), len(block))
            prep.cached_tokens = 0
            prep.block_tokens = len(block)
        prep.match = match

    def _route_set_entry(self, block: tuple[int, ...]) -> KVEntry:
        """Prefill a route set's block alone and keep it."""
        session = self._session
        assert session is not None
        # unpadded on a device (nothing to cut there); a whole block may end off ALIGN
        align = 1 if session.device_kv else ALIGN
        _, (rows,) = prompt_rows(
            session, session.empty_past(1), 0, [block], chunk_tokens=self.chunk_tokens, align=align
        )
        kept = self._cache.put(block, rows.past, "route_set")
        return kept if kept is not None else KVEntry(block, rows.past, "route_set")

    def _keep(self, ids: tuple[int, ...], state: Rows) -> None:
        """Keep a prompt's KV for the calls that continue it. A row cut out of a batch is
        copied (a view would keep the whole batch alive), and the cache copies a run's own
        arrays out of onnxruntime's buffers; a device's come to the host, where a follow-up
        cuts its prefix."""
        if state.batch > 1:
            state = state.row(0, len(ids))
        self._cache.put(ids, on_host(state.past), "conversation")

    def _run_group(self, group: list[_Prepared]) -> list[Outcome]:
        """Prompts that continue the same kept prefix, in one prefill with their tries."""
        session = self._session
        assert session is not None
        t0 = time.perf_counter()
        first = group[0]
        past_len = first.past_len
        if first.match is not None and past_len:
            past = stack_past([first.match.entry.prefix_past(past_len)] * len(group))
        else:
            past = session.empty_past(len(group))
        suffixes = [p.prompt.ids[past_len:] for p in group]
        # Unpadded when the KV stays on the device: cutting padding off would need the host.
        align = 1 if session.device_kv and len(group) == 1 else ALIGN
        # The trie nodes a decision needs go in the prompt's own run: one pass over the
        # weights per decision (a single-token step costs a whole pass of them).
        tails = [p.trie.tail(full=p.full_scores) for p in group]
        keep = self._cache.max_bytes > 0
        nodes, states = prompt_and_trie(
            session, past, past_len, suffixes, tails, chunk_tokens=self.chunk_tokens,
            align=align, keep_kv=keep,
        )  # fmt: skip
        prefill_ms = (time.perf_counter() - t0) * 1e3
        outcomes = []
        for p, node_logits, state in zip(group, nodes, states, strict=True):
            t = time.perf_counter()
            outcomes.append(outcome_of(p.trie, node_logits, full=p.full_scores))
            p.timings["prefill"] = prefill_ms
            p.timings["score" if p.full_scores else "decode"] = (time.perf_counter() - t) * 1e3
            if keep:
                self._keep(p.prompt.ids, state)
        return outcomes
