"""The `other` thresholds fitted to each route set without labels, per-route thresholds from
examples, fixed and off overrides, the byte bound of the route-set cache, and the route-set lint
on the real MiniLM artifact."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from grpc_router.engines.encoder.engine import EncoderEngine
from grpc_router.engines.encoder.fit import FALLBACK_THRESHOLD, fit_other
from grpc_router.evaluate import load_routes, without_examples
from grpc_router.settings import EncoderSettings, EngineConfig
from grpc_router.types import OTHER_ROUTE, Message, Role, RouteSpec
from tests.fixtures.paths import eval_dir

ROUTES = (
    RouteSpec("weather", "Weather forecasts: rain, temperature, wind, snow for a city and date."),
    RouteSpec("banking", "Banking: account balance, transfer money, pay bill, report fraud."),
    RouteSpec("music", "Music: play a song, search for songs, next track, make a playlist."),
    RouteSpec("restaurants", "Restaurants: find a restaurant, book a table, dinner reservation."),
)
EXAMPLES = {
    "weather": ("will it rain tomorrow", "how cold is it in Oslo", "is snow expected tonight"),
    "banking": ("what's my checking balance", "send 50 dollars to Ann", "I lost my debit card"),
    "music": ("play some jazz", "skip this song", "add this track to my running playlist"),
}
WITH_EXAMPLES = tuple(RouteSpec(r.name, r.description, EXAMPLES.get(r.name, ())) for r in ROUTES)


def user(text: str) -> Message:
    return Message(Role.USER, text)


def start(artifact: Path, **settings: object) -> EncoderEngine:
    engine = EncoderEngine(artifact, EncoderSettings(warmup=False, **settings))  # type: ignore[arg-type]
    asyncio.run(engine.start())
    return engine


@pytest.fixture(scope="module")
def engine(encoder_artifact: Path) -> Iterator[EncoderEngine]:
    eng = start(encoder_artifact)
    yield eng
    asyncio.run(eng.close())


def test_auto_is_the_default_and_numbers_still_mean_fixed() -> None:
    assert EncoderSettings().other_threshold == "auto"
    assert (
        EngineConfig.model_validate({"encoder": {"other_threshold": 0.17}}).encoder.other_threshold
        == 0.17
    )
    assert (
        EngineConfig.model_validate({"encoder": {"other_threshold": None}}).encoder.other_threshold
        is None
    )
    assert (
        EngineConfig.model_validate(
            {"encoder": {"other_threshold": "auto"}}
        ).encoder.other_threshold
        == "auto"
    )
    with pytest.raises(ValidationError, match="other_threshold"):
        EngineConfig.model_validate({"encoder": {"other_threshold": "sometimes"}})


def test_fit_comes_from_the_route_set_alone(engine: EncoderEngine, encoder_artifact: Path) -> None:
    """No labelled case goes in: the fit is a function of the route set (and the settings),
    and a fresh engine fits the same values."""
    fit = engine.other_thresholds(ROUTES)
    assert fit.mode == "auto" and fit.source == "descriptions"
    assert fit.threshold is not None and 0.0 < fit.threshold < 0.5
    assert fit.route_thresholds == (fit.threshold,) * len(ROUTES)
    assert fit.route_examples == (0,) * len(ROUTES) and fit.examples == 0
    other = start(encoder_artifact)
    try:
        assert other.other_thresholds(ROUTES) == fit
    finally:
        asyncio.run(other.close())


def test_examples_move_the_threshold_and_give_routes_their_own(engine: EncoderEngine) -> None:
    plain = engine.other_thresholds(ROUTES)
    fit = engine.other_thresholds(WITH_EXAMPLES)
    assert fit.source == "examples" and fit.examples == 9
    assert fit.threshold != plain.threshold
    assert fit.route_examples == (3, 3, 3, 0)
    # Routes with examples have their own; the one without keeps the background level.
    assert fit.route_thresholds[3] == pytest.approx(fit.background)
    assert len(set(fit.route_thresholds[:3])) == 3
    assert all(t != fit.threshold for t in fit.route_thresholds[:3])


def test_clinc_descriptions_and_examples_fit_differently(engine: EncoderEngine) -> None:
    """The vendored CLINC150 route set with its 30 examples per route, and without them."""
    routes = load_routes(eval_dir() / "clinc150_routes_examples.json")
    with_ex = engine.other_thresholds(routes)
    bare = engine.other_thresholds(without_examples(routes))
    assert bare.source == "descriptions" and with_ex.source == "examples"
    assert with_ex.examples == 300 and all(n == 30 for n in with_ex.route_examples)
    assert with_ex.threshold is not None and bare.threshold is not None
    # Examples are written like requests: requests score higher against them.
    assert with_ex.threshold > bare.threshold + 0.02


def test_leave_one_out_matches_scoring_the_set_without_the_text(engine: EncoderEngine) -> None:
    """Each pseudo-query's scores are exactly a request's scores against the route set with
    that example taken out (phrase slot, top-k count and BM25 document)."""
    index = engine.index(WITH_EXAMPLES)
    pseudo = index.pseudo
    assert pseudo is not None and pseudo.skipped == 0
    checked = 0
    for row, (j, owner) in enumerate(zip(pseudo.phrase, pseudo.owner, strict=True)):
        if not pseudo.is_example[row]:
            continue
        text = index.texts[j]
        reduced = list(WITH_EXAMPLES)
        route = reduced[owner]
        reduced[owner] = RouteSpec(
            route.name, route.description, tuple(e for e in route.examples if e != text)
        )
        alone = engine.build_index(reduced, lint=False)
        scores, _, _ = engine.raw_scores([user(text)], alone)
        np.testing.assert_allclose(pseudo.scores[row], scores, atol=1e-6)
        checked += 1
    assert checked == 9


def test_decisions_use_the_best_routes_threshold(engine: EncoderEngine) -> None:
    index = engine.index(WITH_EXAMPLES)
    assert index.other is not None
    s = engine.settings
    for text in ("play some jazz please", "what is the airspeed of a swallow", "pay my bill"):
        scores, _, _ = engine.raw_scores([user(text)], index)
        d = engine.decide_sync([user(text)], WITH_EXAMPLES)
        best = int(np.argmax(scores))
        threshold = index.other.route_thresholds[best]
        ratio = d.scores[OTHER_ROUTE] / d.scores[WITH_EXAMPLES[best].name]
        assert ratio == pytest.approx(math.exp((threshold - scores[best]) / s.temperature))
        assert (d.route == OTHER_ROUTE) == (scores[best] < threshold)


def test_off_topic_request_answers_other(engine: EncoderEngine) -> None:
    for text in ("what's the capital of Peru", "how tall is Mount Everest"):
        assert engine.decide_sync([user(text)], ROUTES).route == OTHER_ROUTE
    assert engine.decide_sync([user("will it rain in Boston tomorrow?")], ROUTES).route == "weather"


def test_fixed_and_off_override_the_fit(encoder_artifact: Path) -> None:
    fixed = start(encoder_artifact, other_threshold=0.25)
    off = start(encoder_artifact, other_threshold=None)
    try:
        fit = fixed.other_thresholds(WITH_EXAMPLES)
        assert (fit.mode, fit.source, fit.threshold) == ("fixed", "config", 0.25)
        assert fit.route_thresholds == (0.25,) * 4 and fit.route_examples == (0,) * 4
        assert off.other_thresholds(ROUTES).mode == "off"
        assert off.decide_sync([user("xq zv 9981")], ROUTES).scores[OTHER_ROUTE] == 0.0
    finally:
        for eng in (fixed, off):
            asyncio.run(eng.close())


def test_quantile_moves_the_fit_and_one_route_falls_back(engine: EncoderEngine) -> None:
    index = engine.index(WITH_EXAMPLES)
    low = fit_other(4, index.pseudo, engine.settings, 0.0)
    high = fit_other(4, index.pseudo, engine.settings, 0.4)
    assert low.threshold is not None and high.threshold is not None
    assert low.threshold < high.threshold
    lone = engine.other_thresholds(ROUTES[:1])
    assert lone.source == "fallback" and lone.threshold == FALLBACK_THRESHOLD


def test_fit_is_logged_once_per_route_set(
    encoder_artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    eng = start(encoder_artifact)
    try:
        capsys.readouterr()
        eng.index(WITH_EXAMPLES)
        eng.index(WITH_EXAMPLES)
        out = capsys.readouterr().out
        assert out.count("encoder route set fitted") == 1
        assert "source=examples" in out and "route_thresholds=" in out
    finally:
        asyncio.run(eng.close())


def test_route_set_cache_is_bounded_in_bytes(encoder_artifact: Path) -> None:
    probe = start(encoder_artifact, lint_on_load=False)
    try:
        one = probe.index(ROUTES).nbytes
    finally:
        asyncio.run(probe.close())
    assert one > 10_000
    bound = int(2.5 * one)
    eng = start(encoder_artifact, route_set_cache_bytes=bound, lint_on_load=False)
    try:
        sets = [
            tuple(RouteSpec(r.name, f"{r.description} Variant {n}.") for r in ROUTES)
            for n in range(6)
        ]
        for routes in sets:
            eng.index(routes)
            kept, held = eng.cached_route_sets
            assert held <= bound and kept <= 2
        # The most recent sets are the ones kept.
        assert eng.index(sets[-1]) is eng.index(sets[-1])
        # A set larger than the bound is served, and not kept.
        big = tuple(
            RouteSpec(
                r.name, r.description, tuple(f"{r.name} example number {i}" for i in range(30))
            )
            for r in ROUTES
        )
        assert eng.index(big).nbytes > bound
        assert eng.decide_sync([user("play a song")], big).route == "music"
        assert eng.cached_route_sets[1] <= bound
        assert eng.index(big) is not eng.index(big)
    finally:
        asyncio.run(eng.close())


def test_lint_flags_a_constructed_overlapping_set(engine: EncoderEngine) -> None:
    routes = (
        *ROUTES,
        RouteSpec(
            "payments",
            "Banking: account balance, transfer money, pay bill.",
            ("play some jazz", "send money to my landlord"),
        ),
    )
    findings = engine.lint(routes)
    kinds = {(f.kind, f.routes) for f in findings}
    assert ("overlap", ("banking", "payments")) in kinds
    overlap = next(f for f in findings if f.routes == ("banking", "payments"))
    assert overlap.details["description_similarity"] >= 0.7
    # The three phrases both descriptions list collide with themselves (similarity 1, in
    # whatever order float rounding puts them).
    identical = {a for a, b, sim in overlap.pairs if a == b and sim > 0.99}
    assert identical == {"account balance", "transfer money", "pay bill"}
    misplaced = [f for f in findings if f.kind == "example_elsewhere"]
    assert any(f.text == "play some jazz" and f.routes == ("payments", "music") for f in misplaced)
    assert not engine.lint(ROUTES)
    vague = engine.lint((*ROUTES, RouteSpec("misc", "Anything else.")))
    assert [(f.kind, f.routes) for f in vague] == [("vague", ("misc",))]


def test_other_asks_whether_any_turn_read_is_about_the_route(encoder_artifact: Path) -> None:
    """A vague last turn ends an in-scope conversation: `other` compares the best route's
    strongest turn read, not the decayed mix of turns, with its threshold."""
    convo = [
        user("I want to book a table at an Italian restaurant"),
        Message(Role.ASSISTANT, "Sure, for how many people and when?"),
        user("four of us, around 7"),
    ]
    probe = start(encoder_artifact, lint_on_load=False)
    try:
        read = probe.conversation(convo, probe.index(ROUTES))
    finally:
        asyncio.run(probe.close())
    best = int(np.argmax(read.scores))
    assert ROUTES[best].name == "restaurants" and len(read.turns) == 3
    mixed, strongest = float(read.scores[best]), float(read.evidence[best])
    assert strongest == float(read.turns[:, best].max()) and mixed < strongest
    between = start(encoder_artifact, other_threshold=(mixed + strongest) / 2)
    above = start(encoder_artifact, other_threshold=strongest + 0.01)
    try:
        assert between.decide_sync(convo, ROUTES).route == "restaurants"
        assert above.decide_sync(convo, ROUTES).route == OTHER_ROUTE
        # One turn: the rule is the plain threshold.
        alone = between.conversation(convo[:1], between.index(ROUTES))
        assert np.array_equal(alone.evidence, alone.scores)
    finally:
        for eng in (between, above):
            asyncio.run(eng.close())
