"""The decoder export, step by step: fp32 base -> each variant -> parity -> atomic publish."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.decoder_variants import (
    MODEL_FILE,
    VARIANTS,
    QuantSettings,
    build_variant,
    copy_checkpoint_files,
    estimate_variant_bytes,
    export_fp32,
)
from export.failures import ExportError
from export.fuse import attention_kind
from export.manifest import ArtifactBuilder, graph_facts, scratch_dir, set_default_variant
from export.parity import TorchReference, encode_cases, onnx_parity, torch_reference
from export.progress import Progress, human_size
from export.source import Checkpoint
from export.streamline import streamline_file
from grpc_router.engines.artifact import list_variants, pick_default, read_manifest

FREE_BYTES_ENV = "GRPC_ROUTER_EXPORT_FREE_BYTES"
# Where each variant is meant to run (recorded in the manifest for the server's choice of EP).
TARGETS = {
    "int4": ["CPUExecutionProvider", "CUDAExecutionProvider"],
    "int8": ["CPUExecutionProvider"],
    "fp16": ["CUDAExecutionProvider", "TensorrtExecutionProvider"],
    "fp32": ["CPUExecutionProvider", "CUDAExecutionProvider"],
}
DEFAULT_REASON = (
    "the default is the fastest exact variant (manifest quantization.exact): row-wise dynamic "
    "int8 keeps integer-GEMM speed and is bit-exact under cached prefixes, padding and batching; "
    "MatMulNBits int4 (accuracy_level 4) is faster to decode but a cached prefix, padding or "
    "batching moves its logits ~1e-7; quantize_dynamic's per-call scale is not offered at all."
)


@dataclass
class ExportOptions:
    name: str
    out: Path
    variants: tuple[str, ...] = ("int4", "int8")
    settings: QuantSettings = field(default_factory=QuantSettings)
    fp32_tolerance: float = 1e-4
    parity_threshold: float | None = None
    """Max KL (prefill or decode) a quantized variant may show; None reports without gating."""
    parity: bool = True
    free_bytes: int | None = None
    """Free space at `out` (None: ask the filesystem; the env var overrides, for tests)."""


@dataclass
class VariantResult:
    variant: str
    path: Path
    size_bytes: int
    parity: dict[str, Any]
    seconds: float


def parse_variants(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise ExportError(
            f"unknown variant {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(VARIANTS)} (comma-separated, e.g. --variants int4,int8 or VARIANTS=int4)."
        )
    return names


def free_bytes_at(path: Path, override: int | None) -> int:
    if os.environ.get(FREE_BYTES_ENV):
        return int(os.environ[FREE_BYTES_ENV])
    if override is not None:
        return override
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_disk(config: dict[str, Any], opts: ExportOptions) -> int:
    """Refuse early when the variants (plus the temporary fp32 base) cannot fit."""
    needed = estimate_variant_bytes(config, "fp32", opts.settings)  # the fp32 base, always
    needed += sum(
        estimate_variant_bytes(config, v, opts.settings) for v in opts.variants if v != "fp32"
    )
    needed = int(needed * 1.1)  # graph protos, tokenizer files, slack
    free = free_bytes_at(opts.out, opts.free_bytes)
    if free < needed:
        raise ExportError(
            f"not enough disk space in {opts.out}: exporting {', '.join(opts.variants)} needs "
            "about "
            f"{human_size(needed)} (including a temporary fp32 copy) and only {human_size(free)} "
            "is free. Free some space, pass --out on a larger disk, or export fewer variants "
            "(e.g. --variants int4)."
        )
    return needed


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _decoder_facts(config: dict[str, Any]) -> dict[str, Any]:
    heads = int(config["num_attention_heads"])
    return {
        "model_type": config.get("model_type"),
        "num_layers": int(config["num_hidden_layers"]),
        "num_key_value_heads": int(config.get("num_key_value_heads", heads)),
        "head_dim": int(config.get("head_dim") or int(config["hidden_size"]) // heads),
        "vocab_size": int(config["vocab_size"]),
        "eos_token_id": config.get("eos_token_id"),
        "pad_token_id": config.get("pad_token_id"),
        "kv_cache_layout": "past_key_values.{i}.key/.value [batch, kv_heads, past, head_dim]",
    }


def _gate(variant: str, report: dict[str, Any], opts: ExportOptions) -> None:
    if not report.get("checked"):
        return
    if variant == "fp32":
        if report["max_abs_logit_diff"] > opts.fp32_tolerance:
            raise ExportError(
                f"fp32 parity failed: max |logit diff| {report['max_abs_logit_diff']:.3g} vs "
                f"PyTorch exceeds {opts.fp32_tolerance:g}; the export is wrong (check the "
                "optimum/transformers versions pinned in pyproject.toml)."
            )
        report["gate"] = f"max_abs_logit_diff <= {opts.fp32_tolerance:g}: pass"
        return
    if opts.parity_threshold is None:
        report["gate"] = (
            "off: quantized variants are reported, not gated (--parity-threshold sets a max KL); "
            "on random weights logit margins are tiny, so agreement there says little"
        )
        return
    if report["max_kl"] > opts.parity_threshold:
        raise ExportError(
            f"{variant} parity failed: KL {report['max_kl']:.3g} exceeds --parity-threshold "
            f"{opts.parity_threshold:g}; pick another variant or a smaller block size."
        )
    report["gate"] = f"max_kl <= {opts.parity_threshold:g}: pass"


@dataclass
class _ParityReference:
    """What every variant's parity is measured against (no references when parity is off)."""

    eos: int
    refs: list[TorchReference] = field(default_factory=list)
    tokenizer: Any = None
    base: dict[str, Any] | None = None
    """The fp32 base graph's own parity, when fp32 is not one of the variants (each variant's
    report then records the graph it was derived from)."""


