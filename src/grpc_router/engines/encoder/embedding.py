"""Sentence embeddings on onnxruntime from an encoder artifact (`python -m export --model minilm`).

Every text is embedded in its own call, without padding. The int8 variant picks its activation
scale per call, so batching texts together would let one text shift another's embedding; alone,
a text's embedding depends on nothing but the text.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer  # type: ignore[import-untyped]

from grpc_router.engines.artifact import load_artifact, manifest_summary, resolve_variant_dir
from grpc_router.errors import ArtifactError, EngineUnavailable

Vector = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Embedding:
    """One text's embedding: the pooled unit vector and its unit token vectors."""

    vector: Vector
    """(dim,) pooled, unit length."""
    tokens: Vector
    """(tokens, dim) contextual token vectors without [CLS]/[SEP], each unit length."""
    token_count: int
    """Tokens the model read, special tokens included."""


class EmbeddingModel:
    """A loaded encoder artifact: `embed(text)` -> Embedding."""

    def __init__(
        self,
        artifact: Path,
        *,
        variant: str | None = None,
        threads: int = 1,
        max_length: int | None = None,
        cache_size: int = 4096,
        verify_hashes: bool = True,
    ) -> None:
        variant_dir = resolve_variant_dir(Path(artifact), variant)
        manifest = load_artifact(variant_dir, verify_hashes=verify_hashes)
        if manifest.kind != "encoder":
            raise EngineUnavailable(
                f"{variant_dir} holds a {manifest.kind!r} model; the encoder engine needs an "
                "encoder artifact (`make export-encoder`)"
            )
        self.variant_dir = variant_dir
        self.variant = manifest.variant
        self.summary = manifest_summary(manifest)
        self.pooling = str(manifest.extra.get("pooling", "mean"))
        model_max = int(manifest.extra.get("max_length", 256))
        self.max_length = min(max_length or model_max, model_max)
        tokenizer_path = variant_dir / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise ArtifactError(f"{variant_dir}: no tokenizer.json; re-run `make export-encoder`")
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # Checkpoints often ship a tokenizer.json that pads to a fixed length: padding tokens
        # would enter the mean pooling and cost time.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.max_length)
        options = ort.SessionOptions()
        self.threads = threads
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(
            str(variant_dir / manifest.model_file), options, providers=["CPUExecutionProvider"]
        )
        self._inputs = {i.name for i in self._session.get_inputs()}
        self.dimension = int(self._session.get_outputs()[0].shape[-1])
        self._cache: OrderedDict[str, Embedding] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def embed(self, text: str, *, cache: bool = True) -> tuple[Embedding, bool]:
        """(embedding, whether it came from the cache). `cache=False` neither reads nor fills
        the cache (for texts whose embeddings the caller keeps, such as a route index's)."""
        if not cache:
            return self._run(text), False
        with self._lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                return hit, True
        found = self._run(text)
        with self._lock:
            self._cache[text] = found
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return found, False

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def embed_many(self, texts: list[str]) -> list[Embedding]:
        """Embeddings of `texts`, each computed alone (see the module note)."""
        return [self.embed(t)[0] for t in texts]

    def _run(self, text: str) -> Embedding:
        ids = np.asarray([self._tokenizer.encode(text).ids], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = np.asarray(self._session.run(None, feeds)[0][0], dtype=np.float32)
        pooled = hidden[0] if self.pooling == "cls" else hidden.mean(axis=0)
        # Unit length always: the engine compares by cosine, whatever the checkpoint's own head.
        vector = pooled / max(float(np.linalg.norm(pooled)), 1e-12)
        inner = hidden[1:-1] if hidden.shape[0] > 2 else hidden
        norms = np.maximum(np.linalg.norm(inner, axis=1, keepdims=True), 1e-12)
        return Embedding(vector, inner / norms, int(ids.shape[1]))
