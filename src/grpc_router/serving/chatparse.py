"""Chat request bodies (OpenAI Chat Completions, OpenAI Responses, Anthropic Messages) -> Messages.

Only text is kept: text parts, tool results' text, and the names of the tools an assistant called.
Images, audio, files and tool-call arguments are skipped, never an error; a message left without
text is dropped. Tool traffic is marked with `MessageKind` (TOOL_CALL, TOOL_RESULT), so that the
router can route on the user's own turns. Nothing here knows about Envoy or gRPC.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from enum import StrEnum
from typing import Any

from grpc_router.errors import InvalidArgument
from grpc_router.types import Message, MessageKind, Role


class ChatDialect(StrEnum):
    OPENAI = "openai"
    """OpenAI Chat Completions, `POST /v1/chat/completions`."""
    ANTHROPIC = "anthropic"
    """Anthropic Messages, `POST /v1/messages`."""
    RESPONSES = "responses"
    """OpenAI Responses, `POST /v1/responses`."""


_OPENAI_ROLES: Mapping[str, Role] = {
    "system": Role.SYSTEM,
    "developer": Role.DEVELOPER,
    "user": Role.USER,
    "assistant": Role.ASSISTANT,
    "tool": Role.TOOL,
    "function": Role.TOOL,  # the deprecated name of "tool"
}
_ANTHROPIC_ROLES: Mapping[str, Role] = {"user": Role.USER, "assistant": Role.ASSISTANT}
_RESPONSES_ROLES: Mapping[str, Role] = {
    "user": Role.USER,
    "assistant": Role.ASSISTANT,
    "system": Role.SYSTEM,
    "developer": Role.DEVELOPER,
}
# Content parts whose text a router should see (Chat Completions, Responses, Anthropic).
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
# Anthropic blocks that call a tool (client tools, server tools, MCP tools).
_TOOL_USE_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})
# Responses API items that are tool traffic; every other item type without a role (reasoning,
# web_search_call, file_search_call, computer_call, image_generation_call, ...) is skipped.
_RESPONSES_CALLS = frozenset({"function_call", "custom_tool_call"})
_RESPONSES_OUTPUTS = frozenset({"function_call_output", "custom_tool_call_output"})

NO_USER_TEXT = "no user message with text to route on"


def content_text(content: Any, field: str) -> str:
    """The readable text of a content value: a string, None, or a list of parts (strings or
    objects). Text parts are joined with newlines; every other part is skipped."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidArgument(field, "must be a string or a list of content parts")
    parts: list[str] = []
    for i, part in enumerate(content):
        text = _part_text(part, f"{field}[{i}]")
        if text:
            parts.append(text)
    return "\n".join(parts)


def _part_text(part: Any, where: str) -> str:
    """A content part's text; "" for parts without text to route on (images, audio, files...)."""
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        raise InvalidArgument(where, "a content part must be an object or a string")
    if part.get("type") not in _TEXT_PARTS:
        return ""
    text = part.get("text")
    if not isinstance(text, str):
        raise InvalidArgument(f"{where}.text", "must be a string")
    return text


def _call_text(names: list[str]) -> str:
    """What a TOOL_CALL message says: the called tools, without their arguments."""
    return "\n".join(f"{name}(...)" for name in names)


def _tool_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(where, "must be a non-empty string")
    return value


def _append(out: list[Message], role: Role, text: str, kind: MessageKind) -> None:
    if text:
        out.append(Message(role=role, content=text, kind=kind))


