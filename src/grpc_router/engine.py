"""The Arch-Router engine: a conversation and a route set in, a Decision out.

It glues the prompt renderer, the onnxruntime session, the prefix KV cache, the constrained
decoder and the dynamic batcher together. It knows nothing about gRPC.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import structlog
from pydantic import BaseModel, ConfigDict, Field

from grpc_router.artifact import load_artifact, manifest_summary, resolve_variant_dir
from grpc_router.batcher import Batcher, Job
from grpc_router.decoder import (
    ALIGN,
    Outcome,
    Trie,
    greedy,
    outcome_of,
    prompt_and_trie,
    prompt_rows,
    score_all,
)
from grpc_router.errors import EngineUnavailable, RouterError
from grpc_router.kvcache import PrefixCache, PrefixKV, stack_past
from grpc_router.metrics import observe_batch_size
from grpc_router.prompt import Prompt, PromptBuilder, answer_names
from grpc_router.runtime import CPU, DecoderSession
from grpc_router.types import Decision, Message, Role, RouteSpec

log = structlog.get_logger(__name__)

# Requests per prefill run when the config leaves it open. Measured on an H200 (fp16, 1,152-token
# prompts, 4 clients, KV in host memory): batches of 1 gave 42 decisions/s, of 4 gave 17, of 16
# gave 20; a batch stacks, uploads and cuts its KV through host memory (it still does with
# kv_on_device). On the CPU the prefill is compute-bound and batching helps a little.
CPU_MAX_BATCH = 4
GPU_MAX_BATCH = 1
# Prefill tokens per run when the config leaves it open. On a GPU each run also moves the
# batch's KV between host and device (measured on an H200: a 4-request batch in 2 runs of
# 1,024 took 228 ms, 7x one request), so there a prompt goes in one run.
CPU_CHUNK_TOKENS = 1024
GPU_CHUNK_TOKENS = 16384

Provider = Literal["auto", "tensorrt", "cuda", "cpu"]


class ArchRouterSettings(BaseModel):
    """Tuning knobs of the Arch-Router engine; every field has a safe default."""

    model_config = ConfigDict(extra="forbid")

    provider: Provider = Field(
        default="auto",
        description="Execution provider: auto tries TensorRT, then CUDA, then CPU.",
    )
    intra_op_threads: int | None = Field(
        default=None,
        ge=0,
        description="Threads inside one ORT operator; None = onnxruntime's default "
        "(one per physical core).",
    )
    inter_op_threads: int | None = Field(
        default=None,
        ge=0,
        description="Threads across independent operators; None = onnxruntime's default (1, "
        "since the graph runs sequentially).",
    )
    max_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Most requests coalesced into one prefill run. None = 1 for a graph with "
        "fused attention (the int8 variant by default: its kernel prefills one request per run), "
        f"else {CPU_MAX_BATCH} on the CPU and {GPU_MAX_BATCH} on CUDA/TensorRT (a batch joins "
        "and cuts its KV in host memory; there batches measured slower than requests one by one).",
    )
    max_wait_us: int = Field(
        default=2000,
        ge=0,
        description="How long the first request of a batch waits for others, in microseconds.",
    )
    max_queue: int = Field(
        default=64, ge=1, description="Requests waiting beyond this are rejected with Overloaded."
    )
    prompt_token_budget: int = Field(
        default=2048,
        ge=64,
        description="Most prompt tokens; the oldest turns are dropped first, the latest user "
        "turn is kept (truncated if it alone is too long).",
    )
    prefix_cache_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=0,
        description="Bound of the per-route-set prefix KV cache in bytes; 0 disables it.",
    )
    prefill_chunk_tokens: int | None = Field(
        default=None,
        ge=16,
        description="About how many prompt tokens one prefill run takes (all batch rows "
        "together); bounds the attention activations' memory. Every run reads all weights "
        "once (and on a GPU moves the KV across PCIe), so fewer, larger runs are faster. "
        f"None = {CPU_CHUNK_TOKENS} on the CPU, {GPU_CHUNK_TOKENS} on CUDA/TensorRT.",
    )
    kv_on_device: bool | None = Field(
        default=None,
        description="Keep the KV cache on the GPU between runs (IO binding) instead of host "
        "memory; None = on for CUDA/TensorRT. A lone request then prefills unpadded, so its "
        "KV needs no cutting; batches still join their KV on the host. Without the onnx "
        "package, or if that graph or its first run fails, it logs why and uses host memory.",
    )
    score_rows_per_run: int = Field(
        default=4,
        ge=1,
        description="Graphs exported before attention_mask_4d only: trie rows scored per "
        "model run, each with a copy of the prompt's KV (newer graphs score the trie in one).",
    )
    full_scores: bool = Field(
        default=True,
        description="Score every route plus 'other' by default (a request may turn it off).",
    )
    trt_cache_dir: Path | None = Field(
        default=None,
        description="TensorRT engine cache directory; None = <artifact>/trt-cache.",
    )
    warmup: bool = Field(
        default=True, description="Run one decision at start so the first is not slow."
    )
    variant: str | None = Field(
        default=None,
        description="Artifact variant (int8, int4, fp16, fp32); None = the default one.",
    )


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
    cached_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class ArchRouterEngine:
    """Routes with Arch-Router-1.5B exported to ONNX, run on onnxruntime."""

    def __init__(self, artifact: Path, settings: ArchRouterSettings | None = None) -> None:
        self._artifact = Path(artifact)
        self._settings = settings or ArchRouterSettings()
        self._ready = False
        self._lock = asyncio.Lock()
        self._session: DecoderSession | None = None
        self._prompts: PromptBuilder | None = None
        self._cache = PrefixCache(self._settings.prefix_cache_bytes)
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
        groups: dict[str, list[_Prepared]] = {}
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
            groups.setdefault(prompt.prefix.key, []).append(prep)
        for group in groups.values():
            for prep, outcome in zip(group, self._run_group(group), strict=True):
                job = jobs[prep.job]
                queue_ms = (job.started - job.enqueued) * 1e3
                results[prep.job] = Decision(
                    route=outcome.route,
                    confidence=outcome.confidence,
                    scores=outcome.scores,
                    engine=self.name,
                    timings_ms={"queue": queue_ms, **prep.timings},
                    prompt_tokens=len(prep.prompt.ids),
                    cached_tokens=prep.cached_tokens,
                )
        return [r if r is not None else EngineUnavailable("no result") for r in results]

    def _prefix_past(self, group: list[_Prepared]) -> tuple[list[np.ndarray], int]:
        """The shared past of a group (same route set): the cached prefix KV, or nothing."""
        session = self._session
        assert session is not None
        prefix = group[0].prompt.prefix
        usable = self._cache.max_bytes > 0 and all(p.prompt.prefix_len > 0 for p in group)
        ids = prefix.ids[: len(prefix.ids) // self._prefix_align * self._prefix_align]
        if not usable or not ids:
            return session.empty_past(len(group)), 0
        entry = self._cache.get(prefix.key, ids)
        hit = entry is not None
        if entry is None:
            chunk = self.chunk_tokens
            # unpadded on a device (nothing to cut there); a whole prefix may end off ALIGN
            align = 1 if session.device_kv else ALIGN
            _, (rows,) = prompt_rows(
                session, session.empty_past(1), 0, [ids], chunk_tokens=chunk, align=align
            )
            entry = PrefixKV(ids, rows.past)
            self._cache.put(prefix.key, entry)
        for p in group:
            p.cached_tokens = len(ids) if hit else 0
        return stack_past([entry.past] * len(group)), len(ids)

    def _run_group(self, group: list[_Prepared]) -> list[Outcome]:
        session = self._session
        assert session is not None
        t0 = time.perf_counter()
        past, past_len = self._prefix_past(group)
        suffixes = [p.prompt.ids[past_len:] for p in group]
        trie = group[0].trie
        # Unpadded when the KV stays on the device: cutting padding off would need the host.
        align = 1 if session.device_kv and len(group) == 1 else ALIGN
        if session.keeps_last_m and session.has_mask4d:
            # The trie nodes a decision needs go in the prompt's own run: one pass over the
            # weights per decision (a single-token step costs a whole pass of them).
            tails = [trie.tail(full=p.full_scores) for p in group]
            nodes = prompt_and_trie(
                session, past, past_len, suffixes, tails, chunk_tokens=self.chunk_tokens,
                align=align,
            )  # fmt: skip
            prefill_ms = (time.perf_counter() - t0) * 1e3
            outcomes = []
            for p, node_logits in zip(group, nodes, strict=True):
                t = time.perf_counter()
                outcomes.append(outcome_of(trie, node_logits, full=p.full_scores))
                p.timings["prefill"] = prefill_ms
                p.timings["score" if p.full_scores else "decode"] = (time.perf_counter() - t) * 1e3
            return outcomes
        root, rows = prompt_rows(
            session, past, past_len, suffixes, chunk_tokens=self.chunk_tokens, align=align
        )
        prefill_ms = (time.perf_counter() - t0) * 1e3
        outcomes = []
        for i, p in enumerate(group):  # graphs from before the trie could join the prefill
            t = time.perf_counter()
            if p.full_scores:
                outcome, _ = score_all(
                    session, trie, rows[i], root[i], rows_per_run=self._settings.score_rows_per_run
                )
            else:
                outcome, _ = greedy(session, trie, rows[i], root[i])
            outcomes.append(outcome)
            p.timings["prefill"] = prefill_ms
            p.timings["score" if p.full_scores else "decode"] = (time.perf_counter() - t) * 1e3
        return outcomes
