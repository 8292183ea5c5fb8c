"""Measurements, each run in its own subprocess so that its peak RSS is its own.

`python -m bench.workers <kind> <config.json> <result.json>`; kinds: engine, torch,
optimum, matmul, multiturn (bench/multiturn.py). The orchestrator in __main__ starts them one
at a time.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.workload import BUDGET, Case, Workload


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def on_gpu(cfg: dict[str, Any]) -> bool:
    return cfg.get("provider", "cpu") in ("cuda", "tensorrt")


def gpu_used_bytes() -> int | None:
    """Device memory in use now (the worker is the GPU's only user), via NVML when present."""
    try:
        # nvidia-ml-py: optional (GPU machines only) and untyped, so looked up at run time.
        pynvml: Any = importlib.import_module("pynvml")
        pynvml.nvmlInit()
        used = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used
        pynvml.nvmlShutdown()
        return int(used)
    except Exception:  # no NVML, no driver: not measured
        return None


def progress(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def latency_stats(ms: list[float]) -> dict[str, Any]:
    ordered = sorted(ms)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p95_ms": p95, "all_ms": ms}


def median_of(decisions: list[Any], key: str) -> float:
    return float(statistics.median(d.timings_ms.get(key, 0.0) for d in decisions))


# --- this engine --------------------------------------------------------------------------


def run_engine(cfg: dict[str, Any]) -> dict[str, Any]:
    from grpc_router.engines.arch_router.engine import ArchRouterEngine
    from grpc_router.settings import ArchRouterSettings

    workload = Workload.from_json(cfg["workload"])
    settings = ArchRouterSettings(
        provider=cfg["provider"],
        variant=cfg["variant"],
        intra_op_threads=cfg["threads"],
        prompt_token_budget=BUDGET,
        kv_on_device=cfg.get("kv_on_device"),
    )
    engine = ArchRouterEngine(Path(cfg["artifact"]), settings)

    async def decide(case: Case, full: bool) -> Any:
        return await engine.decide(case.message_objs(), case.route_specs(), full_scores=full)

    async def route_set_only(cases: list[Case]) -> None:
        """The prefix cache holding the route set's block alone, as a server warms its routes:
        the engine keeps every prompt it decides, so without this a pass would reuse the whole
        prompt the pass before decided, and prefill one token."""
        engine.prefix_cache.clear()
        await engine.warm(cases[0].route_specs())

    async def main() -> dict[str, Any]:
        t = time.perf_counter()
        await engine.start()
        session = engine._session
        assert session is not None  # set by start()
        out: dict[str, Any] = {"load_s": time.perf_counter() - t, "provider": engine.provider,
                               "max_batch_size": engine.max_batch_size,
                               "kv_on_device": session.device_kv}  # fmt: skip
        for kind, cases in (("long", workload.long), ("short", workload.short)):
            res: dict[str, Any] = {}
            # Cold: the route set's prefix is computed inside the measured decision.
            cold = []
            for i, case in enumerate(cases[: cfg["cold_samples"]]):
                engine.prefix_cache.clear()
                cold.append(await decide(case, True))
                progress(f"{kind} cold {i + 1}: {cold[-1].timings_ms['total']:.0f} ms")
            res["cold_scores_on"] = _summary(cold)
            for full in (True, False):
                await route_set_only(cases)
                warm = []
                for case in cases:
                    warm.append(await decide(case, full))
                label = f"warm_scores_{'on' if full else 'off'}"
                progress(f"{kind} {label}: p50 {_summary(warm)['p50_ms']:.0f} ms")
                res[label] = _summary(warm)
                if full and kind == "long":
                    alone = {case.name: d for case, d in zip(cases, warm, strict=True)}
                    # Kept so that two runs (KV on the device or not) can be compared.
                    out["long_decisions"] = {
                        n: {"route": d.route, "scores": dict(d.scores)} for n, d in alone.items()
                    }
            out[kind] = res
        throughput, drift = {}, 0.0
        for c in cfg["concurrency"]:
            await route_set_only(workload.long)
            n = len(workload.long)
            cases = [_lap(workload.long[i % n], i // n) for i in range(max(c, cfg["samples"]))]
            clients = asyncio.Semaphore(c)  # at most c decisions in flight
            t = time.perf_counter()
            got = await asyncio.gather(*(limited(clients, decide(case, True)) for case in cases))
            wall = time.perf_counter() - t
            throughput[str(c)] = {"decisions": len(cases), "wall_s": wall,
                                  "per_s": len(cases) / wall}  # fmt: skip
            progress(f"concurrency {c}: {len(cases) / wall:.2f} decisions/s")
            for case, d in zip(cases, got, strict=True):
                if case.name not in alone:
                    continue  # a conversation made distinct: nothing alone to compare with
                solo = alone[case.name].scores
                drift = max(drift, *(abs(d.scores[r] - solo[r]) for r in solo))
        out["throughput"] = throughput
        # Batched vs alone on this provider: 0.0 where the variant is exact (tests prove it on
        # the CPU); GPU kernels may pick other tilings for other batch shapes.
        out["batched_vs_alone_max_prob_diff"] = drift
        progress(f"batched vs alone: max probability difference {drift:.3g}")
        out["largest_batch"] = engine._batcher.largest_batch
        out["gpu_used_bytes"] = gpu_used_bytes() if on_gpu(cfg) else None
        out["kv_on_device_at_end"] = session.device_kv  # False: it fell back
        await engine.close()
        return out

    result = asyncio.run(main())
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def _lap(case: Case, lap: int) -> Case:
    """The case itself on its first use, then made distinct right after the route set's block
    (a marker before its first message), so that a repeat reuses only that block."""
    if not lap:
        return case
    first, *rest = case.messages
    marked = {**first, "content": f"({lap}) {first['content']}"}
    return Case(f"{case.name}~{lap}", case.routes, [marked, *rest])


async def limited(gate: asyncio.Semaphore, work: Awaitable[Any]) -> Any:
    async with gate:
        return await work


def _summary(decisions: list[Any]) -> dict[str, Any]:
    out = latency_stats([d.timings_ms["total"] for d in decisions])
    for key in ("prefill", "score", "decode"):
        out[f"{key}_ms_median"] = median_of(decisions, key)
    out["prompt_tokens_median"] = statistics.median(d.prompt_tokens for d in decisions)
    out["cached_tokens_median"] = statistics.median(d.cached_tokens for d in decisions)
    out["routes"] = [d.route for d in decisions]
    return out


# --- baselines ------------------------------------------------------------------------------


def _prompts(cfg: dict[str, Any], tokenizer_dir: Path) -> list[str]:
    """The same prompt text the engine decides on, without the answer prefix the engine feeds
    (reference callers let the model generate it)."""
    from grpc_router.engines.arch_router.prompt import OUTPUT_PREFIX, PromptBuilder

    builder = PromptBuilder.from_dir(tokenizer_dir)
    workload = Workload.from_json(cfg["workload"])
    cases = workload.long[: cfg["samples"]] + workload.short[: cfg["samples"]]
    texts = [builder.build(c.message_objs(), c.route_specs(), BUDGET).text for c in cases]
    return [t.removesuffix(OUTPUT_PREFIX) for t in texts]


def _time_generate(texts: list[str], generate: Callable[[str], int], n_long: int) -> dict[str, Any]:
    generate(texts[-1])  # warm-up on a short prompt
    ms, new_tokens = [], []
    for i, text in enumerate(texts):
        t = time.perf_counter()
        new_tokens.append(generate(text))
        ms.append((time.perf_counter() - t) * 1e3)
        progress(f"case {i + 1}/{len(texts)}: {ms[-1]:.0f} ms, {new_tokens[-1]} new tokens")
    return {
        "long": latency_stats(ms[:n_long]),
        "short": latency_stats(ms[n_long:]),
        "new_tokens_median": statistics.median(new_tokens),
    }


def run_torch(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(cfg["threads"])
    device = "cuda" if on_gpu(cfg) and torch.cuda.is_available() else "cpu"
    ckpt = Path(cfg["checkpoint"])
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
    model.eval()  # type: ignore[no-untyped-call]  # untyped in transformers
    # PreTrainedModel.to is `@wraps(torch.nn.Module.to)`, whose type takes the device for self.
    model.to(device)  # type: ignore[arg-type]
    tok = AutoTokenizer.from_pretrained(ckpt)  # type: ignore[no-untyped-call]
    load_s = time.perf_counter() - t

    def generate(text: str) -> int:
        enc = tok(text, return_tensors="pt", add_special_tokens=False).to(device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert isinstance(out, torch.Tensor)  # the ids alone: no return_dict_in_generate
        return int(out.shape[1] - enc["input_ids"].shape[1])  # .shape syncs the device

    texts = _prompts(cfg, ckpt)
    result = _time_generate(texts, generate, cfg["samples"])
    gpu = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {**result, "load_s": load_s, "device": device, "peak_rss_bytes": peak_rss_bytes(),
            "gpu_used_bytes": gpu}  # fmt: skip


def run_optimum(cfg: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM  # type: ignore[import-untyped]
    from transformers import AutoTokenizer

    variant_dir = Path(cfg["artifact"]) / cfg["variant"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = cfg["threads"]
    gpu = on_gpu(cfg)
    t = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(
        variant_dir, file_name="model.onnx", use_cache=True, use_io_binding=gpu,
        provider="CUDAExecutionProvider" if gpu else "CPUExecutionProvider",
        session_options=options,
    )  # fmt: skip
    tok = AutoTokenizer.from_pretrained(variant_dir)  # type: ignore[no-untyped-call]
    load_s = time.perf_counter() - t

    def generate(text: str) -> int:
        # With IO binding Optimum binds the tensors' memory as is: they must be on the device.
        enc = tok(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=0)
        return int(out.shape[1] - enc["input_ids"].shape[1])

    result = _time_generate(_prompts(cfg, variant_dir), generate, cfg["samples"])
    return {**result, "load_s": load_s, "peak_rss_bytes": peak_rss_bytes(),
            "gpu_used_bytes": gpu_used_bytes() if gpu else None}  # fmt: skip


def run_matmul(cfg: dict[str, Any]) -> dict[str, Any]:
    """Measured GEMM throughput of a prefill's MLP shape on ORT: int8 MatMulInteger on the CPU,
    fp16 MatMul with device-resident operands on CUDA."""
    if on_gpu(cfg):
        return _matmul_cuda(cfg)
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m, k, n = cfg["m"], cfg["k"], cfg["n"]
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])],
        "int8_gemm",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])],
        [helper.make_tensor("B", TensorProto.INT8, [k, n],
                            np.random.default_rng(0).integers(-127, 127, (k, n)).astype(np.int8)
                            .tobytes(), raw=True)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = cfg["threads"]
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    a = np.random.default_rng(1).integers(0, 255, (m, k)).astype(np.uint8)
    for _ in range(3):
        session.run(None, {"A": a})
    runs, t = 0, time.perf_counter()
    while time.perf_counter() - t < 3.0:
        session.run(None, {"A": a})
        runs += 1
    seconds = (time.perf_counter() - t) / runs
    return {"m": m, "k": k, "n": n, "ops_per_s": 2 * m * k * n / seconds, "ms": seconds * 1e3,
            "label": "int8 GEMM"}  # fmt: skip


def _matmul_cuda(cfg: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m, k, n = cfg["m"], cfg["k"], cfg["n"]
    w = (np.random.default_rng(0).standard_normal((k, n)) * 0.02).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["Y"])],
        "fp16_gemm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT16, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [m, n])],
        [helper.make_tensor("B", TensorProto.FLOAT16, [k, n], w.tobytes(), raw=True)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    session = ort.InferenceSession(
        model.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    a = np.random.default_rng(1).standard_normal((m, k)).astype(np.float16)
    binding = session.io_binding()
    binding.bind_ortvalue_input("A", ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0))
    binding.bind_output("Y", "cuda")
    for _ in range(10):
        session.run_with_iobinding(binding)
    runs, t = 0, time.perf_counter()
    while time.perf_counter() - t < 2.0:  # each run waits for the device (synchronous EP)
        session.run_with_iobinding(binding)
        runs += 1
    seconds = (time.perf_counter() - t) / runs
    return {"m": m, "k": k, "n": n, "ops_per_s": 2 * m * k * n / seconds, "ms": seconds * 1e3,
            "label": "fp16 GEMM (CUDA)", "providers": session.get_providers()}  # fmt: skip


def run_multiturn(cfg: dict[str, Any]) -> dict[str, Any]:
    from bench.multiturn import run_multiturn as run

    return run(cfg)


KINDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "engine": run_engine,
    "torch": run_torch,
    "optimum": run_optimum,
    "matmul": run_matmul,
    "multiturn": run_multiturn,
}

if __name__ == "__main__":
    kind, config, result_path = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    result = KINDS[kind](json.loads(config.read_text()))
    result_path.write_text(json.dumps(result, indent=1))
