"""One onnxruntime session over a decoder-with-past graph: provider choice, threads, a run.

The graph is Optimum's text-generation-with-past export: inputs input_ids, attention_mask,
position_ids and past_key_values.{i}.key/.value; outputs logits and present.{i}.key/.value.
Graphs from `make export` also take an optional `logits_to_keep` (export/streamline.py): 0 for
every position's logits, n for the last n, -m for each right-padded row's last m tokens; and an
optional `attention_mask_4d` that narrows the causal mask (a route trie in the prompt's run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import structlog

from grpc_router.engines.arch_router.graph import (
    ATTENTION_META,
    FUSED_ATTENTION,
    KEEP_INPUT,
    KEEP_LAST_M,
    KEEP_META,
    MASK4D_INPUT,
)
from grpc_router.engines.cpus import available_cpus, cgroup_cpu_quota
from grpc_router.errors import ArtifactError, EngineUnavailable

log = structlog.get_logger(__name__)

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_GPU_HINT = "install onnxruntime-gpu (pip install 'grpc-router[gpu]') on a machine with CUDA"

Int64Array = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.floating[Any]]
# One layer's key or value: a numpy array on the host, or an onnxruntime.OrtValue where the
# session keeps the KV on its device (onnxruntime ships no type stubs, so this stays Any).
KVTensor = Any
ProviderName = Literal["auto", "tensorrt", "cuda", "cpu"]
_OPTIONAL_INPUTS = (KEEP_INPUT, MASK4D_INPUT)
_ITEMSIZE = {"tensor(float)": 4, "tensor(float16)": 2, "tensor(bfloat16)": 2}


def on_host(past: list[KVTensor]) -> list[FloatArray]:
    """The KV as numpy arrays (a device-resident one is copied back)."""
    return [t if isinstance(t, np.ndarray) else t.numpy() for t in past]


def kv_length(t: KVTensor) -> int:
    """Positions a KV tensor holds, [batch, kv_heads, positions, head_dim], wherever it is."""
    return int(t.shape[2] if isinstance(t, np.ndarray) else t.shape()[2])


def kv_nbytes(t: KVTensor) -> int:
    if isinstance(t, np.ndarray):
        return int(t.nbytes)
    return int(np.prod(t.shape())) * _ITEMSIZE.get(t.data_type(), 4)


@dataclass(frozen=True, slots=True)
class ProviderChoice:
    name: str
    """The onnxruntime provider that runs the graph: TRT, CUDA or CPU."""
    providers: list[tuple[str, dict[str, str]]]
    """What InferenceSession gets, in priority order."""


def choose_provider(
    requested: ProviderName,
    *,
    available: list[str] | None = None,
    trt_cache_dir: Path | None = None,
    max_tokens: int = 4096,
    max_batch: int = 16,
    kv_shape: tuple[int, int, int] | None = None,
) -> ProviderChoice:
    """Pick the execution provider; an asked-for provider that is absent is an error.

    `kv_shape` (layers, kv_heads, head_dim) lets the TensorRT profiles cover the past inputs."""
    have = ort.get_available_providers() if available is None else available
    if requested == "auto":
        requested = "tensorrt" if TRT in have else "cuda" if CUDA in have else "cpu"
    if requested == "cpu":
        return ProviderChoice(CPU, [(CPU, {})])
    if requested == "cuda":
        if CUDA not in have:
            raise EngineUnavailable(
                f"provider 'cuda' asked for but onnxruntime has only {have}: {_GPU_HINT}"
            )
        return ProviderChoice(CUDA, [(CUDA, {}), (CPU, {})])
    if TRT not in have:
        raise EngineUnavailable(
            f"provider 'tensorrt' asked for but onnxruntime has only {have}: {_GPU_HINT} "
            "and TensorRT"
        )
    cache = str(trt_cache_dir or Path("trt-cache"))

    # One profile spanning single decode steps up to full prompts of a whole batch; the past
    # spans an empty cache (prefill) up to a full prompt.
    def dims(b: int, s: int, past: int) -> str:
        out = [
            f"input_ids:{b}x{s}",
            f"attention_mask:{b}x{past + s}",
            f"position_ids:{b}x{s}",
            # Optional (defaults to one broadcast 1); trie scoring passes [1, 1, s, past + s].
            f"{MASK4D_INPUT}:{b}x1x{s}x{past + s}",
        ]
        if kv_shape is not None:
            layers, kv_heads, head_dim = kv_shape
            out += [
                f"past_key_values.{i}.{kind}:{b}x{kv_heads}x{past}x{head_dim}"
                for i in range(layers)
                for kind in ("key", "value")
            ]
        return ",".join(out)

    trt_opts = {
        "trt_fp16_enable": "True",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache,
        "trt_profile_min_shapes": dims(1, 1, 0),
        "trt_profile_opt_shapes": dims(max(1, max_batch // 2), 16, 512),
        "trt_profile_max_shapes": dims(max_batch, max_tokens, max_tokens),
    }
    return ProviderChoice(TRT, [(TRT, trt_opts), (CUDA, {}), (CPU, {})])


def _has_onnx() -> bool:
    """The onnx package (a dependency of the gpu extra) rewrites the graph for IO binding."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def _preload_cuda_libraries() -> None:
    """CUDA and cuDNN from pip's nvidia-* wheels (or torch's) are not on the loader's path;
    onnxruntime-gpu >= 1.21 loads them itself when asked. Otherwise LD_LIBRARY_PATH must."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # missing wheels: the session's own load error says more
        log.warning("onnxruntime.preload_dlls failed", error=str(exc))


@dataclass(slots=True)
class StepOutput:
    logits: FloatArray
    """[batch, seq or the kept last positions, vocab], float32 on the host."""
    present: list[KVTensor]
    """Per layer key then value, [batch, kv_heads, past+seq, head_dim]; OrtValues on the
    session's device when it keeps the KV there."""


