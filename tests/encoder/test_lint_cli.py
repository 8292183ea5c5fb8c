"""`grpc-router lint` in a real subprocess: a constructed overlapping route set is flagged (table,
JSON shape, exit codes with and without --strict), a clean one is not, and a missing or broken
file gets an error that says what to do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

OVERLAPPING = [
    {"name": "banking", "description": "Banking: account balance, transfer money, pay bill."},
    {
        "name": "payments",
        "description": "Banking: account balance, transfer money, pay bill, report fraud.",
        "examples": ["play some jazz", "send money to my landlord"],
    },
    {"name": "music", "description": "Music: play a song, search for songs, next track."},
    {"name": "weather", "description": "Weather forecasts: rain, temperature, wind, snow."},
]
CLEAN = [
    {"name": "weather", "description": "Weather forecasts: rain, temperature, wind, snow."},
    {"name": "music", "description": "Music: play a song, search for songs, next track."},
    {"name": "restaurants", "description": "Restaurants: find a restaurant, book a table."},
]


def lint(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "grpc_router.cli", "lint", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_overlapping_set_is_flagged(tmp_path: Path, encoder_artifact: Path) -> None:
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps(OVERLAPPING))
    art = ("--encoder-artifact", str(encoder_artifact))
    strict = lint(str(routes), "--json", "--strict", *art)
    assert strict.returncode == 1, strict.stderr
    report = json.loads(strict.stdout)
    assert set(report) >= {"file", "routes", "examples", "findings", "counts", "other"}
    assert report["routes"] == ["banking", "payments", "music", "weather"]
    assert report["counts"]["overlap"] >= 1 and report["counts"]["example_elsewhere"] >= 1
    first = report["findings"][0]
    assert first["kind"] == "overlap" and first["routes"] == ["banking", "payments"]
    assert set(first) == {"kind", "routes", "score", "message", "pairs", "text", "details"}
    assert {"a": "account balance", "b": "account balance", "similarity": 1.0} in first["pairs"]
    assert first["details"]["description_similarity"] >= 0.7
    elsewhere = [f for f in report["findings"] if f["kind"] == "example_elsewhere"]
    assert any(f["text"] == "play some jazz" and f["routes"][1] == "music" for f in elsewhere)
    assert report["other"]["mode"] == "auto" and report["other"]["source"] == "examples"
    # Without --strict: the same findings, exit 0; the table names them.
    table = lint(str(routes), *art)
    assert table.returncode == 0, table.stderr
    assert "overlap" in table.stdout and "banking" in table.stdout and "findings" in table.stdout
    assert "account balance" in table.stdout


def test_clean_config_yaml_passes_strict(tmp_path: Path, encoder_artifact: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "routes": [{**r, "models": ["m"]} for r in CLEAN],
                "models": {"m": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}},
                "engine": {"encoder_artifact": str(encoder_artifact)},
            }
        )
    )
    result = lint(str(config), "--strict", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["findings"] == [] and report["counts"] == {
        "overlap": 0,
        "vague": 0,
        "example_elsewhere": 0,
    }


def test_missing_and_invalid_files_say_what_to_do(tmp_path: Path, encoder_artifact: Path) -> None:
    missing = lint(str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert "no such file" in missing.stderr and "examples/routes.yaml" in missing.stderr
    broken = tmp_path / "broken.json"
    broken.write_text('[{"name": "a", ')
    bad = lint(str(broken))
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr and "Fix" in bad.stderr
    empty = tmp_path / "empty.yaml"
    empty.write_text("server: {port: 1}\n")
    none = lint(str(empty))
    assert none.returncode == 2 and "found no routes" in none.stderr
    bad_examples = tmp_path / "bad-examples.json"
    bad_examples.write_text(json.dumps([{"name": "a", "examples": "one example"}]))
    bad_ex = lint(str(bad_examples))
    assert bad_ex.returncode == 2 and "routes[0].examples must be a list" in bad_ex.stderr
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps(CLEAN))
    no_model = lint(str(routes), "--encoder-artifact", str(tmp_path / "no-artifact"))
    assert no_model.returncode == 2 and "make export-encoder" in no_model.stderr
    dupes = tmp_path / "dupes.json"
    dupes.write_text(json.dumps([CLEAN[0], CLEAN[0]]))
    dup = lint(str(dupes), "--encoder-artifact", str(encoder_artifact))
    assert dup.returncode == 2 and "duplicate route name" in dup.stderr
