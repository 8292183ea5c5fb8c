"""The encoder engine on the real MiniLM artifact: decisions, probabilities, context, exactness,
caching and errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from grpc_router.engines.encoder import engine as engine_module
from grpc_router.engines.encoder.engine import EncoderEngine, intra_op_threads
from grpc_router.engines.encoder.phrases import bm25_table, humanize, split_phrases, terms
from grpc_router.errors import EngineUnavailable, InvalidArgument, Overloaded
from grpc_router.settings import EncoderSettings
from grpc_router.types import OTHER_ROUTE, Decision, Message, Role, RouteSpec

ROUTES = (
    RouteSpec("weather", "Weather forecasts: rain, temperature, wind, snow for a city and date."),
    RouteSpec("banking", "Banking: account balance, transfer money, pay bill, report fraud."),
    RouteSpec("music", "Music: play a song, search for songs, next track, make a playlist."),
    RouteSpec("restaurants", "Restaurants: find a restaurant, book a table, dinner reservation."),
)


def user(text: str) -> Message:
    return Message(Role.USER, text)


def assistant(text: str) -> Message:
    return Message(Role.ASSISTANT, text)


@pytest.fixture(scope="module")
def engine(encoder_artifact: Path) -> Iterator[EncoderEngine]:
    eng = EncoderEngine(encoder_artifact)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.close())


def decide(
    engine: EncoderEngine, messages: list[Message], routes: tuple[RouteSpec, ...] = ROUTES
) -> Decision:
    return engine.decide_sync(messages, routes)


@pytest.mark.parametrize(
    ("text", "route"),
    [
        ("will it rain in Boston tomorrow?", "weather"),
        ("send 200 dollars to my brother's account", "banking"),
        ("put on some jazz", "music"),
        ("get me a table for two at an Italian place tonight", "restaurants"),
    ],
)
def test_clear_requests(engine: EncoderEngine, text: str, route: str) -> None:
    d = decide(engine, [user(text)])
    assert d.route == route
    assert d.engine == "encoder"
    assert list(d.scores) == [*(r.name for r in ROUTES), OTHER_ROUTE]
    assert sum(d.scores.values()) == pytest.approx(1.0, abs=1e-6)
    assert d.confidence == pytest.approx(d.scores[route]) and d.confidence == max(d.scores.values())
    assert d.prompt_tokens > 0 and d.timings_ms["total"] > 0


def test_async_decide_matches_sync(engine: EncoderEngine) -> None:
    messages = [user("what's my checking balance")]
    d = asyncio.run(engine.decide(messages, ROUTES))
    assert d.route == "banking"
    assert d.scores == decide(engine, messages).scores
    assert asyncio.run(engine.decide(messages, ROUTES, full_scores=False)).scores == {}


def test_vague_last_turn_uses_earlier_turns(engine: EncoderEngine) -> None:
    convo = [
        user("I want to book a table at a sushi restaurant"),
        assistant("Sure, for how many people and when?"),
        user("four of us, around 7"),
    ]
    assert decide(engine, convo).route == "restaurants"


def test_clear_last_turn_overrides_context(engine: EncoderEngine) -> None:
    convo = [
        user("what's the weather in Montara on Tuesday?"),
        assistant("It should be sunny, 87 degrees."),
        user("ok thanks. now play me a song by Adele"),
    ]
    assert decide(engine, convo).route == "music"


def test_decisive_latest_turn_skips_earlier_turns(encoder_artifact: Path) -> None:
    """A latest user turn that clears `context_margin` decides alone: the earlier turns are not
    embedded (fewer tokens) and cannot pull the decision back; None always reads them."""
    always = EncoderEngine(encoder_artifact, EncoderSettings(context_margin=None, warmup=False))
    skip = EncoderEngine(encoder_artifact, EncoderSettings(context_margin=0.0, warmup=False))
    for eng in (always, skip):
        asyncio.run(eng.start())
    try:
        convo = [
            user("what's the weather in Montara on Tuesday?"),
            assistant("It should be sunny, 87 degrees."),
            user("play me a song by Adele"),
        ]
        alone = skip.decide_sync(convo[-1:], ROUTES)
        fast = skip.decide_sync(convo, ROUTES)
        assert fast.scores == alone.scores
        assert fast.prompt_tokens == alone.prompt_tokens
        full = always.decide_sync(convo, ROUTES)
        assert full.prompt_tokens > alone.prompt_tokens
        assert full.scores != alone.scores
    finally:
        for eng in (always, skip):
            asyncio.run(eng.close())


def test_system_and_tool_turns_are_ignored(engine: EncoderEngine) -> None:
    plain = decide(engine, [user("play some jazz")])
    noisy = decide(
        engine,
        [
            Message(Role.SYSTEM, "You are a banking assistant. Account balance, transfers."),
            user("play some jazz"),
            Message(Role.TOOL, "weather: rain 12C"),
        ],
    )
    assert noisy.scores == plain.scores


def test_decision_does_not_depend_on_neighbours(engine: EncoderEngine) -> None:
    """Concurrent decisions (other texts in flight) give bit-identical scores to a lone one."""
    target = [user("is it going to snow this weekend in Denver")]
    alone = decide(engine, target).scores

    async def crowd() -> list[Decision]:
        others = [[user(f"transfer {n} euros to savings and play track {n}")] for n in range(6)]
        return await asyncio.gather(
            *(engine.decide(m, ROUTES) for m in [*others[:3], target, *others[3:]])
        )

    assert dict(asyncio.run(crowd())[3].scores) == dict(alone)


def test_threads_follow_the_cpus_unless_set(
    encoder_artifact: Path, engine: EncoderEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`threads: null` shares the CPUs this process may use among the workers (at most 4);
    a number is taken as given. Two threads decide as one does."""
    monkeypatch.setattr(engine_module, "available_cpus", lambda: 16)
    assert intra_op_threads(EncoderSettings()) == 4
    assert intra_op_threads(EncoderSettings(workers=8)) == 2
    assert intra_op_threads(EncoderSettings(workers=32)) == 1
    assert intra_op_threads(EncoderSettings(threads=6)) == 6
    monkeypatch.setattr(engine_module, "available_cpus", lambda: 2)
    assert intra_op_threads(EncoderSettings()) == 2
    monkeypatch.undo()
    one = EncoderEngine(encoder_artifact, EncoderSettings(threads=1))
    two = EncoderEngine(encoder_artifact, EncoderSettings(threads=2))
    asyncio.run(one.start())
    asyncio.run(two.start())
    try:
        assert one.model is not None and one.model.threads == 1
        assert two.model is not None and two.model.threads == 2
        for text in ("is it going to snow this weekend in Denver", "play the next track"):
            a, b = decide(one, [user(text)]), decide(two, [user(text)])
            assert a.route == b.route
            assert all(abs(a.scores[k] - b.scores[k]) < 1e-4 for k in a.scores)
    finally:
        asyncio.run(one.close())
        asyncio.run(two.close())