class DecoderSession:
    """The model graph plus what the engine needs to know about its shapes.

    Only the current artifact generation is served: a graph that takes `logits_to_keep` (-m
    keeps each row's last m positions) and `attention_mask_4d`. Anything older is refused with
    an instruction to re-export it."""

    def __init__(
        self,
        model_file: Path,
        *,
        provider: ProviderName = "auto",
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        trt_cache_dir: Path | None = None,
        max_tokens: int = 4096,
        max_batch: int = 16,
        kv_shape: tuple[int, int, int] | None = None,
        device_kv: bool | None = None,
    ) -> None:
        """`device_kv`: keep the KV where the graph runs (IO binding; None = on for GPU
        providers). The CPU provider can do it too, which is how the tests cover it."""
        self.choice = choose_provider(
            provider,
            trt_cache_dir=trt_cache_dir,
            max_tokens=max_tokens,
            max_batch=max_batch,
            kv_shape=kv_shape,
        )
        self._device = "cpu" if self.choice.name == CPU else "cuda"
        self._defaults: dict[str, Int64Array] = {}
        self._bound_ran = False
        if intra_op_threads is None and cgroup_cpu_quota() is not None:
            # onnxruntime sizes its pool to the host's cores, not to a container's CPU limit:
            # threads beyond the limit would only be throttled.
            intra_op_threads = available_cpus()
        opts = self._session_options(intra_op_threads, inter_op_threads)
        self.device_kv = self._want_device_kv(device_kv)
        self.session = self._open(model_file, opts)
        self._read_shapes(model_file)
        log.info(
            "onnxruntime session",
            provider=self.choice.name,
            kv_on_device=self.device_kv,
            available=ort.get_available_providers(),
            layers=self.layers,
            fused_attention=self.one_row_prefill,
            intra_op_threads=intra_op_threads,
            model=str(model_file),
        )

    def _session_options(
        self, intra_op_threads: int | None, inter_op_threads: int | None
    ) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        if self.choice.name == CPU:
            # Errors only: the graph's optional inputs (initializers a caller may override)
            # draw a load-time warning each. GPU sessions keep warnings (nodes that fall back).
            opts.log_severity_level = 3
        else:
            _preload_cuda_libraries()
        if intra_op_threads is not None:
            opts.intra_op_num_threads = intra_op_threads
        if inter_op_threads is not None:
            opts.inter_op_num_threads = inter_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return opts

    def _want_device_kv(self, asked: bool | None) -> bool:
        wanted = self.choice.name != CPU if asked is None else asked
        if wanted and not _has_onnx():
            log.warning(
                "kv_on_device needs the onnx package (pip install 'grpc-router[gpu]'); the KV "
                "goes through host memory instead",
                provider=self.choice.name,
            )
            return False
        return wanted

    def _open(self, model_file: Path, opts: ort.SessionOptions) -> Any:
        """The inference session: with its optional inputs made bindable when the KV stays on
        the device, else as exported. A graph that cannot be bound falls back, logged."""
        if self.device_kv:
            try:
                return self._bindable_session(model_file, opts)
            except Exception as exc:  # ORT raises its own untyped errors
                log.warning(
                    "could not load the graph for keeping the KV on the device; it goes "
                    "through host memory instead",
                    provider=self.choice.name,
                    error=str(exc),
                )
                self.device_kv = False
                self._defaults.clear()
        try:
            return ort.InferenceSession(str(model_file), opts, providers=self.choice.providers)
        except Exception as exc:  # ORT raises its own untyped errors
            raise ArtifactError(f"onnxruntime could not load {model_file}: {exc}") from exc

    def _read_shapes(self, model_file: Path) -> None:
        """Layers, KV shape and dtype, vocabulary and the graph's capabilities; refuses a
        graph that is not a decoder-with-past of the current generation."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        needed = {"input_ids", "attention_mask", "position_ids", "past_key_values.0.key"}
        if not needed <= inputs.keys():
            raise ArtifactError(
                f"{model_file} is not a decoder-with-past graph (inputs {sorted(inputs)}); "
                "export it with task text-generation-with-past (make export)"
            )
        self.layers = sum(1 for n in inputs if n.startswith("past_key_values.")) // 2
        kv = inputs["past_key_values.0.key"]
        self.kv_heads = int(kv.shape[1])
        self.head_dim = int(kv.shape[3])
        self.kv_dtype: np.dtype[Any] = np.dtype(np.float16 if "float16" in kv.type else np.float32)
        self.vocab = int(self.session.get_outputs()[0].shape[2])
        self._past_names = [
            f"past_key_values.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")
        ]
        self._out_names = [o.name for o in self.session.get_outputs()]
        # Optional inputs are initializers a caller may override: not in get_inputs().
        optional = {i.name for i in self.session.get_overridable_initializers()} | inputs.keys()
        optional |= self._defaults.keys()
        meta = self.session.get_modelmeta().custom_metadata_map
        if not {KEEP_INPUT, MASK4D_INPUT} <= optional or meta.get(KEEP_META) != KEEP_LAST_M:
            raise ArtifactError(
                f"{model_file} was exported by an older grpc-router (it cannot feed a route "
                "trie in the prompt's run); re-export it with `make export`"
            )
        # export/fuse.py: attention as GroupQueryAttention, whose kernel takes one row per run
        # when a past is given and more than one token is new.
        self.one_row_prefill = meta.get(ATTENTION_META) == FUSED_ATTENTION

    def _bindable_session(self, model_file: Path, opts: ort.SessionOptions) -> Any:
        """The graph with its optional inputs made required: IO binding cannot bind an
        initializer a caller may override. Their defaults are fed on every run instead; the
        weights still load from the artifact's external data file."""
        import onnx

        model = onnx.load(str(model_file), load_external_data=False)
        for init in list(model.graph.initializer):
            if init.name in _OPTIONAL_INPUTS:
                value = onnx.numpy_helper.to_array(init).astype(np.int64)
                self._defaults[init.name] = value
                model.graph.initializer.remove(init)
        opts.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(model_file.parent)
        )
        return ort.InferenceSession(
            model.SerializeToString(), opts, providers=self.choice.providers
        )

    @property
    def provider(self) -> str:
        return self.choice.name

    def token_bytes(self) -> int:
        """Bytes of KV cache per token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_dtype.itemsize

    def empty_past(self, batch: int) -> list[FloatArray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, self.kv_dtype) for _ in self._past_names]

    def run(
        self,
        input_ids: Int64Array,
        attention_mask: Int64Array,
        position_ids: Int64Array,
        past: list[KVTensor],
        *,
        keep: int = 0,
        mask4d: Int64Array | None = None,
    ) -> StepOutput:
        """One forward pass. `keep` 0 returns the logits of every position, n > 0 those of the
        last n, -m those of each row's last m real positions, [batch, m, vocab] (the rest of
        the work, the KV included, is the same). `mask4d` [batch, 1, seq, past+seq] removes
        what each new token may attend to."""
        feed: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        }
        feed.update(self._defaults)
        feed.update(zip(self._past_names, past, strict=True))
        feed[KEEP_INPUT] = np.asarray(keep, dtype=np.int64)
        if mask4d is not None:
            feed[MASK4D_INPUT] = mask4d
        if self.device_kv:
            try:
                logits, present = self._run_bound(feed)
                self._bound_ran = True
            except Exception as exc:  # first run only: fall back rather than fail to serve
                if self._bound_ran:
                    raise
                log.warning(
                    "keeping the KV on the device failed; it goes through host memory instead",
                    provider=self.choice.name,
                    error=str(exc),
                )
                self.device_kv = False
                return self.run(
                    input_ids, attention_mask, position_ids, on_host(past), keep=keep,
                    mask4d=mask4d,
                )  # fmt: skip
        else:
            out = self.session.run(self._out_names, _host_feed(feed))
            logits, present = out[0], list(out[1:])
        return StepOutput(np.asarray(logits, dtype=np.float32), present)

    def _run_bound(self, feed: dict[str, Any]) -> tuple[Any, list[KVTensor]]:
        """Inputs from the host or (the KV of an earlier run) the device; the logits come to
        the host, the new KV stays on the device for the next run."""
        binding = self.session.io_binding()
        for name, value in feed.items():
            if isinstance(value, np.ndarray):
                # (np.ascontiguousarray would turn logits_to_keep's 0-d array into 1-d)
                binding.bind_cpu_input(name, np.require(value, requirements="C"))
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(self._out_names[0], "cpu")
        for name in self._out_names[1:]:
            binding.bind_output(name, self._device)
        self.session.run_with_iobinding(binding)
        out = binding.get_outputs()
        return out[0].numpy(), list(out[1:])


def _host_feed(feed: dict[str, Any]) -> dict[str, Any]:
    """session.run takes numpy: device-resident KV (from a session switched off it) comes back."""
    return {k: v if isinstance(v, np.ndarray) else v.numpy() for k, v in feed.items()}
