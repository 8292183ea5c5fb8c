"""Export a BERT / sentence-transformers encoder (all-MiniLM-L6-v2) for the encoder engine.

`python -m export --model minilm` lands here: Optimum `feature-extraction` export to fp32, then an
int8 variant. Each variant is written atomically with the same manifest and hash checks as the
decoder artifacts; pooling facts go into `manifest.extra`, read by
`grpc_router.engines.encoder.embedding`.

int8 is onnxruntime's BERT fusions, then `quantize_dynamic` with per-channel uint8 weights. Its
activation scale is picked per call, so the serving side embeds one text per call: no other text
can shift a result.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.decoder_export import VariantResult
from export.failures import ExportError
from export.manifest import ArtifactBuilder, graph_facts, scratch_dir, set_default_variant
from export.progress import Progress, human_size, markdown_table

MODEL_FILE = "model.onnx"
ENCODER_VARIANTS: tuple[str, ...] = ("fp32", "int8")
DEFAULT_ENCODER_VARIANTS: tuple[str, ...] = ("int8",)
DEFAULT_MAX_LENGTH = 256
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "config.json",
)
# Sentences the parity check embeds with PyTorch and with each ONNX variant.
PARITY_TEXTS = (
    "what is the balance of my checking account",
    "book me a table for two at an italian place tonight",
    "how do you say thank you in japanese",
    "Find one way and round trip flights to your favorite city.",
    "ok",
)


def pooling_facts(checkpoint: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Pooling mode, normalisation and length cap, read from sentence-transformers' files."""
    pooling = "mean"
    pool_cfg = checkpoint / "1_Pooling" / "config.json"
    if pool_cfg.is_file():
        cfg = json.loads(pool_cfg.read_text(encoding="utf-8"))
        if cfg.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif not cfg.get("pooling_mode_mean_tokens", True):
            raise ExportError(
                f"{pool_cfg}: only mean or CLS pooling is supported by the encoder engine."
            )
    normalize = True
    modules = checkpoint / "modules.json"
    if modules.is_file():
        types = [m.get("type", "") for m in json.loads(modules.read_text(encoding="utf-8"))]
        normalize = any(t.endswith("Normalize") for t in types)
    max_length = DEFAULT_MAX_LENGTH
    st_cfg = checkpoint / "sentence_bert_config.json"
    if st_cfg.is_file():
        max_length = int(json.loads(st_cfg.read_text(encoding="utf-8")).get("max_seq_length", 256))
    max_length = min(max_length, int(config.get("max_position_embeddings", max_length)))
    return {
        "pooling": pooling,
        "normalize": normalize,
        "max_length": max_length,
        "dimension": int(config.get("hidden_size", 0)),
    }


def _export_fp32(checkpoint: Path, work: Path) -> Path:
    from optimum.exporters.onnx import main_export  # type: ignore[import-untyped]

    raw = work / "optimum"
    main_export(
        str(checkpoint),
        raw,
        task="feature-extraction",
        library_name="transformers",
        do_validation=False,
        local_files_only=True,
    )
    model = work / MODEL_FILE
    os.replace(raw / MODEL_FILE, model)
    shutil.rmtree(raw)
    return model


def _fuse(fp32_model: Path, out: Path, config: dict[str, Any]) -> dict[str, int]:
    """onnxruntime's BERT fusions (embedding layer norm, attention, skip layer norm, bias GELU)
    into `out`; returns how many of each it made. One fused Attention node per layer replaces
    about thirty small ones, which is most of what a short text costs beyond its MatMuls."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(
        str(fp32_model),
        model_type="bert",
        num_heads=int(config.get("num_attention_heads", 0)),
        hidden_size=int(config.get("hidden_size", 0)),
    )
    model.save_model_to_file(str(out))
    stats = model.get_fused_operator_statistics()
    return {op: int(n) for op, n in sorted(stats.items()) if n}


def _quantize_int8(
    fp32_model: Path, out: Path, config: dict[str, Any], progress: Progress
) -> dict[str, Any]:
    """Fuse, then quantize the MatMul and Attention weights to uint8, per channel, with
    activations quantized per call. uint8 weights stay closer to fp32 than int8 ones on CPUs
    without VNNI, whose u8 x s8 products saturate in 16 bits."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fused_model = out.with_name("fused.onnx")
    try:
        fused = _fuse(fp32_model, fused_model, config)
    except Exception as e:  # an architecture the fusions do not know: quantize it unfused
        progress.info(f"int8: graph not fused ({type(e).__name__}: {e}); quantizing as exported")
        fused, source = {}, fp32_model
    else:
        source = fused_model
    try:
        quantize_dynamic(
            source,
            out,
            weight_type=QuantType.QUInt8,
            per_channel=True,
            # Fused nodes are in onnxruntime's own domain, where shape inference gives no type.
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )
    finally:
        fused_model.unlink(missing_ok=True)
    return {
        "scheme": "dynamic",
        "weight_type": "QUInt8",
        "per_channel": True,
        "fused": fused,
        "batch": 1,
    }


