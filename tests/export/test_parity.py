"""The exported graphs against PyTorch, and row-independence of the quantized variants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.parity import GraphRunner
from grpc_router.engines.artifact import load_artifact


def test_fp32_graph_matches_pytorch(tiny_checkpoint: Path, tiny_artifacts: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    ids = np.random.default_rng(7).integers(0, model.config.vocab_size, (2, 40))
    mask = np.ones_like(ids)
    mask[1, 29:] = 0  # right padding on the second row
    positions = np.tile(np.arange(40), (2, 1))
    with torch.inference_mode():
        expected = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).logits.numpy()
    got, _ = GraphRunner(tiny_artifacts / "fp32" / "model.onnx").run(ids, mask, positions)
    assert np.max(np.abs(got[0] - expected[0])) < 1e-4
    assert np.max(np.abs(got[1, :29] - expected[1, :29])) < 1e-4
    # The export-time report recorded the same order of agreement on the routing prompts.
    parity = load_artifact(tiny_artifacts / "fp32").parity
    assert parity["max_abs_logit_diff"] < 1e-4
    assert parity["greedy_token_agreement"] == 1.0


@pytest.mark.parametrize("variant", ["int4", "int8", "fp16"])
def test_variant_parity_is_reported(tiny_artifacts: Path, variant: str) -> None:
    parity = load_artifact(tiny_artifacts / variant).parity
    assert parity["checked"] is True
    for case in parity["cases"]:
        keys = {"prefill_max_abs_diff", "prefill_kl", "decode_max_abs_diff", "decode_kl"}
        assert keys <= set(case)
        assert case["prefill_kl"] >= 0 and case["decode_kl"] >= 0
    agreement = parity["greedy_route_agreement"]
    if parity["routes_parsed"] == 0:  # random weights rarely answer a route: no fake 100%
        assert agreement is None
    else:
        assert 0.0 <= agreement <= 1.0
    assert "gate" in parity


def _last_logits_four_ways(session: GraphRunner, a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    """Request `a`'s next-token logits computed alone, after a cached prefix, right-padded,
    and batched (right-padded) with request `b`."""
    n, m = len(a), len(b)
    alone, _ = session.run(a[None], np.ones((1, n)), np.arange(n)[None])
    k = n // 2
    _, past = session.run(a[None, :k], np.ones((1, k)), np.arange(k)[None])
    cached, _ = session.run(a[None, k:], np.ones((1, n)), np.arange(k, n)[None], past)
    pad = 7
    padded, _ = session.run(
        np.pad(a, (0, pad))[None], np.pad(np.ones(n), (0, pad))[None], np.arange(n + pad)[None]
    )
    width = max(n, m)
    batch_ids = np.stack([np.pad(a, (0, width - n)), np.pad(b, (0, width - m))])
    batch_mask = np.stack([np.pad(np.ones(n), (0, width - n)), np.pad(np.ones(m), (0, width - m))])
    batched, _ = session.run(batch_ids, batch_mask, np.tile(np.arange(width), (2, 1)))
    return [alone[0, -1], cached[0, -1], padded[0, n - 1], batched[0, n - 1]]


@pytest.mark.parametrize("variant", ["fp32", "int8", "int4"])
def test_logits_do_not_depend_on_what_shares_the_call(tiny_artifacts: Path, variant: str) -> None:
    """A variant the manifest calls exact gives bit-identical logits for a request alone, after a
    cached prefix, padded and batched; one it does not call exact stays within 1e-5."""
    manifest = load_artifact(tiny_artifacts / variant)
    exact = manifest.quantization["exact"]
    session = GraphRunner(tiny_artifacts / variant / manifest.model_file)
    rng = np.random.default_rng(3)
    vocab = manifest.extra["vocab_size"]
    worst = 0.0
    for n, m in ((57, 31), (100, 64), (13, 40), (64, 63)):
        a, b = rng.integers(0, vocab, n), rng.integers(0, vocab, m)
        alone, *others = _last_logits_four_ways(session, a, b)
        for how, logits in zip(("cached prefix", "padded", "batched"), others, strict=True):
            diff = float(np.max(np.abs(alone - logits)))
            worst = max(worst, diff)
            if exact:
                assert np.array_equal(alone, logits), f"{variant} {how}: logits moved by {diff}"
    assert worst < 1e-5
    if variant in ("fp32", "int8"):
        assert exact, "fp32 and row-wise int8 must stay exact"
