"""`grpc-router eval`: routing quality and latency on a labelled JSONL set."""

from __future__ import annotations

import argparse
from typing import Any


def register_eval(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add the `eval` sub-command to the CLI's sub-parsers."""
    raise NotImplementedError
