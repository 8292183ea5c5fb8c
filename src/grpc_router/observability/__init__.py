"""Structured logs and Prometheus metrics shared by every layer above settings."""
