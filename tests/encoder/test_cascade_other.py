"""The cascade and `other`: near-threshold `other` cases go to Arch-Router (the tiny artifact),
confident ones stay with the encoder; the eval's per-path shares and accuracies; the eval with
and without examples, and the `other` trade-off curve."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from grpc_router.engines.arch_router.engine import ArchRouterEngine
from grpc_router.engines.cascade import CascadeEngine, probability_margin
from grpc_router.engines.encoder.engine import EncoderEngine
from grpc_router.evaluate import compute_metrics, other_curve, run_eval
from grpc_router.settings import EncoderSettings, EngineConfig
from grpc_router.types import OTHER_ROUTE, Message, Role, RouteSpec

ROUTES = (
    RouteSpec("weather", "Weather forecasts: rain, temperature, wind, snow."),
    RouteSpec("music", "Music: play a song, search for songs, next track."),
)
RAIN = [Message(Role.USER, "will it rain in Boston tomorrow?")]


def best_score(encoder_artifact: Path, messages: list[Message]) -> float:
    probe = EncoderEngine(encoder_artifact, EncoderSettings(warmup=False, lint_on_load=False))
    asyncio.run(probe.start())
    try:
        scores, _, _ = probe.raw_scores(messages, probe.index(ROUTES))
        return float(scores.max())
    finally:
        asyncio.run(probe.close())


@pytest.mark.parametrize(
    ("offset", "decider", "route"),
    [
        (0.0, "arch-router", None),  # the best route scores at its threshold: uncertain
        (-0.3, "encoder", "weather"),  # far above the threshold: a sure route
        (+0.3, "encoder", OTHER_ROUTE),  # far below: a sure `other`
    ],
)
def test_near_threshold_other_goes_to_arch_router(
    tiny_artifacts: Path, encoder_artifact: Path, offset: float, decider: str, route: str | None
) -> None:
    threshold = best_score(encoder_artifact, RAIN) + offset
    fast = EncoderEngine(encoder_artifact, EncoderSettings(other_threshold=threshold))
    cascade = CascadeEngine(fast, ArchRouterEngine(tiny_artifacts), 0.5)

    async def run() -> None:
        await cascade.start()
        try:
            first = await fast.decide(RAIN, ROUTES)
            assert cascade.uncertain(first) == (decider == "arch-router")
            if offset == 0.0:
                assert first.scores[OTHER_ROUTE] == pytest.approx(first.scores["weather"])
                assert probability_margin(first.scores) < 0.05
            d = await cascade.decide(RAIN, ROUTES)
            assert d.engine == decider
            if route is not None:
                assert d.route == route
            fit = cascade.other_thresholds(ROUTES)
            assert fit is not None and fit.mode == "fixed" and fit.threshold == threshold
        finally:
            await cascade.close()

    asyncio.run(run())


def write_set(tmp: Path, examples: bool) -> tuple[Path, Path]:
    routes = [
        {
            "name": "Weather",
            "description": "Weather forecasts: rain, temperature, wind, snow.",
            **({"examples": ["is it going to be sunny", "how windy is it"]} if examples else {}),
        },
        {
            "name": "Music",
            "description": "Music: play a song, search for songs, next track.",
            **({"examples": ["put on some jazz", "skip this track"]} if examples else {}),
        },
    ]
    cases = [
        ("will it rain in Boston tomorrow?", "Weather"),
        ("how cold will it be on Saturday", "Weather"),
        ("play something by Miles Davis", "Music"),
        ("next song please", "Music"),
        ("what's the capital of Peru", None),
        ("how tall is Mount Everest", None),
    ]
    routes_path, set_path = tmp / "routes.json", tmp / "set.jsonl"
    routes_path.write_text(json.dumps(routes))
    set_path.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": t}], "label": label}) + "\n"
            for t, label in cases
        )
    )
    return set_path, routes_path


def test_eval_reports_each_paths_share_and_accuracy(
    tmp_path: Path, tiny_artifacts: Path, encoder_artifact: Path
) -> None:
    set_path, routes = write_set(tmp_path, examples=False)
    cfg = EngineConfig(
        kind="cascade",
        cascade_margin=0.9,
        encoder_artifact=encoder_artifact,
        arch_router_artifact=tiny_artifacts,
    )
    m = asyncio.run(run_eval(set_path, routes, engine=cfg, out=tmp_path, progress=False))
    paths = m["paths"]
    assert set(paths) <= {"encoder", "arch-router"} and m["errors"] == 0
    assert sum(p["cases"] for p in paths.values()) == m["cases"] == 6
    assert sum(p["share"] for p in paths.values()) == pytest.approx(1.0)
    for p in paths.values():
        assert 0.0 <= p["accuracy"] <= 1.0
    assert m["other_fit"]["mode"] == "auto"
    markdown = Path(m["report"]).read_text()
    assert Path(m["report"]).name == "eval-set-cascade.md"
    assert "## Paths (which engine decided)" in markdown and "`other` threshold: auto" in markdown


def test_path_metrics_arithmetic() -> None:
    from grpc_router.evaluate import EvalCase, Prediction

    routes = [RouteSpec("a", "A"), RouteSpec("b", "B")]
    rows = [("a", "a", "encoder"), ("b", "a", "encoder"), (OTHER_ROUTE, OTHER_ROUTE, "encoder"),
            ("a", "a", "arch-router"), (OTHER_ROUTE, "b", "arch-router")]  # fmt: skip
    m = compute_metrics(
        [EvalCase((), label) for label, _, _ in rows],
        [Prediction(answer, engine, 1.0) for _, answer, engine in rows],
        routes,
    )
    enc, arch = m["paths"]["encoder"], m["paths"]["arch-router"]
    assert (enc["cases"], enc["share"], enc["accuracy"]) == (3, 0.6, pytest.approx(2 / 3))
    assert enc["in_scope_accuracy"] == 0.5 and enc["other_recall"] == 1.0
    assert (arch["cases"], arch["accuracy"], arch["other_recall"]) == (2, 0.5, 0.0)
    assert arch["in_scope_accuracy"] == 1.0 and arch["other_answers"] == 0


def test_eval_with_and_without_examples(tmp_path: Path, encoder_artifact: Path) -> None:
    set_path, routes = write_set(tmp_path, examples=True)
    out = tmp_path / "reports"
    result = subprocess.run(
        [sys.executable, "-m", "grpc_router.cli", "eval", str(set_path), "--routes", str(routes),
         "--engine", "encoder", "--encoder-artifact", str(encoder_artifact), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with_ex = json.loads((out / "eval-set-encoder.json").read_text())
    bare = json.loads((out / "eval-set-no-examples-encoder.json").read_text())
    assert with_ex["examples"] == 4 and not with_ex["examples_dropped"]
    assert bare["examples"] == 0 and bare["examples_dropped"]
    assert with_ex["other_fit"]["source"] == "examples"
    assert bare["other_fit"]["source"] == "descriptions"
    assert "4 examples" in result.stdout and "descriptions only" in result.stdout


def test_other_curve(tmp_path: Path, encoder_artifact: Path) -> None:
    set_path, routes = write_set(tmp_path, examples=True)
    cfg = EngineConfig(kind="encoder", encoder_artifact=encoder_artifact)
    curve = asyncio.run(other_curve(set_path, routes, engine=cfg, quantiles=(0.0, 0.1, 0.4)))
    auto = [r for r in curve["rows"] if r["mode"] == "auto"]
    assert [r["quantile"] for r in auto] == [0.0, 0.1, 0.4]
    assert auto[0]["threshold"] <= auto[1]["threshold"] <= auto[2]["threshold"]
    assert auto[0]["other_recall"] <= auto[2]["other_recall"]
    off = curve["rows"][-1]
    assert off["mode"] == "off" and off["other_recall"] == 0.0
    assert curve["cases"] == 6 and curve["other_cases"] == 2
    bare = asyncio.run(other_curve(set_path, routes, engine=cfg, drop_examples=True))
    assert [r["source"] for r in bare["rows"] if r["mode"] == "auto"] == ["descriptions"]
    assert not math.isnan(bare["rows"][0]["other_recall"])
