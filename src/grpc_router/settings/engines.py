"""Engine settings: the YAML `engine:` section and each engine's tuning knobs.

Plain pydantic: the engines import these, never the reverse, so reading a config loads no model
runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Requests per prefill run when the config leaves it open. On a GPU a batch stacks and cuts its
# KV through host memory, which costs more than it saves (docs/benchmarks.md); on the CPU the
# prefill is compute-bound and batching helps a little.
CPU_MAX_BATCH = 4
GPU_MAX_BATCH = 1
# Prefill tokens per run when the config leaves it open. On a GPU each run also moves the
# batch's KV between host and device, so there a prompt goes in one run.
CPU_CHUNK_TOKENS = 1024
GPU_CHUNK_TOKENS = 16384

Provider = Literal["auto", "tensorrt", "cuda", "cpu"]


class ArchRouterSettings(BaseModel):
    """Tuning knobs of the Arch-Router engine; every field has a safe default."""

    model_config = ConfigDict(extra="forbid")

    provider: Provider = Field(
        default="auto",
        description="Execution provider: auto tries TensorRT, then CUDA, then CPU.",
    )
    intra_op_threads: int | None = Field(
        default=None,
        ge=0,
        description="Threads inside one ORT operator; None = onnxruntime's default "
        "(one per physical core).",
    )
    inter_op_threads: int | None = Field(
        default=None,
        ge=0,
        description="Threads across independent operators; None = onnxruntime's default (1, "
        "since the graph runs sequentially).",
    )
    max_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Most requests coalesced into one prefill run. None = 1 for a graph with "
        "fused attention (the int8 variant by default: its kernel prefills one request per run), "
        f"else {CPU_MAX_BATCH} on the CPU and {GPU_MAX_BATCH} on CUDA/TensorRT (a batch joins "
        "and cuts its KV in host memory; there batches measured slower than requests one by one).",
    )
    max_wait_us: int = Field(
        default=2000,
        ge=0,
        description="How long the first request of a batch waits for others, in microseconds.",
    )
    max_queue: int = Field(
        default=64, ge=1, description="Requests waiting beyond this are rejected with Overloaded."
    )
    prompt_token_budget: int = Field(
        default=2048,
        ge=64,
        description="Most prompt tokens; the oldest turns are dropped first, the latest user "
        "turn is kept (truncated if it alone is too long).",
    )
    prefix_cache_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=0,
        description="Bound in bytes of the prefix KV cache, which keeps route sets' blocks and "
        "prompts already decided, so that a follow-up turn prefills only what is new; least "
        "recently used leaves go first. 0 disables it.",
    )
    prefill_chunk_tokens: int | None = Field(
        default=None,
        ge=16,
        description="About how many prompt tokens one prefill run takes (all batch rows "
        "together); bounds the attention activations' memory. Every run reads all weights "
        "once (and on a GPU moves the KV across PCIe), so fewer, larger runs are faster. "
        f"None = {CPU_CHUNK_TOKENS} on the CPU, {GPU_CHUNK_TOKENS} on CUDA/TensorRT.",
    )
    kv_on_device: bool | None = Field(
        default=None,
        description="Keep the KV cache on the GPU between runs (IO binding) instead of host "
        "memory; None = on for CUDA/TensorRT. A lone request then prefills unpadded, so its "
        "KV needs no cutting; batches still join their KV on the host. Without the onnx "
        "package, or if that graph or its first run fails, it logs why and uses host memory.",
    )
    score_rows_per_run: int = Field(
        default=4,
        ge=1,
        description="Deprecated and ignored: it tuned graphs of an older artifact format, "
        "which are no longer served. Accepted so that existing config files still load.",
    )
    full_scores: bool = Field(
        default=True,
        description="Score every route plus 'other' by default (a request may turn it off).",
    )
    trt_cache_dir: Path | None = Field(
        default=None,
        description="TensorRT engine cache directory; None = <artifact>/trt-cache.",
    )
    warmup: bool = Field(
        default=True, description="Run one decision at start so the first is not slow."
    )
    variant: str | None = Field(
        default=None,
        description="Artifact variant (int8, int4, fp16, fp32); None = the default one.",
    )


class EncoderSettings(BaseModel):
    """The YAML `engine.encoder:` section. Scoring defaults were chosen on the CLINC150 and SGD
    development splits (see the README's evaluation section)."""

    model_config = ConfigDict(extra="forbid")

    variant: str | None = Field(
        default=None, description="Artifact variant (int8, fp32); None = the artifact's default."
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="onnxruntime intra-op threads per call; None: the CPUs this process may "
        "use, shared among the workers, at most 4 (a short text's products stop gaining "
        "beyond that). 1 spends the least CPU per decision.",
    )
    workers: int = Field(
        default=1, ge=1, description="Decisions computed at once (each in its own thread)."
    )
    blas_threads: int | None = Field(
        default=1,
        ge=1,
        description="numpy BLAS threads, process-wide, while the engine runs: the score "
        "matrices are small and BLAS worker threads only add wake-up latency. None leaves it.",
    )
    turn_threads: int = Field(
        default=1,
        ge=1,
        description="Turns of one conversation embedded in parallel (one text per call "
        "each); only when context_margin is None, since otherwise turns are read one by one.",
    )
    max_queue: int = Field(
        default=64, ge=1, description="Decisions waiting beyond this are rejected (Overloaded)."
    )
    max_length: int = Field(default=128, ge=8, le=512, description="Token cap per embedded text.")
    phrase_top_k: int = Field(
        default=2, ge=1, description="A route's phrase score is the mean of its k best phrases."
    )
    description_weight: float = Field(
        default=0.5, ge=0.0, description="Weight of the whole-description similarity."
    )
    token_weight: float = Field(
        default=0.5,
        ge=0.0,
        description="Weight of token-level matching: each phrase token's best cosine with a "
        "token of the text, averaged over the phrase (late interaction).",
    )
    lexical_weight: float = Field(
        default=0.004,
        ge=0.0,
        description="Weight of the BM25 score of the text's words against each route's "
        '"name: description" and examples (added to the route score; 0 turns it off).',
    )
    context_decay: float = Field(
        default=0.3, ge=0.0, le=1.0, description="Weight factor per earlier user turn."
    )
    assistant_weight: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Assistant turns count this much of a user turn."
    )
    context_sharpness: float = Field(
        default=0.1,
        gt=0.0,
        description="Temperature of the turn-relevance weight exp(best route score / this).",
    )
    max_context_messages: int = Field(
        default=6, ge=1, description="Most recent messages considered (latest user turn first)."
    )
    context_margin: float | None = Field(
        default=0.1,
        ge=0.0,
        description="Turns are read latest first and reading stops once the best route is this "
        "far (in route score) ahead of the second: a self-contained request or a topic switch "
        "decides on its own, older turns are embedded only when needed. None reads them all.",
    )
    # Calibrated with `grpc-router eval --calibrate` on CLINC150 val + SGD dev pooled: the
    # NLL-optimal temperature.
    temperature: float = Field(
        default=0.035, gt=0.0, description="Softmax temperature that makes scores probabilities."
    )
    other_threshold: float | Literal["auto"] | None = Field(
        default="auto",
        description='Route score below which `other` wins. "auto" fits it to each route set '
        "when its index is built, without labels, from the set's own texts scored with each "
        "left out (a threshold per route where the route has examples); a number is a fixed "
        "threshold for every route set (an override); None never answers `other`.",
    )
    other_quantile: float = Field(
        default=0.0025,
        ge=0.0,
        lt=0.5,
        description='"auto": the quantile of the examples\' leave-one-out own-route scores '
        "(how requests about a route score) that becomes the threshold; higher answers "
        "`other` more often. With a few dozen examples per route it is about the score of "
        "the least typical one. Descriptions-only sets do not use it.",
    )
    other_prior_examples: float = Field(
        default=20.0,
        gt=0.0,
        description='"auto": how many examples weigh as much as the prior: a route with n '
        "examples moves its threshold n / (n + this) of the way from the set's to its own "
        "examples' quantile, and the set's from the background (the score of the set's texts "
        "for routes they do not belong to) to all examples' quantile.",
    )
    route_set_cache: int = Field(default=64, ge=1, description="Route sets kept embedded.")
    route_set_cache_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=0,
        description="Bound in bytes of the route sets kept embedded (their phrase and token "
        "embeddings, fitted thresholds and lint); least recently used sets go first, and a "
        "set larger than the bound is used but not kept. Both this and route_set_cache hold.",
    )
    lint_on_load: bool = Field(
        default=True,
        description="Log a warning when a route set whose index is built has overlapping "
        "routes, misplaced examples or vague descriptions (`grpc-router lint`).",
    )
    text_cache: int = Field(default=4096, ge=0, description="Turn embeddings kept (LRU).")
    warmup: bool = Field(default=True, description="Embed one text at start.")


EngineKind = Literal["auto", "arch-router", "encoder", "cascade"]


class EngineConfig(BaseModel):
    """The YAML `engine:` section."""

    model_config = ConfigDict(extra="forbid")

    kind: EngineKind = Field(
        default="auto",
        description="auto: Arch-Router when its artifact exists, else the encoder; cascade: the "
        "encoder answers when sure, Arch-Router otherwise.",
    )
    arch_router_artifact: Path = Path("artifacts/arch-router-1.5b")
    encoder_artifact: Path = Path("artifacts/minilm")
    arch_router: ArchRouterSettings = Field(default_factory=ArchRouterSettings)
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    cascade_margin: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="cascade: the encoder decides when its best probability beats the "
        "runner-up by at least this much.",
    )
