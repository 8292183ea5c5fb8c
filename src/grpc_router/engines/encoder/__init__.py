"""The encoder engine: zero-shot routing by sentence-embedding similarity."""
