"""`python -m bench.replica`: distinct conversations stay distinct, the served config is
`make serve`'s with only the engine and ports changed, and a short run against a real
`grpc-router serve` subprocess (the encoder fixture) stops by itself and reports every level."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from bench import replica
from grpc_router.core.conversation import routing_view, view_key
from grpc_router.settings import parse_config
from tests.fixtures.paths import repo_root


def test_distinct_conversations_never_repeat_and_repeated_ones_do() -> None:
    pool = replica.conversation_pool()
    assert len(pool) == 3100 + 1500
    assert any(len(c) > 1 for c in pool[:10]) and any(len(c) == 1 for c in pool[:10])
    distinct = replica.Conversations(pool[:50])
    keys = {view_key(routing_view(distinct.take(), ()), "") for _ in range(200)}
    assert len(keys) == 200  # numbered once the pool is used up
    repeated = replica.Conversations(pool, repeat=4)
    assert len({view_key(routing_view(repeated.take(), ()), "") for _ in range(40)}) == 4


def test_served_config_is_make_serves_with_the_encoder_and_free_ports(tmp_path: Path) -> None:
    base = repo_root() / "examples" / "routes.yaml"
    data = replica.server_config(base, tmp_path / "minilm", 50123, 50124)
    config = parse_config(data, tmp_path / "replica.yaml")
    served = yaml.safe_load(base.read_text())
    assert config.engine.kind == "encoder"
    assert config.engine.encoder_artifact == tmp_path / "minilm"
    assert (config.server.host, config.server.port) == ("127.0.0.1", 50123)
    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", 50124)
    assert config.server.max_concurrent_rpcs == served["server"]["max_concurrent_rpcs"]
    assert [r.name for r in config.routes] == [r["name"] for r in served["routes"]]


def test_a_short_run_against_a_real_server(encoder_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    code = replica.main(
        ["--levels", "1,8", "--duration", "1", "--max-calls", "300", "--repeated", "4",
         "--artifact", str(encoder_artifact), "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "replica-bench.json").read_text())
    rows = report["rows"]
    assert [r["in_flight"] for r in rows] == [1, 8, 16]
    for row in rows:
        assert 0 < row["calls"] <= 300
        assert row["errors"] == {}
        assert row["p50_ms"] is not None and row["p99_ms"] >= row["p50_ms"]
        assert row["readiness"], "readiness was sampled"
    assert rows[0]["sources"] == {"DECISION_SOURCE_ENGINE": rows[0]["calls"]}
    cached = rows[-1]["sources"].get("DECISION_SOURCE_CACHE", 0)
    assert cached >= rows[-1]["calls"] - 4 - 16  # all but the first call of each conversation
    assert "| 8 | distinct |" in (out / "replica-bench.md").read_text()
