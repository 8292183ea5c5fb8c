"""Export-time parity: each ONNX variant against the PyTorch checkpoint on routing prompts.

Per prompt: max |logit difference| and KL(torch || onnx) of the next-token distribution at the
prefill and at one decode step (both fed the torch greedy token), and whether greedy decoding
(16 tokens max, as reference callers do) yields the same tokens and the same route.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import onnxruntime as ort

from export.routing_cases import ROUTING_CASES, RoutingCase

MAX_NEW_TOKENS = 16
_ROUTE_RE = re.compile(r"\{.*?\}", re.S)


@dataclass
class TorchReference:
    """Torch results for one prompt."""

    input_ids: list[int]
    prefill_logits: np.ndarray
    decode_logits: np.ndarray
    greedy: list[int]
    route: str | None


def parse_route(text: str) -> str | None:
    """The route name in Arch-Router's `{"route": "..."}` answer, or None if there is none."""
    match = _ROUTE_RE.search(text)
    if not match:
        return None
    try:
        value = json.loads(match.group(0))
    except json.JSONDecodeError:
        return None
    route = value.get("route") if isinstance(value, dict) else None
    return route if isinstance(route, str) else None


def encode_cases(checkpoint: Path, cases: Sequence[RoutingCase]) -> tuple[Any, list[list[int]]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)  # type: ignore[no-untyped-call]
    encoded = [
        list(
            tokenizer.apply_chat_template(
                case.chat_messages(),
                add_generation_prompt=True,
                tokenize=True,
            )
        )
        for case in cases
    ]
    return tokenizer, encoded