def _variant_parity(variant: str, model_path: Path, reference: _ParityReference) -> dict[str, Any]:
    try:
        return onnx_parity(model_path, reference.refs, reference.tokenizer, reference.eos)
    except Exception as exc:
        if variant != "fp16":
            raise
        # fp16 targets CUDA/TensorRT; this onnxruntime may lack CPU kernels for it.
        return {
            "checked": False,
            "reason": f"not runnable on CPUExecutionProvider here ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); check it on a CUDA machine",
        }


def _exact_variants(root: Path) -> list[str]:
    """Variants whose manifest says a request's logits do not depend on what shares the call."""
    return [
        v for v in list_variants(root) if read_manifest(root / v).quantization.get("exact") is True
    ]


def export_decoder(
    ckpt: Checkpoint, opts: ExportOptions, progress: Progress
) -> list[VariantResult]:
    """Export `ckpt` into `opts.out/opts.name/<variant>/` for every requested variant."""
    root = opts.out / opts.name
    needed = check_disk(ckpt.config, opts)
    progress.info(
        f"{ckpt.source_id} -> {root} (variants {', '.join(opts.variants)}; about "
        f"{human_size(needed)} of disk)"
    )
    with scratch_dir(root, "base") as work:
        fp32_model, streamlined = _export_base(ckpt, work, progress)
        reference = _parity_reference(ckpt, opts, fp32_model, progress)
        results = [
            _export_variant(variant, ckpt, opts, fp32_model, streamlined, reference, progress)
            for variant in opts.variants
        ]
    _set_default(root, progress)
    return results


def _export_base(
    ckpt: Checkpoint, work: Path, progress: Progress
) -> tuple[Path, dict[str, object]]:
    """The streamlined fp32 graph every variant is derived from, and what streamlining did."""
    with progress.step("load checkpoint + export fp32 graph (optimum)"):
        fp32_model = export_fp32(ckpt.path, work)
    with progress.step("streamline the graph (attention masks, grouped heads, logits)"):
        streamlined = streamline_file(fp32_model, ckpt.config).as_dict()
    progress.info(f"streamline: {streamlined}")
    return fp32_model, streamlined


def _parity_reference(
    ckpt: Checkpoint, opts: ExportOptions, fp32_model: Path, progress: Progress
) -> _ParityReference:
    """PyTorch's answers to the routing prompts; when fp32 is not exported as a variant, the
    fp32 base graph is checked (and gated) against them here."""
    reference = _ParityReference(eos=int(_decoder_facts(ckpt.config)["eos_token_id"] or -1))
    if not opts.parity:
        return reference
    with progress.step("parity reference (PyTorch fp32, routing prompts)"):
        reference.refs = torch_reference(ckpt.path)
        reference.tokenizer, _ = encode_cases(ckpt.path, [])
    if "fp32" not in opts.variants:
        with progress.step("parity fp32 base graph"):
            base = _variant_parity("fp32", fp32_model, reference)
            _gate("fp32", base, opts)
        progress.info(
            f"fp32 base graph vs PyTorch: max |logit diff| {base['max_abs_logit_diff']:.2e}"
        )
        reference.base = base
    return reference


def _export_variant(
    variant: str,
    ckpt: Checkpoint,
    opts: ExportOptions,
    fp32_model: Path,
    streamlined: dict[str, object],
    reference: _ParityReference,
    progress: Progress,
) -> VariantResult:
    """Build, check and publish one variant directory (atomically: all of it or none)."""
    start = time.perf_counter()
    final = opts.out / opts.name / variant
    with ArtifactBuilder(final) as builder:
        label = "link" if variant == "fp32" else "quantize" if "int" in variant else "convert"
        with progress.step(f"{variant}: {label}"):
            model_path = build_variant(variant, fp32_model, builder.tmp, opts.settings, ckpt.config)
        copy_checkpoint_files(ckpt.path, builder.tmp)
        report = _checked_parity(variant, model_path, reference, opts, progress)
        with progress.step(f"{variant}: hash + manifest"):
            builder.write_manifest(
                kind="decoder",
                name=opts.name,
                source={"id": ckpt.source_id, "revision": ckpt.revision},
                variant=variant,
                model_file=MODEL_FILE,
                quantization=opts.settings.for_variant(variant),
                parity=report,
                extra={
                    **_decoder_facts(ckpt.config),
                    "targets": TARGETS[variant],
                    "streamline": streamlined,
                    "attention": attention_kind(model_path),
                },
                **graph_facts(model_path),
            )
    return VariantResult(variant, final, _dir_size(final), report, time.perf_counter() - start)


def _checked_parity(
    variant: str,
    model_path: Path,
    reference: _ParityReference,
    opts: ExportOptions,
    progress: Progress,
) -> dict[str, Any]:
    """The variant's parity report, gated by the options (raises ExportError on failure)."""
    if not opts.parity:
        return {"checked": False, "reason": "parity disabled (--no-parity)"}
    with progress.step(f"{variant}: parity"):
        report = _variant_parity(variant, model_path, reference)
    _gate(variant, report, opts)
    if reference.base is not None:  # the fp32 graph this variant was derived from
        report["fp32_base"] = {k: v for k, v in reference.base.items() if k != "cases"}
    return report


def _set_default(root: Path, progress: Progress) -> None:
    """The fastest exact variant now in `root` becomes its default (any variant if none is
    exact)."""
    default = pick_default(_exact_variants(root)) or pick_default(list_variants(root))
    if default is not None:
        set_default_variant(root, default)
        progress.info(f"default variant of {root}: {default}")
