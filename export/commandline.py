"""`python -m export --model <hub id | checkpoint dir | minilm> ...` (what `make export` runs)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from export.decoder_export import (
    DEFAULT_REASON,
    ExportOptions,
    VariantResult,
    export_decoder,
    parse_variants,
)
from export.decoder_variants import QuantSettings
from export.encoder_export import export_encoder
from export.failures import ExportError
from export.manifest import write_text_atomic
from export.progress import Progress, human_size, markdown_table, peak_rss_gib
from export.source import (
    DEFAULT_MODEL,
    MINILM_ALIAS,
    Checkpoint,
    check_architecture,
    resolve_checkpoint,
)

# The fastest exact variant (see decoder_export.DEFAULT_REASON); VARIANTS= picks others.
DEFAULT_VARIANTS = "int8"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a checkpoint to a self-describing ONNX artifact "
        "(artifacts/<name>/<variant>/ with manifest.json).",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id, local checkpoint dir, or '{MINILM_ALIAS}' (default {DEFAULT_MODEL})",
    )
    parser.add_argument("--revision", default=None, help="hub revision (commit sha to pin)")
    parser.add_argument("--name", default=None, help="artifact name (default: from the model)")
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated of int4,int8,fp16,fp32 (default {DEFAULT_VARIANTS})",
    )
    parser.add_argument("--out", type=Path, default=Path("artifacts"), help="artifact root folder")
    parser.add_argument("--int4-block-size", type=int, default=128)
    parser.add_argument(
        "--int8-scheme",
        choices=("rowwise", "nbits"),
        default="rowwise",
        help="rowwise: per-row dynamic int8 (exact); nbits: MatMulNBits 8-bit",
    )
    parser.add_argument("--int8-block-size", type=int, default=128, help="for --int8-scheme nbits")
    parser.add_argument(
        "--plain-attention",
        action="store_true",
        help="keep the int8 variant's attention as plain operators (default: one fused "
        "GroupQueryAttention node per layer, faster on CPU; the engine then prefills one "
        "request per run)",
    )
    parser.add_argument(
        "--accuracy-level",
        type=int,
        default=4,
        choices=(0, 1, 2, 3, 4),
        help="MatMulNBits compute type (4 = int8 per block of a row)",
    )
    parser.add_argument("--asymmetric", action="store_true", help="MatMulNBits with zero points")
    parser.add_argument(
        "--fp32-tolerance",
        type=float,
        default=1e-4,
        help="max |logit diff| of the fp32 graph vs PyTorch; beyond it the export fails",
    )
    parser.add_argument(
        "--parity-threshold",
        type=float,
        default=None,
        help="max KL a quantized variant may show (default: report only)",
    )
    parser.add_argument("--no-parity", action="store_true", help="skip the parity check")
    return parser


def default_name(ckpt: Checkpoint, model: str) -> str:
    if model == MINILM_ALIAS:
        return MINILM_ALIAS
    return Path(model.rstrip("/")).name.lower()


def summary(results: Sequence[VariantResult], total_s: float) -> tuple[str, list[dict[str, Any]]]:
    rows = []
    data = []
    for r in results:
        p = r.parity
        if p.get("checked"):
            parity = (
                f"max|Δ| {p['max_abs_logit_diff']:.2e}, KL {p['max_kl']:.2e}, "
                f"greedy {p['greedy_token_agreement']:.0%}"
            )
        else:
            parity = "not checked: " + str(p.get("reason", ""))[:60]
        rows.append([r.variant, human_size(r.size_bytes), parity, f"{r.seconds:.1f} s"])
        data.append(
            {
                "variant": r.variant,
                "path": str(r.path),
                "size_bytes": r.size_bytes,
                "seconds": round(r.seconds, 2),
                "parity": {k: v for k, v in p.items() if k != "cases"},
            }
        )
    table = markdown_table(["variant", "size", "parity vs PyTorch", "time"], rows)
    return table + f"\n\ntotal {total_s:.1f} s, peak RSS {peak_rss_gib():.2f} GiB", data


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = Progress()
    start = time.perf_counter()
    try:
        variants = parse_variants(args.variants) if args.variants else None
        ckpt = resolve_checkpoint(args.model, args.revision)
        check_architecture(ckpt.config, args.model)
        name = args.name or default_name(ckpt, args.model)
        if ckpt.model_type == "bert":
            return _export_encoder(ckpt, args, name, variants, progress)
        opts = ExportOptions(
            name=name,
            out=args.out,
            variants=variants or parse_variants(DEFAULT_VARIANTS),
            settings=QuantSettings(
                int4_block_size=args.int4_block_size,
                int8_block_size=args.int8_block_size,
                int8_scheme=args.int8_scheme,
                fused_attention=not args.plain_attention,
                accuracy_level=args.accuracy_level,
                symmetric=not args.asymmetric,
            ),
            fp32_tolerance=args.fp32_tolerance,
            parity_threshold=args.parity_threshold,
            parity=not args.no_parity,
        )
        results = export_decoder(ckpt, opts, progress)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = time.perf_counter() - start
    table, data = summary(results, total)
    root = args.out / name
    write_text_atomic(root / "export-report.md", f"# export of {ckpt.source_id}\n\n{table}\n")
    report = {
        "source": ckpt.source_id,
        "revision": ckpt.revision,
        "total_seconds": round(total, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "default_reason": DEFAULT_REASON,
        "variants": data,
    }
    write_text_atomic(root / "export-report.json", json.dumps(report, indent=2) + "\n")
    print(f"\n{root}\n{table}")
    return 0


def _export_encoder(
    ckpt: Checkpoint,
    args: argparse.Namespace,
    name: str,
    variants: tuple[str, ...] | None,
    progress: Progress,
) -> int:
    table = export_encoder(
        ckpt.path,
        out=args.out,
        name=name,
        variants=variants,
        source_id=ckpt.source_id,
        revision=ckpt.revision,
        progress=progress,
    )
    print(table)
    return 0