def _embed_onnx(model: Path, tokenizer_json: Path, facts: dict[str, Any]) -> np.ndarray:
    """Embeddings of PARITY_TEXTS through onnxruntime, one text per call (as served)."""
    import onnxruntime as ort
    from tokenizers import Tokenizer  # type: ignore[import-untyped]

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_padding()
    tok.enable_truncation(int(facts["max_length"]))
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    rows = []
    for text in PARITY_TEXTS:
        ids = np.array([tok.encode(text).ids], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "token_type_ids" in names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = session.run(None, feeds)[0][0]
        vec = hidden[0] if facts["pooling"] == "cls" else hidden.mean(axis=0)
        rows.append(vec / np.linalg.norm(vec))
    return np.stack(rows)


def _embed_torch(checkpoint: Path, facts: dict[str, Any]) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))  # type: ignore[no-untyped-call]
    model = AutoModel.from_pretrained(str(checkpoint)).eval()
    rows = []
    with torch.inference_mode():
        for text in PARITY_TEXTS:
            enc = tok(text, return_tensors="pt", truncation=True, max_length=facts["max_length"])
            hidden = model(**enc).last_hidden_state[0]
            vec = hidden[0] if facts["pooling"] == "cls" else hidden.mean(dim=0)
            rows.append((vec / vec.norm()).numpy())
    return np.stack(rows)


@dataclass(frozen=True)
class _Source:
    """The checkpoint an encoder artifact is exported from, as its manifests record it."""

    checkpoint: Path
    name: str
    source_id: str
    revision: str | None
    facts: dict[str, Any]
    """Pooling facts (`pooling_facts`): the manifest's `extra`."""
    config: dict[str, Any]
    """The checkpoint's config.json (heads and width for the fusions)."""


def export_encoder(
    checkpoint: Path,
    *,
    out: Path,
    name: str,
    variants: Sequence[str] | None,
    source_id: str,
    revision: str | None,
    progress: Progress,
) -> str:
    """Write `out/name/<variant>/` for each variant; returns a Markdown summary table."""
    chosen = _chosen_variants(variants)
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    source = _Source(
        checkpoint, name, source_id, revision, pooling_facts(checkpoint, config), config
    )
    root = Path(out) / name
    with scratch_dir(Path(out), f"{name}-encoder") as work:
        with progress.step("fp32: Optimum feature-extraction export"):
            fp32 = _export_fp32(checkpoint, work)
        with progress.step("reference embeddings (PyTorch)"):
            ref = _embed_torch(checkpoint, source.facts)
        results = [
            _export_variant(variant, source, fp32, ref, root / variant, progress)
            for variant in chosen
        ]
    default = "int8" if "int8" in chosen else chosen[0]
    set_default_variant(root, default)
    progress.info(f"default variant of {root}: {default}")
    rows = [
        [r.variant, human_size(r.size_bytes), f"min cosine {r.parity['min_cosine']:.4f}"]
        for r in results
    ]
    return f"{root}\n" + markdown_table(["variant", "size", "parity vs PyTorch"], rows)


def _chosen_variants(variants: Sequence[str] | None) -> tuple[str, ...]:
    chosen = tuple(variants or DEFAULT_ENCODER_VARIANTS)
    unknown = [v for v in chosen if v not in ENCODER_VARIANTS]
    if unknown:
        raise ExportError(
            f"variant {', '.join(unknown)} is not available for an encoder; choose from "
            f"{', '.join(ENCODER_VARIANTS)} (e.g. --variants int8,fp32)."
        )
    return chosen


def _export_variant(
    variant: str,
    source: _Source,
    fp32: Path,
    ref: np.ndarray,
    final: Path,
    progress: Progress,
) -> VariantResult:
    """Build, check and publish one variant directory (atomically: all of it or none)."""
    start = time.perf_counter()
    with ArtifactBuilder(final) as builder:
        model_path = builder.tmp / MODEL_FILE
        with progress.step(f"{variant}: build graph"):
            if variant == "fp32":
                shutil.copyfile(fp32, model_path)
                quant: dict[str, Any] = {}
            else:
                quant = _quantize_int8(fp32, model_path, source.config, progress)
        _copy_tokenizer(source.checkpoint, builder.tmp)
        with progress.step(f"{variant}: parity vs PyTorch"):
            got = _embed_onnx(model_path, builder.tmp / "tokenizer.json", source.facts)
            cosine = (got * ref).sum(axis=1)
        parity = _gated_parity(variant, cosine)
        builder.write_manifest(
            kind="encoder",
            name=source.name,
            source={"id": source.source_id, "revision": source.revision},
            variant=variant,
            model_file=MODEL_FILE,
            quantization=quant,
            parity=parity,
            extra=source.facts,
            **graph_facts(model_path),
        )
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    return VariantResult(variant, final, size, parity, time.perf_counter() - start)


def _copy_tokenizer(checkpoint: Path, dest: Path) -> None:
    """The checkpoint's tokenizer files (tokenizer.json is required: the engine reads it)."""
    for file in TOKENIZER_FILES:
        if (checkpoint / file).is_file():
            shutil.copyfile(checkpoint / file, dest / file)
    if not (dest / "tokenizer.json").is_file():
        raise ExportError(
            f"{checkpoint}: no tokenizer.json; the encoder engine needs a fast "
            "tokenizer file. Save one with `AutoTokenizer.save_pretrained`."
        )


def _gated_parity(variant: str, cosine: np.ndarray) -> dict[str, Any]:
    """The parity report of a variant's embeddings; raises ExportError below the floor."""
    parity = {
        "checked": True,
        "texts": len(PARITY_TEXTS),
        "min_cosine": round(float(cosine.min()), 6),
        "mean_cosine": round(float(cosine.mean()), 6),
    }
    floor = 0.999 if variant == "fp32" else 0.95
    if parity["min_cosine"] < floor:
        raise ExportError(
            f"{variant}: embeddings differ from PyTorch (min cosine "
            f"{parity['min_cosine']} < {floor}); the export is broken."
        )
    return parity
