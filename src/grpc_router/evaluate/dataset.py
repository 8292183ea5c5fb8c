"""Eval sets and routes files: read them, check them, and normalise their names.

Data format (see data/eval/README.md): one JSON object per line,
`{"messages": [{"role": "user", "content": "..."}, ...], "label": "<route>" | null}`; a routes
file is `[{"name": ..., "description": ..., "examples": [...]?}]`. `label: null` expects `other`.
Route names are normalised to the service's pattern (lower snake case), labels alike, so that a
set written with "RentalCars" is scored against the route the service calls "rental_cars".
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from grpc_router.types import OTHER_ROUTE, Message, Role, RouteSpec

_NAME_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_NAME_OTHER = re.compile(r"[^a-z0-9_]+")


class EvalDataError(ValueError):
    """An eval set or routes file is malformed; the message says where."""


@dataclass(frozen=True, slots=True)
class EvalCase:
    """One labelled conversation of an eval set."""

    messages: tuple[Message, ...]
    label: str
    """Normalised route name, or OTHER_ROUTE for `label: null`."""


def route_name(name: str) -> str:
    """ "RentalCars" -> "rental_cars": the service's route-name pattern."""
    snake = _NAME_OTHER.sub("_", _NAME_CAMEL.sub("_", name.strip()).lower()).strip("_")
    if not snake or not snake[0].isalpha():
        snake = f"r_{snake}"
    return snake[:64]


def load_routes(path: Path) -> tuple[RouteSpec, ...]:
    """The routes of a routes JSON file, names normalised; EvalDataError when it is malformed or
    two names collide once normalised (the labels could not tell them apart)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise EvalDataError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise EvalDataError(f"{path}: expected a non-empty JSON list of routes")
    routes = [replace(r, name=route_name(r.name)) for r in parse_routes(data, str(path))]
    names = [r.name for r in routes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EvalDataError(f"{path}: route names collide after normalisation: {dupes}")
    return tuple(routes)


def parse_routes(items: Sequence[object], where: str) -> tuple[RouteSpec, ...]:
    """Routes from a parsed routes list (`[{"name", "description"?, "examples"?}]`), names as
    written; EvalDataError naming the first malformed item."""
    routes = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise EvalDataError(f"{where}: routes[{i}] needs a string `name`.")
        description = item.get("description") or ""
        examples = item.get("examples") or []
        if not isinstance(description, str):
            raise EvalDataError(f"{where}: routes[{i}].description must be a string.")
        if not isinstance(examples, list) or not all(isinstance(e, str) for e in examples):
            raise EvalDataError(f"{where}: routes[{i}].examples must be a list of strings.")
        routes.append(RouteSpec(item["name"], description, tuple(examples)))
    return tuple(routes)


def load_cases(path: Path, routes: Sequence[RouteSpec], limit: int | None) -> list[EvalCase]:
    """The first `limit` (all when None) cases of a JSONL eval set; EvalDataError, naming the
    line, when a row is malformed or labels a route the routes file does not have."""
    names = {r.name for r in routes}
    cases: list[EvalCase] = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as e:
        raise EvalDataError(f"{path}: cannot read ({e.strerror})") from None
    with handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            if limit is not None and len(cases) >= limit:
                break
            cases.append(_parse_case(path, lineno, line, names))
    if not cases:
        raise EvalDataError(f"{path}: no cases")
    return cases


def _parse_case(path: Path, lineno: int, line: str, names: set[str]) -> EvalCase:
    """One JSONL row as a case, its label normalised and checked against the route names."""
    try:
        row = json.loads(line)
        messages = tuple(Message(Role(m["role"]), str(m["content"])) for m in row["messages"])
        raw = row["label"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise EvalDataError(
            f"{path}:{lineno}: expected {{'messages': [{{'role', 'content'}}...], "
            f"'label': str|null}} ({type(e).__name__}: {e})"
        ) from None
    label = OTHER_ROUTE if raw is None else route_name(str(raw))
    if label != OTHER_ROUTE and label not in names:
        raise EvalDataError(f"{path}:{lineno}: label {raw!r} is not in the routes file")
    return EvalCase(messages, label)


def without_examples(routes: Sequence[RouteSpec]) -> tuple[RouteSpec, ...]:
    """The routes with their examples dropped: routing on the descriptions alone."""
    return tuple(RouteSpec(r.name, r.description, ()) for r in routes)
