"""`python -m export`: checkpoint -> self-describing ONNX artifact (torch side; never imported by
the server)."""
