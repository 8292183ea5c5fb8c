"""The Arch-Router engine: prompt rendering, a route-name trie, batched prefill over a prefix KV
cache, and per-route scoring, on an exported ONNX decoder."""
