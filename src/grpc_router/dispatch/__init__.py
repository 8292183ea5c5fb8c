"""Forwarding a routed conversation to an OpenAI-compatible upstream, with fallbacks.

Knows nothing of ONNX, the engines or gRPC: it takes settings and plain types.
"""
