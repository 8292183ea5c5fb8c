"""Turning the workers' measurements into ratios, a compute floor and a Markdown report."""

from __future__ import annotations

from typing import Any

GIB = 2**30


def compute_floor(
    config: dict[str, Any], long_shape: dict[str, Any], matmul: dict[str, Any]
) -> dict[str, Any]:
    """The least work a warm decision needs (prefill of the uncached suffix, attention over the
    cached prefix, one lm_head row), divided by the measured int8 GEMM throughput."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads, vocab = config["num_key_value_heads"], config["vocab_size"]
    head_dim = h // heads
    per_layer = 2 * h * h + 2 * h * kv_heads * head_dim + 3 * h * inter
    s = float(long_shape["suffix_tokens_median"])
    p = float(long_shape["cacheable_tokens_median"])
    linear = 2 * s * layers * per_layer
    attention = 4 * layers * s * (p + (s + 1) / 2) * heads * head_dim
    lm_head = 2 * h * vocab
    flops = linear + attention + lm_head
    return {
        "suffix_tokens": s,
        "cached_tokens": p,
        "flops": flops,
        "int8_ops_per_s": matmul["ops_per_s"],  # the name predates the CUDA probe
        "gemm": matmul.get("label", "int8 GEMM"),
        "floor_ms": flops / matmul["ops_per_s"] * 1e3,
    }


def _p50(entry: dict[str, Any] | None, *keys: str) -> float | None:
    for key in keys:
        if entry is None:
            return None
        entry = entry.get(key)
    return None if entry is None else float(entry["p50_ms"])


def ratios(report: dict[str, Any]) -> dict[str, Any]:
    """Speed-ups of each engine variant's warm decision (long case) over the baselines."""
    out: dict[str, Any] = {}
    torch = report.get("torch")
    for variant, eng in report["engine"].items():
        row: dict[str, Any] = {}
        for scores in ("on", "off"):
            warm = _p50(eng, "long", f"warm_scores_{scores}")
            if warm is None:
                continue
            a = _p50(torch, "long")
            b = _p50(report["optimum"].get(variant), "long")
            row[f"scores_{scores}"] = {
                "warm_p50_ms": warm,
                "vs_A": None if a is None else a / warm,
                "vs_B": None if b is None else b / warm,
                "vs_floor": warm / report["floor"]["floor_ms"] if "floor" in report else None,
            }
        if torch:
            row["rss_vs_A"] = eng["peak_rss_bytes"] / torch["peak_rss_bytes"]
        out[variant] = row
    best = min(out, key=lambda v: out[v]["scores_off"]["warm_p50_ms"]) if out else None
    out["best"] = best
    return out


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "–"
    return f"{x:,.0f}{unit}" if x >= 100 else f"{x:.2f}{unit}" if x < 10 else f"{x:.1f}{unit}"


def markdown(report: dict[str, Any]) -> str:
    m, w = report["machine"], report["workload"]
    lines = [
        f"### Benchmark: {report['layers']}-layer Arch-Router shapes (random weights)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu']}; "
        f"threads {report['args']['threads']}.",
        f"Workload: long = {w['long']['cases']} SGD dialogues, {w['long']['routes']} routes, "
        f"median {w['long']['turns_median']} turns, {w['long']['prompt_tokens_median']} prompt "
        f"tokens ({w['long']['cacheable_tokens_median']} cacheable); short = "
        f"{w['short']['cases']} CLINC150 utterances, {w['short']['routes']} routes, median "
        f"{w['short']['prompt_tokens_median']} prompt tokens. Baselines: "
        f"{report['args']['baseline_samples']} cases per kind "
        "(the engine's first ones).",
        "",
        "| system | variant | case | cache | scores | p50 ms | p95 ms | prefill ms | "
        "score/decode ms | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, eng in report["engine"].items():
        rss = eng["peak_rss_bytes"] / GIB
        system = "engine, KV on device" if eng.get("kv_on_device") else "engine"
        for kind in ("long", "short"):
            for label, cache, scores in (
                ("cold_scores_on", "cold", "on"),
                ("warm_scores_on", "warm", "on"),
                ("warm_scores_off", "warm", "off"),
            ):
                r = eng[kind][label]
                phase = r["score_ms_median"] if scores == "on" else r["decode_ms_median"]
                lines.append(
                    f"| {system} | {variant} | {kind} | {cache} | {scores} | {_fmt(r['p50_ms'])} "
                    f"| {_fmt(r['p95_ms'])} | {_fmt(r['prefill_ms_median'])} | {_fmt(phase)} "
                    f"| {rss:.2f} |"
                )
    baselines = [("A: PyTorch fp32 generate", "fp32", report.get("torch"))]
    baselines += [("B: Optimum ORT generate", v, r) for v, r in report["optimum"].items()]
    for name, variant, r in baselines:
        if not r:
            continue
        for kind in ("long", "short"):
            lines.append(
                f"| {name} | {variant} | {kind} | – | – | {_fmt(r[kind]['p50_ms'])} | "
                f"{_fmt(r[kind]['p95_ms'])} | – | – | {r['peak_rss_bytes'] / GIB:.2f} |"
            )
    gpu = [f"{name} {r['gpu_used_bytes'] / GIB:.2f} GiB" for name, r in
           [*((f"engine {v}", e) for v, e in report["engine"].items()),
            *((n.split(":")[0], r) for n, _, r in baselines)]
           if r and r.get("gpu_used_bytes")]  # fmt: skip
    if gpu:
        lines += ["", "GPU memory in use (NVML; A: torch's peak allocation): " + ", ".join(gpu)]
    conc = list(next(iter(report["engine"].values()))["throughput"]) if report["engine"] else []
    lines += ["", "| engine variant | " + " | ".join(f"decisions/s @{c}" for c in conc)
              + " | largest batch | batched vs alone, max Δp |",
              "|---|" + "---|" * (len(conc) + 2)]  # fmt: skip
    for variant, eng in report["engine"].items():
        cells = " | ".join(f"{eng['throughput'][c]['per_s']:.2f}" for c in conc)
        diff = eng.get("batched_vs_alone_max_prob_diff")
        lines.append(
            f"| {variant} | {cells} | {eng['largest_batch']} | "
            f"{'–' if diff is None else f'{diff:.2g}'} |"
        )
    f = report["floor"]
    lines += [
        "",
        f"Compute floor (long, warm): {f['flops'] / 1e9:.0f} GFLOP for {f['suffix_tokens']:.0f} "
        f"uncached tokens after {f['cached_tokens']:.0f} cached, at the measured "
        f"{f.get('gemm', 'int8 GEMM')} "
        f"{f['int8_ops_per_s'] / 1e9:.0f} GOPS = {f['floor_ms']:.0f} ms.",
        "",
        "| variant | scores | warm p50 ms | x faster than A | x faster than B | x floor | "
        "RSS / A |",
        "|---|---|---|---|---|---|---|",
    ]
    rat = report["ratios"]
    for variant, row in rat.items():
        if variant == "best":
            continue
        for scores in ("off", "on"):
            r = row.get(f"scores_{scores}")
            if r is None:
                continue
            lines.append(
                f"| {variant} | {scores} | {_fmt(r['warm_p50_ms'])} | {_fmt(r['vs_A'])} | "
                f"{_fmt(r['vs_B'])} | {_fmt(r['vs_floor'])} | "
                f"{_fmt(row.get('rss_vs_A', None) and 100 * row['rss_vs_A'], '%')} |"
            )
    lines += ["", f"Best variant (warm, scores off): {rat.get('best')}."]
    return "\n".join(lines) + "\n"
