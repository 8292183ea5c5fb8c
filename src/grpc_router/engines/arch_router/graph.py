"""The exported decoder graph's interface, shared by the exporter and the engine.

Input names, the metadata keys the exporter writes and the engine reads, and the row alignment
both sides rely on are defined here once.
"""

from __future__ import annotations

KEEP_INPUT = "logits_to_keep"
"""Graph input: how many trailing positions get logits; -m keeps each row's last m."""
MASK4D_INPUT = "attention_mask_4d"
"""Graph input: [batch, 1, seq, past+seq] visibility, ANDed with the causal and padding mask
(lets a route-name trie ride in the prompt's own run)."""
ATTENTION_META = "grpc_router.attention"
"""Metadata key naming the attention implementation."""
FUSED_ATTENTION = "GroupQueryAttention"
"""ATTENTION_META value of a graph whose attention is onnxruntime's fused kernel."""
KEEP_META = "grpc_router.logits_to_keep"
"""Metadata key stating what a negative `logits_to_keep` means."""
KEEP_LAST_M = "per-row last m"
"""KEEP_META value: -m keeps each row's last m tokens."""
ALIGN = 16
"""Prefill widths are multiples of this. Quantized MatMul kernels tile the flattened
[batch*seq] rows; aligning every row's start keeps its numbers independent of its batch
neighbours. Where a past ends does not matter."""
PAD_ID = 0
