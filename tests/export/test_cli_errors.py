"""Each user-fixable failure names its cause and its fix, and exits with status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.models import run_export


def _fails_with(
    result_args: tuple[str, ...], *needles: str, env: dict[str, str] | None = None
) -> str:
    result = run_export(*result_args, env=env)
    assert result.returncode == 2, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
    return result.stderr


def test_unknown_variant(tiny_checkpoint: Path, tmp_path: Path) -> None:
    _fails_with(
        ("--model", str(tiny_checkpoint), "--variants", "int4,int3", "--out", str(tmp_path)),
        "unknown variant int3",
        "choose from int4, int8, fp16, fp32",
    )
    assert not any(tmp_path.iterdir())


def test_not_qwen2(tmp_path: Path) -> None:
    ckpt = tmp_path / "llama"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    _fails_with(
        ("--model", str(ckpt), "--out", str(tmp_path / "out")),
        "architecture 'llama' (LlamaForCausalLM) is not Qwen2",
        "Pass an Arch-Router / Qwen2 checkpoint",
    )


def test_hub_unreachable(tmp_path: Path) -> None:
    _fails_with(
        ("--model", "katanemo/Arch-Router-1.5B", "--out", str(tmp_path)),
        "the hub is unreachable",
        "Pass a local checkpoint directory",
        env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path)},
    )


def test_missing_local_directory(tmp_path: Path) -> None:
    _fails_with(("--model", str(tmp_path / "nope")), "no such checkpoint directory")


def test_disk_too_small(tiny_checkpoint: Path, tmp_path: Path) -> None:
    stderr = _fails_with(
        ("--model", str(tiny_checkpoint), "--variants", "int4,fp32", "--out", str(tmp_path)),
        "not enough disk space",
        "pass --out on a larger disk, or export fewer variants",
        env={"GRPC_ROUTER_EXPORT_FREE_BYTES": "1000"},
    )
    assert "only 1000 B is free" in stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flag", ["--int4-block-size", "--accuracy-level"])
def test_bad_numbers_are_argparse_errors(flag: str) -> None:
    result = run_export("--model", "x/y", flag, "seven")
    assert result.returncode == 2 and flag in result.stderr


def test_make_export_passes_its_variables_to_the_cli() -> None:
    """`make export` (what users run) forwards MODEL, REVISION, NAME and VARIANTS unchanged."""
    import shutil
    import subprocess

    from tests.fixtures.paths import repo_root

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry = subprocess.run(
        ["make", "-n", "export", "MODEL=/ckpt dir", "REVISION=abc123", "NAME=n", "VARIANTS=int8"],
        cwd=repo_root(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.replace("\\\n", " ")
    assert "-m export --model '/ckpt dir' --revision 'abc123'" in dry
    assert "--name 'n'" in dry and "--variants 'int8'" in dry
