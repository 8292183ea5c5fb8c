"""Routing-quality evaluation (`grpc-router eval`): labelled conversations in, accuracy, `other`
recall and latency out, in process or against a running server."""