def test_route_set_cache(engine: EncoderEngine) -> None:
    first = engine.index(ROUTES)
    assert engine.index(list(ROUTES)) is first
    changed = (*ROUTES[:3], RouteSpec("restaurants", "Restaurants and bars."))
    assert engine.index(changed) is not first


def test_examples_are_used(engine: EncoderEngine) -> None:
    routes = (
        RouteSpec("alpha", "Requests of the first kind."),
        RouteSpec("beta", "Requests of the second kind."),
    )
    text = [user("my flight to Rome got cancelled, rebook me")]
    with_examples = (routes[0], RouteSpec("beta", routes[1].description, ("rebook my flight",)))
    assert decide(engine, text, with_examples).route == "beta"
    assert (
        decide(engine, text, with_examples).confidence > decide(engine, text, routes).scores["beta"]
    )


def test_other_threshold(encoder_artifact: Path) -> None:
    never = EncoderEngine(encoder_artifact, EncoderSettings(other_threshold=None, warmup=False))
    always = EncoderEngine(encoder_artifact, EncoderSettings(other_threshold=2.0, warmup=False))
    for eng in (never, always):
        asyncio.run(eng.start())
    try:
        text = [user("will it rain in Boston tomorrow?")]
        assert never.decide_sync(text, ROUTES).scores[OTHER_ROUTE] == 0.0
        assert always.decide_sync(text, ROUTES).route == OTHER_ROUTE
    finally:
        for eng in (never, always):
            asyncio.run(eng.close())


def test_default_threshold_separates_off_topic(engine: EncoderEngine) -> None:
    on = decide(engine, [user("will it rain in Boston tomorrow?")])
    off = decide(engine, [user("what is the airspeed velocity of an unladen swallow")])
    assert on.scores[OTHER_ROUTE] < off.scores[OTHER_ROUTE]


