"""Qwen2 checkpoint -> ONNX decoder (text-generation-with-past) and its quantized variants."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from export.fuse import fuse_attention_file
from export.quantize import quantize_rowwise_int8

MODEL_FILE = "model.onnx"
OPSET = 18
# Files of the checkpoint copied into every variant (the server tokenizes with these).
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
VARIANTS = ("int4", "int8", "fp16", "fp32")


@dataclass(frozen=True)
class QuantSettings:
    """How each variant is derived from the fp32 graph (recorded in the manifest)."""

    int4_block_size: int = 128
    accuracy_level: int = 4
    symmetric: bool = True
    int8_scheme: str = "rowwise"
    """"rowwise": per-row dynamic int8 + MatMulInteger (exact, fast); "nbits": MatMulNBits 8-bit."""
    int8_block_size: int = 128
    fused_attention: bool = True
    """Row-wise int8 (the CPU variant) with each layer's attention as one GroupQueryAttention
    node (export/fuse.py); the engine then prefills one request per run."""

    def for_variant(self, variant: str) -> dict[str, Any]:
        if variant == "fp32":
            return {"method": "none", "dtype": "float32", "exact": True}
        if variant == "fp16":
            return {"method": "float16_cast", "dtype": "float16", "float32_io": ["logits"],
                    "kv_io_dtype": "float16"}  # fmt: skip
        if variant == "int8" and self.int8_scheme == "rowwise":
            return {
                "method": "rowwise_dynamic_int8",
                "weights": "int8 symmetric, one scale per output column",
                "activations": "int8 symmetric, one scale per row (token), computed per call",
                "op_types": ["MatMul"],
                "exact": True,
                "exact_note": EXACT_NOTE,
            }
        bits = 4 if variant == "int4" else 8
        # MatMulNBits' int8 compute (accuracy_level 4) tiles rows differently for different row
        # counts, so the same row can come out ~1e-7 apart; float compute (level 0/1) is exact.
        exact = self.accuracy_level < 2
        return {
            "method": "MatMulNBits",
            "weight_only": True,
            "bits": bits,
            "block_size": self.int4_block_size if bits == 4 else self.int8_block_size,
            "accuracy_level": self.accuracy_level,
            "symmetric": self.symmetric,
            "op_types": ["MatMul"],
            "exact": exact,
            "exact_note": EXACT_NOTE if exact else NBITS_INEXACT_NOTE,
        }


EXACT_NOTE = (
    "a request's logits are bit-identical alone, after a cached prefix, right-padded and batched"
)
NBITS_INEXACT_NOTE = (
    "rows are quantized independently, but the int8 compute kernel tiles rows by how many there "
    "are, so a cached prefix, padding or batching moves logits by ~1e-7 (measured on the tiny "
    "model: 41 of 79 prefix splits differ); --accuracy-level 1 is bit-exact but ~5x slower on CPU"
)


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence torch.onnx tracer warnings; progress lines are ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("optimum").setLevel(logging.ERROR)
        logging.getLogger("transformers").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def export_fp32(checkpoint: Path, out_dir: Path) -> Path:
    """Optimum export of the checkpoint (task text-generation-with-past, opset 18) into out_dir;
    returns the .onnx path. Weights go to one external data file when over 2 GB."""
    from optimum.exporters.onnx import main_export  # type: ignore[import-untyped]

    raw = out_dir / "optimum"
    with _quiet():
        main_export(
            str(checkpoint),
            raw,
            task="text-generation-with-past",
            opset=OPSET,
            do_validation=False,
            local_files_only=True,
        )
    # Keep only the graph (+ its data); tokenizer files come from the checkpoint itself.
    for name in (MODEL_FILE, "model.onnx_data"):
        if (raw / name).exists():
            os.replace(raw / name, out_dir / name)
    shutil.rmtree(raw)
    return out_dir / MODEL_FILE


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save with every weight in one external data file beside the graph."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )


def quantize_nbits(fp32_model: Path, out_path: Path, *, bits: int, settings: QuantSettings) -> None:
    """Weight-only MatMulNBits. Activations stay float per row (quantized per block of a row at
    accuracy_level 4), so a request's logits do not depend on what else shares the call."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    block = settings.int4_block_size if bits == 4 else settings.int8_block_size
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(fp32_model)),
        bits=bits,
        block_size=block,
        is_symmetric=settings.symmetric,
        accuracy_level=settings.accuracy_level,
        op_types_to_quantize=("MatMul",),
    )
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer.process()
    save_model(quantizer.model.model, out_path)


def convert_fp16(fp32_model: Path, out_path: Path) -> None:
    """float16 weights and compute for CUDA/TensorRT. The KV inputs and outputs are float16
    too: they cross PCIe on every run, and float32 doubled that (the runtime reads the dtype
    from the graph). The logits stay float32, the same as every other variant's."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_model))
    kv = ("past_key_values.", "present.")
    keep = [
        v.name
        for v in [*model.graph.input, *model.graph.output]
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and not v.name.startswith(kv)
    ]
    with _quiet():
        converted = convert_float_to_float16(model, keep_io_types=keep, disable_shape_infer=True)
    save_model(converted, out_path)


def link_fp32(fp32_model: Path, out_path: Path) -> None:
    """The fp32 variant is the base export itself: hard-link (or copy) the graph and its data."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for src in fp32_model.parent.iterdir():
        if src.name.startswith(MODEL_FILE):
            dst = out_path.parent / src.name
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)


def build_variant(
    variant: str,
    fp32_model: Path,
    out_dir: Path,
    settings: QuantSettings,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write `variant`'s graph into out_dir; returns its .onnx path. `config` (the checkpoint's)
    gives the head counts that fusing the int8 variant's attention needs."""
    out_path = out_dir / MODEL_FILE
    if variant == "fp32":
        link_fp32(fp32_model, out_path)
    elif variant == "fp16":
        convert_fp16(fp32_model, out_path)
    elif variant == "int8" and settings.int8_scheme == "rowwise":
        quantize_rowwise_int8(fp32_model, out_path)
        if settings.fused_attention and config is not None:
            fuse_attention_file(out_path, config)
    elif variant in ("int4", "int8"):
        quantize_nbits(fp32_model, out_path, bits=4 if variant == "int4" else 8, settings=settings)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return out_path


def copy_checkpoint_files(checkpoint: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in CHECKPOINT_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, out_dir / name)
            copied.append(name)
    return copied


def estimate_variant_bytes(config: dict[str, Any], variant: str, settings: QuantSettings) -> int:
    """Bytes a Qwen2 variant takes on disk. The tied embedding is stored twice (Gather stays
    float32, lm_head MatMul is exported separately); MatMulNBits adds scales and zero points."""
    hidden = int(config["hidden_size"])
    vocab = int(config["vocab_size"])
    inter = int(config["intermediate_size"])
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_dim = int(config.get("num_key_value_heads", heads)) * (hidden // heads)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * inter
    matmul = layers * per_layer + vocab * hidden  # + lm_head
    embed = vocab * hidden
    if variant == "fp32":
        return 4 * (matmul + embed)
    if variant == "fp16":
        return 2 * (matmul + embed)
    if variant == "int8" and settings.int8_scheme == "rowwise":
        return int(4 * embed + matmul)
    bits = 4 if variant == "int4" else 8
    block = settings.int4_block_size if bits == 4 else settings.int8_block_size
    return int(4 * embed + matmul * (bits / 8 + 4.5 / block))
