"""Routing engines: a conversation and a route set in, a `Decision` out.

`arch_router` runs Katanemo's Arch-Router-1.5B on onnxruntime; `encoder` routes by sentence
embeddings (all-MiniLM-L6-v2); `cascade` lets the encoder answer when it is sure; `selection`
builds the one the config names. Engines know nothing of gRPC.
"""