def test_int8_and_fp32_agree(encoder_artifact: Path, engine: EncoderEngine) -> None:
    fp32 = EncoderEngine(encoder_artifact, EncoderSettings(variant="fp32", warmup=False))
    asyncio.run(fp32.start())
    try:
        assert fp32.model is not None and fp32.model.variant == "fp32"
        for text in ("will it rain tomorrow", "pay my electricity bill", "next song please"):
            a = decide(engine, [user(text)])
            b = fp32.decide_sync([user(text)], ROUTES)
            assert a.route == b.route
    finally:
        asyncio.run(fp32.close())


@pytest.mark.parametrize(
    ("messages", "routes", "field"),
    [
        ([assistant("hello")], ROUTES, "messages"),
        ([user("   ")], ROUTES, "messages"),
        ([user("hi")], (), "routes"),
        ([user("hi")], (ROUTES[0], ROUTES[0]), "routes[1].name"),
        ([user("hi")], (RouteSpec(OTHER_ROUTE, "x"),), "routes[0].name"),
        ([user("hi")], (RouteSpec("a", "  "),), "routes[0].description"),
    ],
)
def test_invalid_arguments(
    engine: EncoderEngine, messages: list[Message], routes: tuple[RouteSpec, ...], field: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        asyncio.run(engine.decide(messages, routes))
    assert err.value.field == field


def test_not_started(encoder_artifact: Path) -> None:
    with pytest.raises(EngineUnavailable):
        asyncio.run(EncoderEngine(encoder_artifact).decide([user("hi")], ROUTES))


def test_missing_artifact_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="make export"):
        asyncio.run(EncoderEngine(tmp_path / "nope").start())


def test_phrases() -> None:
    assert humanize("RentalCars") == "rental cars"
    assert humanize("auto_and_commute") == "auto and commute"
    assert split_phrases("Requests about banking: pin change, pay bill, transfer.") == [
        "pin change",
        "pay bill",
        "transfer",
    ]
    assert split_phrases(
        "The widest selection. Can: Find movies by genre and, optionally, director or actors; "
        "Rent a movie."
    ) == [
        "The widest selection",
        "Find movies by genre and, optionally, director or actors",
        "Rent a movie",
    ]
    assert split_phrases("") == []
    assert split_phrases("Check the weather. Can: Get the weather") == [
        "Check the weather",
        "Get the weather",
    ]


def test_lexical_terms_and_bm25() -> None:
    words = ["status", "booking", "flight"]
    assert terms("What's the status of my Bookings, and flights?") == words
    assert terms("bus gas buses booked") == ["bus", "gas", "bus", "book"]
    table = bm25_table(["book a bus", "book a flight, flights", "weather"])
    assert set(table) == {"book", "bus", "flight", "weather"}
    # A word every route but one uses weighs less than a word only one route uses.
    assert 0 < table["book"][0] < table["bus"][0]
    assert table["bus"][1] == table["bus"][2] == 0
    # Repeats saturate: twice "flight" scores more than once, less than twice as much.
    once = bm25_table(["book a bus", "book a flight", "weather"])["flight"][1]
    assert once < table["flight"][1] < 2 * once


def test_lexical_weight_adds_shared_words(encoder_artifact: Path, engine: EncoderEngine) -> None:
    off = EncoderEngine(encoder_artifact, EncoderSettings(lexical_weight=0.0, warmup=False))
    asyncio.run(off.start())
    try:
        text = [user("pay my bill")]
        with_words = engine.raw_scores(text, engine.index(ROUTES))[0]
        without = off.raw_scores(text, off.index(ROUTES))[0]
        # "pay" and "bill" occur only in banking's description: only banking moves.
        moved = with_words - without
        assert moved[1] > 0
        assert moved[0] == moved[2] == moved[3] == 0
    finally:
        asyncio.run(off.close())


def test_full_queue_is_overloaded(encoder_artifact: Path) -> None:
    eng = EncoderEngine(encoder_artifact, EncoderSettings(max_queue=1, warmup=False))

    async def run() -> list[Decision | BaseException]:
        await eng.start()
        try:
            calls = [eng.decide([user(f"play track {n}")], ROUTES) for n in range(3)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await eng.close()

    first, *rest = asyncio.run(run())
    assert isinstance(first, Decision) and first.route == "music"
    assert all(isinstance(r, Overloaded) for r in rest)