def torch_reference(
    checkpoint: Path, cases: Sequence[RoutingCase] = ROUTING_CASES
) -> list[TorchReference]:
    """Run the checkpoint in float32 PyTorch; the model is freed on return."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer, encoded = encode_cases(checkpoint, cases)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.eval()  # type: ignore[no-untyped-call]
    eos = model.config.eos_token_id
    refs = []
    with torch.inference_mode():
        for ids in encoded:
            out = model(torch.tensor([ids]), use_cache=True)
            prefill = out.logits[0, -1].double().numpy()
            past = out.past_key_values
            token = int(prefill.argmax())
            greedy = [token]
            decode: np.ndarray | None = None
            while len(greedy) < MAX_NEW_TOKENS and token != eos:
                out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[0, -1].double().numpy()
                if decode is None:
                    decode = logits
                token = int(logits.argmax())
                greedy.append(token)
            if decode is None:  # eos at once: still check one decode step
                out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                decode = out.logits[0, -1].double().numpy()
            text = tokenizer.decode(greedy, skip_special_tokens=True)
            refs.append(TorchReference(ids, prefill, decode, greedy, parse_route(text)))
    del model
    return refs


class GraphRunner:
    """Runs an exported decoder graph through its plain inputs (ids, mask, positions, past),
    its optional ones left at their defaults: how Optimum would call it. The parity check and
    the export's tests drive graphs with it (the engine has its own session)."""

    def __init__(
        self, model_path: Path, *, providers: Sequence[str] = ("CPUExecutionProvider",)
    ) -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), options, providers=list(providers))
        self.past_names = [
            i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")
        ]
        first = next(i for i in self.session.get_inputs() if i.name in self.past_names)
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.kv_dtype = np.float16 if "float16" in first.type else np.float32  # fp16: float16
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {name: np.zeros(shape, self.kv_dtype) for name in self.past_names}

    def run(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: dict[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Returns (logits [b, s, vocab], past for the next call)."""
        feeds = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
            "position_ids": position_ids.astype(np.int64),
            **(past if past is not None else self.empty_past(input_ids.shape[0])),
        }
        outputs = self.session.run(self.output_names, feeds)
        named = dict(zip(self.output_names, outputs, strict=True))
        presents = {
            name.replace("present.", "past_key_values.", 1): value
            for name, value in named.items()
            if name.startswith("present.")
        }
        return named["logits"], presents

    def step(
        self, ids: Sequence[int], past: dict[str, np.ndarray] | None, past_len: int
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One unpadded batch-1 call: `ids` after `past_len` cached tokens."""
        n = len(ids)
        logits, present = self.run(
            np.array([ids]),
            np.ones((1, past_len + n), np.int64),
            np.arange(past_len, past_len + n)[None, :],
            past,
        )
        return logits[0, -1].astype(np.float64), present


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p_log = p_logits - np.logaddexp.reduce(p_logits)
    q_log = q_logits - np.logaddexp.reduce(q_logits)
    return float(np.sum(np.exp(p_log) * (p_log - q_log)))


class CaseReport(TypedDict):
    """One routing prompt's parity: an ONNX graph's next-token logits against PyTorch's."""

    prompt_tokens: int
    prefill_max_abs_diff: float
    prefill_kl: float
    decode_max_abs_diff: float
    decode_kl: float
    greedy_tokens_equal: bool
    torch_route: str | None
    onnx_route: str | None


def onnx_parity(
    model_path: Path,
    refs: Sequence[TorchReference],
    tokenizer: Any,
    eos_token_id: int,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> dict[str, Any]:
    """Compare one graph with the torch reference; JSON-ready report."""
    session = GraphRunner(model_path, providers=providers)
    cases = [_case_report(session, ref, tokenizer, eos_token_id) for ref in refs]
    parsed = [c for c in cases if c["torch_route"] is not None]
    return {
        "checked": True,
        "providers": list(providers),
        "prompts": len(cases),
        "max_abs_logit_diff": max(
            max(c["prefill_max_abs_diff"], c["decode_max_abs_diff"]) for c in cases
        ),
        "max_kl": max(max(c["prefill_kl"], c["decode_kl"]) for c in cases),
        "greedy_token_agreement": sum(c["greedy_tokens_equal"] for c in cases) / len(cases),
        # Over the prompts where PyTorch answered a route; None when it answered none (random
        # weights), rather than a meaningless 100% of None == None.
        "greedy_route_agreement": (
            sum(c["torch_route"] == c["onnx_route"] for c in parsed) / len(parsed)
            if parsed
            else None
        ),
        "routes_parsed": len(parsed),
        "cases": cases,
    }


def _case_report(
    session: GraphRunner, ref: TorchReference, tokenizer: Any, eos_token_id: int
) -> CaseReport:
    """The prefill and first decode step fed PyTorch's greedy token, then the graph's own
    greedy decoding."""
    prefill, past = session.step(ref.input_ids, None, 0)
    n = len(ref.input_ids)
    decode, _ = session.step([ref.greedy[0]], past, n)
    greedy = [int(prefill.argmax())]
    logits, past_g = prefill, past
    while len(greedy) < MAX_NEW_TOKENS and greedy[-1] != eos_token_id:
        logits, past_g = session.step([greedy[-1]], past_g, n + len(greedy) - 1)
        greedy.append(int(logits.argmax()))
    route = parse_route(tokenizer.decode(greedy, skip_special_tokens=True))
    return {
        "prompt_tokens": n,
        "prefill_max_abs_diff": float(np.max(np.abs(prefill - ref.prefill_logits))),
        "prefill_kl": _kl(ref.prefill_logits, prefill),
        "decode_max_abs_diff": float(np.max(np.abs(decode - ref.decode_logits))),
        "decode_kl": _kl(ref.decode_logits, decode),
        "greedy_tokens_equal": greedy == ref.greedy,
        "torch_route": ref.route,
        "onnx_route": route,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m export.parity CHECKPOINT ARTIFACT_ROOT [--variants ...]`: re-run the parity
    check of existing variants against their checkpoint; prints a Markdown table and JSON."""
    import argparse

    from export.progress import Progress, markdown_table
    from grpc_router.engines.artifact import list_variants, load_artifact

    parser = argparse.ArgumentParser(prog="python -m export.parity")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("artifact_root", type=Path)
    parser.add_argument("--variants", default=None, help="comma-separated (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the reports here")
    args = parser.parse_args(argv)
    progress = Progress(prefix="parity")
    variants = args.variants.split(",") if args.variants else list_variants(args.artifact_root)
    with progress.step("PyTorch reference"):
        refs = torch_reference(args.checkpoint)
        tokenizer, _ = encode_cases(args.checkpoint, [])
    eos = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    reports: dict[str, Any] = {}
    for variant in variants:
        manifest = load_artifact(args.artifact_root / variant, verify_hashes=False)
        with progress.step(f"{variant}"):
            reports[variant] = onnx_parity(
                args.artifact_root / variant / manifest.model_file, refs, tokenizer, eos
            )
    rows = [
        [
            v,
            f"{r['max_abs_logit_diff']:.3g}",
            f"{r['max_kl']:.3g}",
            f"{r['greedy_token_agreement']:.0%}",
            "n/a (no route parsed)"
            if r["greedy_route_agreement"] is None
            else f"{r['greedy_route_agreement']:.0%}",
        ]
        for v, r in reports.items()
    ]
    headers = ["variant", "max abs logit diff", "max KL", "greedy tokens", "greedy route"]
    print(markdown_table(headers, rows))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
