"""Chat request bodies (OpenAI Chat Completions, Anthropic Messages) -> plain Messages.

Only the text that a router can read is kept: text parts and tool results; images, audio and
tool-call arguments are skipped. Nothing here knows about Envoy or gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from grpc_router.errors import InvalidArgument
from grpc_router.types import Message, Role


class ChatDialect(StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


_OPENAI_ROLES: Mapping[str, Role] = {
    "system": Role.SYSTEM,
    "developer": Role.DEVELOPER,
    "user": Role.USER,
    "assistant": Role.ASSISTANT,
    "tool": Role.TOOL,
    "function": Role.TOOL,  # the deprecated name of "tool"
}
_ANTHROPIC_ROLES: Mapping[str, Role] = {"user": Role.USER, "assistant": Role.ASSISTANT}
# Content-block types whose text a router should see.
_TEXT_BLOCKS = frozenset({"text", "input_text", "output_text"})


def content_text(content: Any, field: str) -> str:
    """The readable text of a message's content: a string, None, or a list of blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidArgument(field, "must be a string or a list of content blocks")
    parts: list[str] = []
    for i, block in enumerate(content):
        where = f"{field}[{i}]"
        if isinstance(block, str):
            parts.append(block)
            continue
        if not isinstance(block, dict):
            raise InvalidArgument(where, "a content block must be an object")
        kind = block.get("type")
        if kind in _TEXT_BLOCKS:
            text = block.get("text")
            if not isinstance(text, str):
                raise InvalidArgument(f"{where}.text", "must be a string")
            parts.append(text)
        elif kind == "tool_result":
            # Anthropic: a tool's answer, itself a string or a list of blocks.
            parts.append(content_text(block.get("content"), f"{where}.content"))
        # Other blocks (image, audio, tool_use, thinking, ...) carry nothing to route on.
    return "\n".join(p for p in parts if p)


def _messages_list(body: Mapping[str, Any]) -> list[Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages", "must be a non-empty list")
    return messages


def _parse_messages(raw: list[Any], roles: Mapping[str, Role], out: list[Message]) -> list[Message]:
    for i, item in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise InvalidArgument(where, "must be an object")
        role_name = item.get("role")
        role = roles.get(role_name) if isinstance(role_name, str) else None
        if role is None:
            raise InvalidArgument(f"{where}.role", f"must be one of {sorted(roles)}")
        text = content_text(item.get("content"), f"{where}.content")
        if text:
            out.append(Message(role=role, content=text))
    return out


def parse_openai(body: Mapping[str, Any]) -> tuple[Message, ...]:
    """Messages of an OpenAI `/v1/chat/completions` request body."""
    return tuple(_parse_messages(_messages_list(body), _OPENAI_ROLES, []))


def parse_anthropic(body: Mapping[str, Any]) -> tuple[Message, ...]:
    """Messages of an Anthropic `/v1/messages` body; its top-level `system` comes first."""
    raw = _messages_list(body)
    out: list[Message] = []
    system = content_text(body.get("system"), "system")
    if system:
        out.append(Message(role=Role.SYSTEM, content=system))
    return tuple(_parse_messages(raw, _ANTHROPIC_ROLES, out))


def parse_chat(dialect: ChatDialect, body: Mapping[str, Any]) -> tuple[Message, ...]:
    """Messages of a chat body; raises InvalidArgument naming the bad field."""
    messages = parse_openai(body) if dialect is ChatDialect.OPENAI else parse_anthropic(body)
    if not any(m.role is Role.USER for m in messages):
        raise InvalidArgument("messages", "no user message with text to route on")
    return messages
