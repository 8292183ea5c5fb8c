"""ArchRouterEngine end to end on the tiny artifacts: batching, cache, errors, providers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from grpc_router.engines.arch_router.engine import (
    CPU_CHUNK_TOKENS,
    CPU_MAX_BATCH,
    ArchRouterEngine,
    ArchRouterSettings,
)
from grpc_router.engines.arch_router.runtime import CPU, CUDA, TRT, choose_provider
from grpc_router.errors import ArtifactError, EngineUnavailable, InvalidArgument, Overloaded
from grpc_router.types import Decision, Engine, Message, Role, RouteSpec

ROUTES = [
    RouteSpec("code_generation", "Writing or fixing code."),
    RouteSpec("Buses", "Book bus journeys between cities."),
    RouteSpec("weather", "Weather forecasts."),
    RouteSpec("Banks", "Bank balances and transfers."),
]
CONVERSATIONS = [
    [Message(Role.USER, "Write a sort function in Rust.")],
    [
        Message(Role.USER, "Can you get me a bus ticket?"),
        Message(Role.ASSISTANT, "How many do you need?"),
        Message(Role.USER, "Four, to Fresno on Saturday morning."),
    ],
    [Message(Role.SYSTEM, "be brief"), Message(Role.USER, "Will it rain in Oslo?")],
    [Message(Role.USER, "Move 200 dollars to my savings account " * 3)],
]


def _engine(artifacts: Path, variant: str, **settings: object) -> ArchRouterEngine:
    return ArchRouterEngine(
        artifacts, ArchRouterSettings(variant=variant, provider="cpu", **settings)
    )


async def _sequential(engine: ArchRouterEngine, full_scores: bool = True) -> list[Decision]:
    return [await engine.decide(c, ROUTES, full_scores=full_scores) for c in CONVERSATIONS]


def _same(a: Decision, b: Decision, *, exact: bool = True) -> bool:
    if exact:
        return (a.route, a.confidence, dict(a.scores)) == (b.route, b.confidence, dict(b.scores))
    # int4 (MatMulNBits) and fp16 are not exact variants: how many rows a run holds moves their
    # last bits.
    return (
        a.route == b.route
        and a.confidence == pytest.approx(b.confidence, rel=1e-4)
        and a.scores.keys() == b.scores.keys()
        and all(a.scores[k] == pytest.approx(b.scores[k], rel=1e-4, abs=1e-9) for k in a.scores)
    )


@pytest.mark.parametrize("variant", ["fp32", "int4", "int8", "fp16"])
def test_batched_cached_and_alone_are_identical(tiny_artifacts: Path, variant: str) -> None:
    async def run() -> None:
        alone = _engine(tiny_artifacts, variant, max_batch_size=1, prefix_cache_bytes=0)
        # Small prefill chunks: chunk boundaries (which move with the batch size) must not
        # change the numbers either.
        batched = _engine(
            tiny_artifacts, variant, max_batch_size=8, max_wait_us=300_000, prefill_chunk_tokens=128
        )
        await alone.start()
        await batched.start()
        try:
            assert isinstance(batched, Engine) and batched.ready
            reference = await _sequential(alone)
            cold = await asyncio.gather(*(batched.decide(c, ROUTES) for c in CONVERSATIONS))
            warm = await asyncio.gather(*(batched.decide(c, ROUTES) for c in CONVERSATIONS))
            assert batched._batcher.largest_batch > 1  # requests really shared a run
            for ref, c, w in zip(reference, cold, warm, strict=True):
                # int4 and fp16 (float16 KV in and out, the GPU variant) are not exact ones.
                exact = variant in ("fp32", "int8")
                assert _same(ref, c, exact=exact) and _same(ref, w, exact=exact)
                assert ref.cached_tokens == 0 and w.cached_tokens > 0
                assert w.prompt_tokens == ref.prompt_tokens > w.cached_tokens
                assert ref.engine == "arch-router"
                assert set(ref.scores) == {r.name for r in ROUTES} | {"other"}
                assert sum(ref.scores.values()) == pytest.approx(1.0)
                assert ref.route in ref.scores
                assert {"queue", "prefill", "score", "total"} <= set(w.timings_ms)
            # Scores off: same routes, no scores, a decode timing instead.
            quick = await asyncio.gather(
                *(batched.decide(c, ROUTES, full_scores=False) for c in CONVERSATIONS)
            )
            for ref, q in zip(reference, quick, strict=True):
                assert q.route == ref.route and q.scores == {}
                assert 0 < q.confidence <= 1 and "decode" in q.timings_ms
        finally:
            await alone.close()
            await batched.close()

    asyncio.run(run())


def test_config_turns_scores_off_and_other_route_sets(tiny_artifacts: Path) -> None:
    async def run() -> None:
        engine = _engine(tiny_artifacts, "int4", full_scores=False, warmup=False)
        await engine.start()
        try:
            await engine.warm(ROUTES)
            d = await engine.decide(CONVERSATIONS[0], ROUTES, full_scores=True)
            assert d.scores == {}
            assert d.cached_tokens > 0  # warm() filled the prefix cache
            two = [RouteSpec("a_route", "first"), RouteSpec("b_route", "second")]
            d2 = await engine.decide(CONVERSATIONS[1], two)
            assert d2.route in {"a_route", "b_route", "other"}
            assert engine.prefix_cache.kinds()["route_set"] == 2  # one block per route set
        finally:
            await engine.close()

    asyncio.run(run())


def test_errors(tiny_artifacts: Path) -> None:
    async def run() -> None:
        engine = _engine(tiny_artifacts, "int4", warmup=False)
        with pytest.raises(EngineUnavailable):
            await engine.decide(CONVERSATIONS[0], ROUTES)
        await engine.start()
        try:
            with pytest.raises(InvalidArgument) as err:
                await engine.decide([Message(Role.ASSISTANT, "hi")], ROUTES)
            assert err.value.field == "messages"
            with pytest.raises(InvalidArgument) as err:
                await engine.decide(CONVERSATIONS[0], [*ROUTES, RouteSpec("Buses", "again")])
            assert err.value.field == "routes[4].name"
            # The engine still works after bad requests.
            assert (await engine.decide(CONVERSATIONS[0], ROUTES)).route
        finally:
            await engine.close()
        with pytest.raises(ArtifactError):
            await _engine(tiny_artifacts / "missing", "int4").start()
        with pytest.raises(ArtifactError, match="variant 'int3'"):
            await _engine(tiny_artifacts, "int3").start()

    asyncio.run(run())


def test_overloaded_when_queue_is_full(tiny_artifacts: Path) -> None:
    async def run() -> None:
        engine = _engine(
            tiny_artifacts, "int4", max_queue=1, max_batch_size=1, max_wait_us=0, warmup=False
        )
        await engine.start()
        try:
            results = await asyncio.gather(
                *(engine.decide(CONVERSATIONS[1], ROUTES) for _ in range(8)),
                return_exceptions=True,
            )
            overloaded = [r for r in results if isinstance(r, Overloaded)]
            decided = [r for r in results if isinstance(r, Decision)]
            assert overloaded and decided
            assert len(overloaded) + len(decided) == 8
            assert "queue is full" in str(overloaded[0])
        finally:
            await engine.close()

    asyncio.run(run())


def test_provider_selection() -> None:
    assert choose_provider("cpu").name == CPU
    assert choose_provider("auto", available=[CPU]).name == CPU
    assert choose_provider("auto", available=[CUDA, CPU]).name == CUDA
    trt = choose_provider("auto", available=[TRT, CUDA, CPU], trt_cache_dir=Path("/c"))
    assert trt.name == TRT and [p for p, _ in trt.providers] == [TRT, CUDA, CPU]
    opts = trt.providers[0][1]
    assert opts["trt_fp16_enable"] == "True" and opts["trt_engine_cache_path"] == "/c"
    assert "input_ids:1x1" in opts["trt_profile_min_shapes"]
    for asked in ("cuda", "tensorrt"):
        with pytest.raises(EngineUnavailable, match="onnxruntime-gpu"):
            choose_provider(asked, available=[CPU])  # type: ignore[arg-type]


@pytest.mark.skipif(
    CUDA in ort.get_available_providers(), reason="this machine has the CUDA provider"
)
def test_engine_asked_for_cuda_without_it(tiny_artifacts: Path) -> None:
    engine = ArchRouterEngine(tiny_artifacts, ArchRouterSettings(provider="cuda"))
    with pytest.raises(EngineUnavailable, match="onnxruntime-gpu"):
        asyncio.run(engine.start())
    assert not engine.ready


def test_settings_reject_unknown_fields() -> None:
    with pytest.raises(ValueError, match="extra"):
        ArchRouterSettings(provider="cpu", batch=3)  # type: ignore[call-arg]


def test_batch_and_chunk_defaults_follow_the_provider(tiny_artifacts: Path) -> None:
    async def run() -> None:
        default = _engine(tiny_artifacts, "int4", warmup=False)
        fused = _engine(tiny_artifacts, "int8", warmup=False)  # attention fused: one per run
        pinned = _engine(
            tiny_artifacts, "int8", warmup=False, max_batch_size=7, prefill_chunk_tokens=64
        )
        for engine in (default, fused, pinned):
            await engine.start()
        try:
            assert default.provider == CPU
            assert (default.max_batch_size, default.chunk_tokens) == (
                CPU_MAX_BATCH,
                CPU_CHUNK_TOKENS,
            )
            assert default._batcher.max_batch_size == CPU_MAX_BATCH
            assert (fused.max_batch_size, fused._batcher.max_batch_size) == (1, 1)
            assert (pinned.max_batch_size, pinned.chunk_tokens) == (7, 64)
            assert pinned._batcher.max_batch_size == 7
            with pytest.raises(RuntimeError, match="fixed"):  # no resizing while it runs
                pinned._batcher.max_batch_size = 2
        finally:
            for engine in (default, fused, pinned):
                await engine.close()

    asyncio.run(run())


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_kv_on_device_decides_like_the_host_path(tiny_artifacts: Path, variant: str) -> None:
    """The GPU default (KV kept where the graph runs, lone requests unpadded), through the CPU
    provider's IO binding: the same routes and, up to float noise, the same scores; batches
    still work (their KV is joined on the host)."""

    async def run() -> None:
        host = _engine(tiny_artifacts, variant, max_batch_size=1)
        device = _engine(
            tiny_artifacts, variant, kv_on_device=True, max_batch_size=8, max_wait_us=300_000
        )
        await host.start()
        await device.start()
        try:
            reference = await _sequential(host)
            alone = await _sequential(device)
            batched = await asyncio.gather(*(device.decide(c, ROUTES) for c in CONVERSATIONS))
            assert device._batcher.largest_batch > 1
            assert device._session is not None and device._session.device_kv  # no fallback
            blocks = [e for e in device.prefix_cache._lru.values() if e.kind == "route_set"]
            assert not isinstance(blocks[0].past[0], np.ndarray)  # a block stays on the device
            tol = 1e-4 if variant == "int8" else 1e-3  # int8: only pad-free tiling moves bits
            for ref, a, b in zip(reference, alone, batched, strict=True):
                for d in (a, b):
                    assert d.route == ref.route and d.scores.keys() == ref.scores.keys()
                    for k in ref.scores:
                        assert d.scores[k] == pytest.approx(ref.scores[k], rel=tol, abs=1e-6)
        finally:
            await host.close()
            await device.close()

    asyncio.run(run())


def _follow_ups(seed: int, sessions: int, turns: int) -> list[tuple[int, list[Message]]]:
    """Interleaved multi-turn conversations: (session, conversation so far) per call, every
    call adding a user turn of random length to its own session."""
    import random

    rng = random.Random(seed)
    words = [
        "bus",
        "ticket",
        "rain",
        "Oslo",
        "sort",
        "Rust",
        "transfer",
        "savings",
        "Fresno",
        "weather",
        "code",
    ]
    convs: list[list[Message]] = [[] for _ in range(sessions)]
    calls: list[tuple[int, list[Message]]] = []
    for _ in range(turns):
        for k in rng.sample(range(sessions), sessions):
            if convs[k]:
                convs[k].append(Message(Role.ASSISTANT, " ".join(rng.choices(words, k=3))))
            text = " ".join(rng.choices(words, k=rng.randint(1, 12)))
            convs[k].append(Message(Role.USER, text))
            calls.append((k, list(convs[k])))
    return calls


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_follow_up_turns_reuse_the_conversation_and_decide_bit_identically(
    tiny_artifacts: Path, variant: str
) -> None:
    """Exact variants: a follow-up turn prefills only what is new (cut wherever the previous
    turn's prompt diverges), sessions interleaved, with evictions under a tight budget; every
    decision equals a cold prefill's, bit for bit."""

    async def run() -> None:
        cold = _engine(tiny_artifacts, variant, prefix_cache_bytes=0, warmup=False)
        warm = _engine(tiny_artifacts, variant, warmup=False)
        tight = _engine(tiny_artifacts, variant, warmup=False, prefix_cache_bytes=1)
        for e in (cold, warm, tight):
            await e.start()
        try:
            session, prompts = warm._session, warm._prompts
            assert session is not None and prompts is not None
            calls = _follow_ups(seed=3, sessions=4, turns=4)
            longest = max(len(prompts.build(c, ROUTES, 2048).ids) for _, c in calls)
            # room for about three prompts: the budget forces evictions
            tight.prefix_cache.max_bytes = 3 * longest * session.token_bytes()
            reused_more = 0
            for k, conversation in calls:
                ref = await cold.decide(conversation, ROUTES)
                got = await warm.decide(conversation, ROUTES)
                squeezed = await tight.decide(conversation, ROUTES)
                assert _same(ref, got) and _same(ref, squeezed), k
                assert ref.cached_tokens == 0
                block = len(prompts.route_prefix(ROUTES).ids)
                if len(conversation) > 1:
                    # the previous turn's prompt is kept: more than the route set's block
                    assert got.cached_tokens > block
                    reused_more += 1
            assert reused_more == len(calls) - 4
            assert tight.prefix_cache.evictions > 0
            assert tight.prefix_cache.nbytes <= tight.prefix_cache.max_bytes
            assert warm.prefix_cache.kinds()["conversation"] == len(calls)
            # kept KV owns its memory: no entry pins a run's onnxruntime buffers
            for entry in warm.prefix_cache._lru.values():
                assert all(isinstance(a, np.ndarray) and a.flags.owndata for a in entry.past)
        finally:
            for e in (cold, warm, tight):
                await e.close()

    asyncio.run(run())
