"""The routing view of a conversation: what a routing decision may depend on.

Agent harnesses send far more than the user's words. The view keeps what says something about
the user's intent and drops the rest, documented in docs/configuration.md ("What routing
reads"):

- tool calls and tool results (`MessageKind.TOOL_CALL`, `MessageKind.TOOL_RESULT`, and every
  `Role.TOOL` message);
- system and developer turns (instructions, not intent; no engine reads them);
- configured tag blocks such as `<system-reminder>…</system-reminder>`, tags included;
- messages left empty by the above;
- everything after the latest user text turn: the agent's own work on that turn.

Non-text content parts (images, audio, files) never reach here: the transports drop them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from functools import lru_cache

from grpc_router.errors import InvalidArgument
from grpc_router.types import Message, MessageKind, Role

_ROUTED_ROLES = frozenset({Role.USER, Role.ASSISTANT})


@lru_cache(maxsize=64)
def _tag_pattern(tags: tuple[str, ...]) -> re.Pattern[str] | None:
    if not tags:
        return None
    names = "|".join(re.escape(t) for t in tags)
    return re.compile(rf"<({names})(?:\s[^>]*)?>.*?</\1\s*>", re.DOTALL)


def routing_view(messages: Sequence[Message], strip_tags: tuple[str, ...]) -> tuple[Message, ...]:
    """The messages a decision reads, oldest first, ending with the latest user text turn.
    Raises InvalidArgument when no user text is left."""
    pattern = _tag_pattern(strip_tags)
    view: list[Message] = []
    last_user = -1
    for m in messages:
        if m.kind is not MessageKind.TEXT or m.role not in _ROUTED_ROLES:
            continue
        content = pattern.sub("", m.content) if pattern is not None else m.content
        if not content.strip():
            continue
        view.append(m if content == m.content else Message(m.role, content.strip()))
        if m.role is Role.USER:
            last_user = len(view) - 1
    if last_user < 0:
        raise InvalidArgument(
            "messages",
            "no user text to route on once tool calls, tool results and "
            f"{', '.join(f'<{t}>' for t in strip_tags) or 'no'} blocks are set aside",
        )
    return tuple(view[: last_user + 1])


def view_key(view: Sequence[Message], route_set: str) -> str:
    """A stable digest of a routing view under a route set."""
    payload = json.dumps([route_set, [[m.role.value, m.content] for m in view]])
    return hashlib.sha256(payload.encode()).hexdigest()
