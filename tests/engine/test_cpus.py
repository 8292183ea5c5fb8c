"""The CPUs an engine sizes its threads to: affinity, capped by a container's CPU limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from grpc_router.engines import cpus


def cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "200000 100000\n"}, 2.0),  # cgroup v2, limits: {cpu: 2}
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),  # v2 without a limit
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage\n"}, None),
        ({}, None),  # no cgroup files at all (not Linux, or not mounted)
    ],
)
def test_cgroup_quota(tmp_path: Path, files: dict[str, str], quota: float | None) -> None:
    assert cpus.cgroup_cpu_quota(cgroup(tmp_path, files)) == quota


def test_the_limit_caps_the_affinity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)), raising=False)
    assert cpus.available_cpus(cgroup(tmp_path / "none", {})) == 64
    assert cpus.available_cpus(cgroup(tmp_path / "two", {"cpu.max": "200000 100000"})) == 2
    # A fractional limit rounds down (threads beyond it would only be throttled), to 1 at least.
    assert cpus.available_cpus(cgroup(tmp_path / "half", {"cpu.max": "50000 100000"})) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert cpus.available_cpus(cgroup(tmp_path / "eight", {"cpu.max": "800000 100000"})) == 2


def test_arch_router_threads_follow_a_container_limit(
    tiny_artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime's own default counts the host's cores; under a CPU limit the Arch-Router
    session takes the limit instead. An explicit `intra_op_threads` wins either way."""
    from grpc_router.engines.arch_router import runtime

    model = tiny_artifacts / "int8" / "model.onnx"

    def threads(**kwargs: int) -> int:
        session = runtime.DecoderSession(model, provider="cpu", **kwargs)
        return int(session.session.get_session_options().intra_op_num_threads)

    monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda: None)
    assert threads() == 0  # onnxruntime's default
    monkeypatch.setattr(runtime, "cgroup_cpu_quota", lambda: 1.0)
    monkeypatch.setattr(runtime, "available_cpus", lambda: 1)
    assert threads() == 1
    assert threads(intra_op_threads=2) == 2
