"""Chat body parsing (OpenAI, Anthropic) and the `ext_proc:` config section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from grpc_router.chatparse import ChatDialect, parse_chat
from grpc_router.config import ConfigError, parse_config
from grpc_router.errors import InvalidArgument
from grpc_router.types import Message, Role
from tests.mesh.harness import two_route_config


def test_openai_roles_content_parts_and_tool_turns() -> None:
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "What is in"}, "this image?"]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "1", "type": "function", "function": {"name": "look"}}],
            },
            {"role": "tool", "tool_call_id": "1", "content": "a cat"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            {"role": "user", "content": "Thanks!"},
        ],
    }
    assert parse_chat(ChatDialect.OPENAI, body) == (
        Message(Role.DEVELOPER, "Answer briefly."),
        Message(Role.USER, "What is in\nthis image?"),
        Message(Role.TOOL, "a cat"),
        Message(Role.USER, "Thanks!"),
    )


def test_anthropic_system_string_and_tool_results() -> None:
    body = {
        "system": "Be terse.",
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t", "name": "weather", "input": {}}],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t",
                        "content": [{"type": "text", "text": "18°C"}],
                    },
                    {"type": "text", "text": "So, a jacket?"},
                ],
            },
        ],
    }
    assert parse_chat(ChatDialect.ANTHROPIC, body) == (
        Message(Role.SYSTEM, "Be terse."),
        Message(Role.USER, "Weather in Paris?"),
        Message(Role.USER, "18°C\nSo, a jacket?"),
    )


@pytest.mark.parametrize(
    ("dialect", "body", "field"),
    [
        (ChatDialect.OPENAI, {}, "messages"),
        (ChatDialect.OPENAI, {"messages": []}, "messages"),
        (ChatDialect.OPENAI, {"messages": ["hi"]}, "messages[0]"),
        (ChatDialect.OPENAI, {"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
        (
            ChatDialect.OPENAI,
            {"messages": [{"role": "user", "content": 42}]},
            "messages[0].content",
        ),
        (
            ChatDialect.OPENAI,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
            "messages[0].content[0].text",
        ),
        # Anthropic has no system role inside messages (it is top-level).
        (
            ChatDialect.ANTHROPIC,
            {"messages": [{"role": "system", "content": "x"}]},
            "messages[0].role",
        ),
        (ChatDialect.ANTHROPIC, {"system": 3, "messages": [{"role": "user"}]}, "system"),
        # Nothing a router can read.
        (ChatDialect.OPENAI, {"messages": [{"role": "system", "content": "x"}]}, "messages"),
    ],
)
def test_bad_bodies_name_the_field(dialect: ChatDialect, body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_chat(dialect, body)
    assert info.value.field == field


def test_ext_proc_section_through_the_config_loader() -> None:
    cfg = parse_config(
        two_route_config(ext_proc={"enabled": True, "model_header": "x-llm-model"}), Path("c.yaml")
    )
    assert cfg.ext_proc.enabled
    assert cfg.ext_proc.model_header == "x-llm-model"
    assert cfg.ext_proc.failure_mode == "open"  # a router problem must not block LLM calls


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"failure_mode": "maybe"}, "ext_proc.failure_mode"),
        ({"model_header": "X Router"}, "ext_proc.model_header: must be a lowercase"),
        ({"max_body_bytes": 0}, "ext_proc.max_body_bytes"),
        ({"openai_paths": ["v1/chat"]}, "ext_proc.openai_paths"),
        ({"rewrite_modle": True}, "ext_proc.rewrite_modle"),
        ({"route_header": "x-router-model"}, "four different header names"),
    ],
)
def test_bad_ext_proc_settings_are_named(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(two_route_config(ext_proc=section), Path("c.yaml"))
    assert message in str(info.value)
