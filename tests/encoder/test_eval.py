"""`grpc-router eval` on small sets built here: in process through the service's Router, over
gRPC against a real server, bad input, and a slice of the dev sets vendored in data/eval."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from grpc_router.evaluate import compute_metrics, route_name, run_eval
from grpc_router.settings import EngineConfig
from grpc_router.types import OTHER_ROUTE, RouteSpec
from tests.fixtures.paths import eval_dir
from tests.service.conftest import ServerProcess, make_config, start_server
from tests.service.fake_upstream import FakeUpstream

ROUTES = [
    {"name": "Weather", "description": "Weather forecasts: rain, temperature, wind, snow."},
    {"name": "BankAccounts", "description": "Banking: account balance, transfer money."},
    {"name": "Music", "description": "Music: play a song, search for songs, next track."},
]
CASES = [
    ([("user", "will it rain in Boston tomorrow?")], "Weather"),
    ([("user", "how cold will it be on Saturday")], "Weather"),
    ([("user", "move 300 dollars into my savings account")], "BankAccounts"),
    ([("user", "what's my checking balance")], "BankAccounts"),
    ([("user", "play something by Miles Davis")], "Music"),
    (
        [
            ("user", "I want to listen to some music"),
            ("assistant", "Which artist?"),
            ("user", "Adele, please"),
        ],
        "Music",
    ),
    ([("user", "xq zv 9981 lorem ipsum dolor")], None),
]


def write_set(tmp: Path) -> tuple[Path, Path]:
    routes = tmp / "routes.json"
    routes.write_text(json.dumps(ROUTES))
    cases = tmp / "set.jsonl"
    cases.write_text(
        "".join(
            json.dumps({"messages": [{"role": r, "content": c} for r, c in turns], "label": label})
            + "\n"
            for turns, label in CASES
        )
    )
    return cases, routes


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "grpc_router.cli", "eval", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_in_process(tmp_path: Path, encoder_artifact: Path) -> None:
    cases, routes = write_set(tmp_path)
    out = tmp_path / "reports"
    result = cli(
        str(cases), "--routes", str(routes), "--engine", "encoder",
        "--encoder-artifact", str(encoder_artifact), "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "eval-set-encoder.json").read_text())
    assert report["cases"] == len(CASES) and report["errors"] == 0
    assert report["in_scope_accuracy"] >= 5 / 6
    assert report["engines"] == {"encoder": len(CASES)}
    assert set(report["per_route"]) == {"weather", "bank_accounts", "music", OTHER_ROUTE}
    assert report["latency_ms"]["p95"] >= report["latency_ms"]["p50"] > 0
    markdown = (out / "eval-set-encoder.md").read_text()
    assert "| label \\ answer |" in markdown and "macro-F1" in markdown
    assert "in-scope accuracy" in result.stdout
    assert "/7" in result.stderr  # progress


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, encoder_artifact: Path
) -> Iterator[ServerProcess]:
    with FakeUpstream() as upstream:
        engine: dict[str, Any] = {"kind": "encoder", "encoder_artifact": str(encoder_artifact)}
        srv = start_server(tmp_path_factory.mktemp("eval"), make_config(upstream.base_url, engine))
        yield srv
        assert srv.stop() == 0


def test_over_grpc_matches_in_process(
    tmp_path: Path, server: ServerProcess, encoder_artifact: Path
) -> None:
    cases, routes = write_set(tmp_path)
    remote = asyncio.run(run_eval(cases, routes, target=server.target, out=None, progress=False))
    local = asyncio.run(
        run_eval(
            cases,
            routes,
            engine=EngineConfig(kind="encoder", encoder_artifact=encoder_artifact),
            out=None,
            progress=False,
        )
    )
    assert remote["errors"] == 0 and remote["engines"] == {"encoder": len(CASES)}
    assert remote["confusion"] == local["confusion"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "set.jsonl:1"),
        ('{"messages": [], "label": "Nope"}', "not in the routes file"),
        ('{"messages": [{"role": "robot", "content": "x"}], "label": null}', "set.jsonl:1"),
    ],
)
def test_bad_set_names_the_line(tmp_path: Path, line: str, message: str) -> None:
    cases, routes = write_set(tmp_path)
    cases.write_text(line + "\n")
    result = cli(str(cases), "--routes", str(routes), "--engine", "encoder")
    assert result.returncode == 2
    assert message in result.stderr and "README" in result.stderr


def test_missing_routes_file(tmp_path: Path) -> None:
    cases, _ = write_set(tmp_path)
    result = cli(str(cases), "--routes", str(tmp_path / "none.json"))
    assert result.returncode == 2 and "none.json: cannot read" in result.stderr


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ([{"description": "x"}], "routes[0] needs a string `name`"),
        ([{"name": "a", "description": ["x"]}], "routes[0].description must be a string"),
        ([{"name": "a", "examples": "one example"}], "routes[0].examples must be a list"),
    ],
)
def test_bad_routes_file_names_the_route(
    tmp_path: Path, routes: list[dict[str, object]], message: str
) -> None:
    """The same checks as `grpc-router lint` (one parser): an `examples` string is refused,
    not read as a list of its characters."""
    cases, routes_file = write_set(tmp_path)
    routes_file.write_text(json.dumps(routes))
    result = cli(str(cases), "--routes", str(routes_file), "--engine", "encoder")
    assert result.returncode == 2 and message in result.stderr


def test_metrics_arithmetic() -> None:
    from grpc_router.evaluate import EvalCase, Prediction

    routes = [RouteSpec("a", "A"), RouteSpec("b", "B")]
    labels = ["a", "a", "b", OTHER_ROUTE]
    answers = ["a", "b", "b", OTHER_ROUTE]
    m = compute_metrics(
        [EvalCase((), label) for label in labels],
        [Prediction(a, "encoder", float(i + 1)) for i, a in enumerate(answers)],
        routes,
    )
    assert m["accuracy"] == 0.75 and m["in_scope_accuracy"] == pytest.approx(2 / 3)
    assert m["per_route"]["b"]["precision"] == 0.5 and m["per_route"]["a"]["recall"] == 0.5
    assert m["other_precision"] == 1.0 and m["other_recall"] == 1.0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1.0) / 3)
    assert m["confusion"]["a"] == {"a": 1, "b": 1}
    assert route_name("RentalCars") == "rental_cars" and route_name("3d") == "r_3d"


@pytest.mark.parametrize(
    ("set_name", "routes_name", "cases", "routes"),
    [
        ("clinc150_val", "clinc150_routes", 3100, 10),
        ("clinc150_val", "clinc150_routes_examples", 3100, 10),
        ("sgd_dev", "sgd_dev_routes", 1500, 16),
    ],
)
def test_vendored_sets_load(set_name: str, routes_name: str, cases: int, routes: int) -> None:
    """Every case of data/eval loads and names a route of its routes file (or none)."""
    from grpc_router.evaluate import load_cases, load_routes

    specs = load_routes(eval_dir() / f"{routes_name}.json")
    loaded = load_cases(eval_dir() / f"{set_name}.jsonl", specs, None)
    assert len(specs) == routes and len(loaded) == cases
    labels = {c.label for c in loaded}
    assert labels - {OTHER_ROUTE} == {r.name for r in specs}


def test_dev_set_slice(tmp_path: Path, encoder_artifact: Path) -> None:
    """The first cases of the real CLINC150 val set (routing is far above chance)."""
    data = eval_dir()
    m = asyncio.run(
        run_eval(
            data / "clinc150_val.jsonl",
            data / "clinc150_routes.json",
            engine=EngineConfig(kind="encoder", encoder_artifact=encoder_artifact),
            limit=60,
            out=tmp_path,
            progress=False,
        )
    )
    assert m["cases"] == 60 and m["accuracy"] > 0.5


def test_calibrate(tmp_path: Path, encoder_artifact: Path) -> None:
    from grpc_router.evaluate import calibrate_encoder

    cases, routes = write_set(tmp_path)
    engine = EngineConfig(kind="encoder", encoder_artifact=encoder_artifact)
    found = asyncio.run(calibrate_encoder([(cases, routes)], engine=engine, quantile=0.5))
    assert found["in_scope_cases"] == 6 and found["null_cases"] == 1
    assert found["in_scope_below_threshold"] == 0.5
    assert 0.002 <= found["temperature"] <= 1.0
    # The off-topic case scores below the median in-scope case.
    assert found["null_recall_at_threshold"] == 1.0
    result = cli(
        str(cases), "--routes", str(routes), "--calibrate",
        "--encoder-artifact", str(encoder_artifact),
    )  # fmt: skip
    assert result.returncode == 0 and '"other_threshold"' in result.stdout