def _object(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise InvalidArgument(where, "must be an object")
    return item


def _role(item: Mapping[str, Any], roles: Mapping[str, Role], where: str) -> Role:
    name = item.get("role")
    role = roles.get(name) if isinstance(name, str) else None
    if role is None:
        raise InvalidArgument(f"{where}.role", f"must be one of {sorted(roles)}")
    return role


def _list_field(body: Mapping[str, Any], field: str) -> list[Any]:
    value = body.get(field)
    if not isinstance(value, list) or not value:
        raise InvalidArgument(field, "must be a non-empty list")
    return value


# -- OpenAI Chat Completions ------------------------------------------------------------------


def _openai_tool_calls(item: Mapping[str, Any], where: str) -> list[str]:
    """Names of the tools an assistant message calls (`tool_calls`, or legacy `function_call`)."""
    names: list[str] = []
    calls = item.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise InvalidArgument(f"{where}.tool_calls", "must be a list")
        for j, raw in enumerate(calls):
            at = f"{where}.tool_calls[{j}]"
            call = _object(raw, at)
            kind = call.get("type", "function")
            # {"type": "function", "function": {"name", "arguments"}}; newer custom tools carry
            # {"type": "custom", "custom": {"name", "input"}}. Other types: named by their type.
            spec = call.get(kind) if isinstance(kind, str) else None
            if kind in ("function", "custom"):
                spec = _object(spec, f"{at}.{kind}")
                names.append(_tool_name(spec.get("name"), f"{at}.{kind}.name"))
            elif isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec["name"]:
                names.append(spec["name"])
            else:
                names.append(str(kind) if kind else "tool")
    legacy = item.get("function_call")
    if legacy is not None:
        at = f"{where}.function_call"
        names.append(_tool_name(_object(legacy, at).get("name"), f"{at}.name"))
    return names


def parse_openai(body: Mapping[str, Any]) -> tuple[Message, ...]:
    """Messages of an OpenAI `/v1/chat/completions` request body."""
    out: list[Message] = []
    for i, raw in enumerate(_list_field(body, "messages")):
        where = f"messages[{i}]"
        item = _object(raw, where)
        role = _role(item, _OPENAI_ROLES, where)
        text = content_text(item.get("content"), f"{where}.content")
        if role is Role.TOOL:
            _append(out, Role.TOOL, text, MessageKind.TOOL_RESULT)
            continue
        _append(out, role, text, MessageKind.TEXT)
        if role is Role.ASSISTANT:
            names = _openai_tool_calls(item, where)
            if names:
                _append(out, Role.ASSISTANT, _call_text(names), MessageKind.TOOL_CALL)
    return tuple(out)


# -- Anthropic Messages -----------------------------------------------------------------------


def _anthropic_blocks(content: Any, where: str) -> Iterator[tuple[MessageKind, str]]:
    """(kind, text) of a message's content blocks in order, runs of text blocks joined and runs
    of tool calls joined; every tool result on its own."""
    if content is None or isinstance(content, str):
        yield MessageKind.TEXT, content or ""
        return
    if not isinstance(content, list):
        raise InvalidArgument(where, "must be a string or a list of content blocks")
    texts: list[str] = []
    calls: list[str] = []
    for j, block in enumerate(content):
        at = f"{where}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in _TOOL_USE_BLOCKS:
            if texts:
                yield MessageKind.TEXT, "\n".join(texts)
                texts = []
            calls.append(_tool_name(_object(block, at).get("name"), f"{at}.name"))
            continue
        if calls:
            yield MessageKind.TOOL_CALL, _call_text(calls)
            calls = []
        if kind == "tool_result":
            if texts:
                yield MessageKind.TEXT, "\n".join(texts)
                texts = []
            yield (
                MessageKind.TOOL_RESULT,
                content_text(_object(block, at).get("content"), at + ".content"),
            )
            continue
        text = _part_text(block, at)  # text blocks; images, documents, thinking... give ""
        if text:
            texts.append(text)
    if texts:
        yield MessageKind.TEXT, "\n".join(texts)
    if calls:
        yield MessageKind.TOOL_CALL, _call_text(calls)


def parse_anthropic(body: Mapping[str, Any]) -> tuple[Message, ...]:
    """Messages of an Anthropic `/v1/messages` body; its top-level `system` comes first."""
    raw_messages = _list_field(body, "messages")
    out: list[Message] = []
    _append(out, Role.SYSTEM, content_text(body.get("system"), "system"), MessageKind.TEXT)
    for i, raw in enumerate(raw_messages):
        where = f"messages[{i}]"
        item = _object(raw, where)
        role = _role(item, _ANTHROPIC_ROLES, where)
        for kind, text in _anthropic_blocks(item.get("content"), f"{where}.content"):
            _append(out, role, text, kind)
    return tuple(out)


# -- OpenAI Responses -------------------------------------------------------------------------


def _responses_item(item: Mapping[str, Any], where: str, out: list[Message]) -> None:
    kind = item.get("type")
    if kind in _RESPONSES_CALLS:
        name = _tool_name(item.get("name"), f"{where}.name")
        _append(out, Role.ASSISTANT, _call_text([name]), MessageKind.TOOL_CALL)
    elif kind in _RESPONSES_OUTPUTS:
        # A string, or (newer) a list of input_text / input_image / input_file parts.
        text = content_text(item.get("output"), f"{where}.output")
        _append(out, Role.TOOL, text, MessageKind.TOOL_RESULT)
    elif kind == "message" or (kind is None and "role" in item):
        role = _role(item, _RESPONSES_ROLES, where)
        text = content_text(item.get("content"), f"{where}.content")
        _append(out, role, text, MessageKind.TEXT)
    elif not isinstance(kind, str):
        raise InvalidArgument(f"{where}.type", "an input item needs a type or a role")
    # Any other item (reasoning, web_search_call, computer_call, item_reference, ...): skipped.


def parse_responses(body: Mapping[str, Any]) -> tuple[Message, ...]:
    """Messages of an OpenAI `/v1/responses` body: `instructions` first (as a system message),
    then `input` (a string: one user message; or a list of items)."""
    out: list[Message] = []
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidArgument("instructions", "must be a string")
    _append(out, Role.SYSTEM, instructions or "", MessageKind.TEXT)
    raw_input = body.get("input")
    if isinstance(raw_input, str):
        _append(out, Role.USER, raw_input, MessageKind.TEXT)
        return tuple(out)
    if not isinstance(raw_input, list) or not raw_input:
        raise InvalidArgument("input", "must be a string or a non-empty list of items")
    for i, raw in enumerate(raw_input):
        where = f"input[{i}]"
        _responses_item(_object(raw, where), where, out)
    return tuple(out)


# -- entry point ------------------------------------------------------------------------------

_PARSERS = {
    ChatDialect.OPENAI: (parse_openai, "messages"),
    ChatDialect.ANTHROPIC: (parse_anthropic, "messages"),
    ChatDialect.RESPONSES: (parse_responses, "input"),
}


def parse_chat(dialect: ChatDialect, body: Mapping[str, Any]) -> tuple[Message, ...]:
    """Messages of a request body; raises InvalidArgument naming the bad field, or naming the
    conversation (`messages` / `input`) when no user message has text to route on."""
    parse, field = _PARSERS[dialect]
    messages = parse(body)
    if not any(
        m.role is Role.USER and m.kind is MessageKind.TEXT and m.content.strip() for m in messages
    ):
        raise InvalidArgument(field, NO_USER_TEXT)
    return messages
