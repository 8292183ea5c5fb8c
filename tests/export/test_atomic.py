"""A killed export leaves the previous artifact intact, and the next run cleans up after it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from grpc_router.engines.artifact import list_variants, load_artifact
from tests.fixtures.models import TINY_VARIANTS, run_export
from tests.fixtures.paths import repo_root


def test_sigkill_mid_export_keeps_the_old_artifact(
    tiny_checkpoint: Path, tiny_artifacts: Path, tmp_path: Path
) -> None:
    root = tmp_path / "out" / "tiny"
    shutil.copytree(tiny_artifacts, root)
    before = {v: load_artifact(root / v) for v in TINY_VARIANTS}
    args = ["--model", str(tiny_checkpoint), "--name", "tiny", "--out", str(root.parent)]
    args += ["--variants", "int8,int4"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "export", *args],
        cwd=repo_root(),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "int4: parity ..." in line:  # int4's temp dir holds a graph but no manifest yet
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)

    assert list_variants(root) == sorted(TINY_VARIANTS)
    for variant in TINY_VARIANTS:
        load_artifact(root / variant)  # every hash still verifies
    assert load_artifact(root / "int4") == before["int4"]  # untouched, not half-replaced
    assert load_artifact(root / "int8").created_at >= before["int8"].created_at
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert any(name.startswith(".tmp-int4-") for name in leftovers), leftovers

    rerun = run_export(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".work-", ".old-"))] == []
    rebuilt = load_artifact(root / "int4")
    assert rebuilt.created_at >= before["int4"].created_at
    # Without an fp32 variant, the fp32 graph it was derived from was still checked and recorded.
    assert rebuilt.parity["fp32_base"]["max_abs_logit_diff"] < 1e-4
    assert list_variants(root) == sorted(TINY_VARIANTS)
