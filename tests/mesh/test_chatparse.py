"""Request body parsing (OpenAI Chat Completions, OpenAI Responses, Anthropic Messages) and the
`ext_proc:` config section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from grpc_router.errors import InvalidArgument
from grpc_router.serving.chatparse import ChatDialect, parse_chat
from grpc_router.settings import ConfigError, ExtProcSettings, parse_config
from grpc_router.types import Message, MessageKind, Role
from tests.mesh.harness import two_route_config

TEXT, CALL, RESULT = MessageKind.TEXT, MessageKind.TOOL_CALL, MessageKind.TOOL_RESULT
IMAGE_URL = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


# -- OpenAI Chat Completions --------------------------------------------------------------------


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
            {"role": "user", "content": [IMAGE_URL]},  # only an image: dropped
            {"role": "user", "content": "Thanks!"},
        ],
    }
    assert parse_chat(ChatDialect.OPENAI, body) == (
        Message(Role.DEVELOPER, "Answer briefly."),
        Message(Role.USER, "What is in\nthis image?"),
        Message(Role.ASSISTANT, "look(...)", CALL),
        Message(Role.TOOL, "a cat", RESULT),
        Message(Role.USER, "Thanks!"),
    )


def test_openai_agent_loop_with_parallel_calls_text_and_legacy_functions() -> None:
    body = {
        "model": "auto",
        "messages": [
            {"role": "system", "content": "You book travel."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Flights to Lisbon on Friday?"},
                    IMAGE_URL,
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                    {"type": "file", "file": {"file_id": "f-1"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [
                    {
                        "id": "a",
                        "type": "function",
                        "function": {"name": "search_flights", "arguments": '{"to": "LIS"}'},
                    },
                    {"id": "b", "type": "custom", "custom": {"name": "weather", "input": "LIS"}},
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "a",
                "content": [{"type": "text", "text": "3 flights"}],
            },
            {"role": "tool", "tool_call_id": "b", "content": "sunny"},
            # Legacy functions API: function_call on the assistant, role "function" for the answer.
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "book", "arguments": "{}"},
            },
            {"role": "function", "name": "book", "content": "booked"},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},  # no text
        ],
    }
    assert parse_chat(ChatDialect.OPENAI, body) == (
        Message(Role.SYSTEM, "You book travel."),
        Message(Role.USER, "Flights to Lisbon on Friday?"),
        Message(Role.ASSISTANT, "Let me look."),
        Message(Role.ASSISTANT, "search_flights(...)\nweather(...)", CALL),
        Message(Role.TOOL, "3 flights", RESULT),
        Message(Role.TOOL, "sunny", RESULT),
        Message(Role.ASSISTANT, "book(...)", CALL),
        Message(Role.TOOL, "booked", RESULT),
    )


def test_openai_tool_arguments_never_reach_the_messages() -> None:
    secret = '{"card": "4111 1111 1111 1111"}'
    body = {
        "messages": [
            {"role": "user", "content": "Pay the invoice."},
            {
                "role": "assistant",
                "tool_calls": [
                    {"type": "function", "function": {"name": "pay", "arguments": secret}}
                ],
            },
        ]
    }
    assert all("4111" not in m.content for m in parse_chat(ChatDialect.OPENAI, body))


# -- Anthropic Messages -------------------------------------------------------------------------


def test_anthropic_system_string_tool_use_and_tool_results() -> None:
    body = {
        "system": "Be terse.",
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "I should call the tool.", "signature": "s"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "t", "name": "weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "u", "name": "clock", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t",
                        "content": [{"type": "text", "text": "18°C"}],
                    },
                    {"type": "tool_result", "tool_use_id": "u", "content": "14:00"},
                    {"type": "text", "text": "So, a jacket?"},
                    {"type": "text", "text": "Or a coat?"},
                ],
            },
        ],
    }
    assert parse_chat(ChatDialect.ANTHROPIC, body) == (
        Message(Role.SYSTEM, "Be terse."),
        Message(Role.USER, "Weather in Paris?"),
        Message(Role.ASSISTANT, "Checking."),
        Message(Role.ASSISTANT, "weather(...)\nclock(...)", CALL),
        Message(Role.USER, "18°C", RESULT),
        Message(Role.USER, "14:00", RESULT),
        Message(Role.USER, "So, a jacket?\nOr a coat?"),
    )


def test_anthropic_images_are_ignored_and_block_order_is_kept() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A"}}
    body = {
        "system": [{"type": "text", "text": "You drive a browser."}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Open the billing page."}]},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "s", "name": "screenshot", "input": {}}],
            },
            # A screenshot as the tool's answer: no text, so no message.
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "s", "content": [image]}],
            },
            # Text before a tool result stays before it.
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Here is the error:"},
                    {"type": "tool_result", "tool_use_id": "s", "content": "404"},
                    image,
                    {"type": "document", "source": {"type": "text", "data": "x"}},
                ],
            },
            {"role": "user", "content": [image]},
        ],
    }
    assert parse_chat(ChatDialect.ANTHROPIC, body) == (
        Message(Role.SYSTEM, "You drive a browser."),
        Message(Role.USER, "Open the billing page."),
        Message(Role.ASSISTANT, "screenshot(...)", CALL),
        Message(Role.USER, "Here is the error:"),
        Message(Role.USER, "404", RESULT),
    )


# -- OpenAI Responses ---------------------------------------------------------------------------


def test_responses_string_input_with_instructions() -> None:
    body = {"model": "gpt-4.1", "instructions": "Talk like a pirate.", "input": "Hello there"}
    assert parse_chat(ChatDialect.RESPONSES, body) == (
        Message(Role.SYSTEM, "Talk like a pirate."),
        Message(Role.USER, "Hello there"),
    )


def test_responses_items_function_calls_outputs_and_ignored_items() -> None:
    body = {
        "model": "gpt-4.1",
        "instructions": None,
        "input": [
            {"role": "developer", "content": "Use metric units."},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this dish, and its calories?"},
                    {"type": "input_image", "image_url": "https://example.com/dish.png"},
                    {"type": "input_file", "file_id": "file-1"},
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}},
                ],
            },
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {
                "type": "function_call",
                "call_id": "c1",
                "name": "lookup_calories",
                "arguments": '{"dish": "paella"}',
            },
            {"type": "function_call_output", "call_id": "c1", "output": "650 kcal"},
            {"type": "web_search_call", "id": "ws_1", "status": "completed"},
            {"type": "file_search_call", "id": "fs_1", "queries": ["paella"]},
            {"type": "computer_call", "id": "cc_1", "call_id": "c2", "action": {"type": "click"}},
            {"type": "image_generation_call", "id": "ig_1", "result": "AAAA"},
            {"type": "item_reference", "id": "msg_0"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Paella, about 650 kcal."}],
            },
            {"role": "user", "content": [{"type": "input_image", "image_url": "x"}]},  # dropped
            {"role": "user", "content": "And for two?"},
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        ],
    }
    assert parse_chat(ChatDialect.RESPONSES, body) == (
        Message(Role.DEVELOPER, "Use metric units."),
        Message(Role.USER, "What is this dish, and its calories?"),
        Message(Role.ASSISTANT, "lookup_calories(...)", CALL),
        Message(Role.TOOL, "650 kcal", RESULT),
        Message(Role.ASSISTANT, "Paella, about 650 kcal."),
        Message(Role.USER, "And for two?"),
        Message(Role.SYSTEM, "Be brief."),
    )


def test_responses_function_call_output_as_content_parts() -> None:
    body = {
        "input": [
            {"role": "user", "content": "Describe the chart."},
            {"type": "function_call", "call_id": "c", "name": "render", "arguments": "{}"},
            {
                "type": "function_call_output",
                "call_id": "c",
                "output": [
                    {"type": "input_text", "text": "rendered"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                ],
            },
        ]
    }
    assert parse_chat(ChatDialect.RESPONSES, body)[-2:] == (
        Message(Role.ASSISTANT, "render(...)", CALL),
        Message(Role.TOOL, "rendered", RESULT),
    )


# -- malformed bodies ---------------------------------------------------------------------------

_ONLY_TOOLS_OPENAI = {
    "messages": [
        {"role": "system", "content": "x"},
        {"role": "tool", "tool_call_id": "1", "content": "result"},
    ]
}
_ONLY_TOOLS_ANTHROPIC = {
    "messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "r"}]}
    ]
}
_ONLY_TOOLS_RESPONSES = {
    "instructions": "x",
    "input": [{"type": "function_call_output", "call_id": "c", "output": "r"}],
}


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
        (
            ChatDialect.OPENAI,
            {"messages": [{"role": "user", "content": [7]}]},
            "messages[0].content[0]",
        ),
        (
            ChatDialect.OPENAI,
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "tool_calls": {}},
                ]
            },
            "messages[1].tool_calls",
        ),
        (
            ChatDialect.OPENAI,
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "tool_calls": [{"type": "function", "function": {}}]},
                ]
            },
            "messages[1].tool_calls[0].function.name",
        ),
        (
            ChatDialect.OPENAI,
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "tool_calls": ["f"]},
                ]
            },
            "messages[1].tool_calls[0]",
        ),
        (
            ChatDialect.OPENAI,
            {"messages": [{"role": "assistant", "function_call": {"name": 3}}]},
            "messages[0].function_call.name",
        ),
        # Anthropic has no system role inside messages (it is top-level).
        (
            ChatDialect.ANTHROPIC,
            {"messages": [{"role": "system", "content": "x"}]},
            "messages[0].role",
        ),
        (ChatDialect.ANTHROPIC, {"system": 3, "messages": [{"role": "user"}]}, "system"),
        (
            ChatDialect.ANTHROPIC,
            {"messages": [{"role": "user", "content": {"type": "text"}}]},
            "messages[0].content",
        ),
        (
            ChatDialect.ANTHROPIC,
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "t"}]},
                ]
            },
            "messages[1].content[0].name",
        ),
        (
            ChatDialect.ANTHROPIC,
            {
                "messages": [
                    {"role": "user", "content": [{"type": "tool_result", "content": 5}]},
                ]
            },
            "messages[0].content[0].content",
        ),
        (ChatDialect.RESPONSES, {}, "input"),
        (ChatDialect.RESPONSES, {"input": []}, "input"),
        (ChatDialect.RESPONSES, {"input": 3}, "input"),
        (ChatDialect.RESPONSES, {"instructions": ["x"], "input": "hi"}, "instructions"),
        (ChatDialect.RESPONSES, {"input": ["hi"]}, "input[0]"),
        (ChatDialect.RESPONSES, {"input": [{"content": "hi"}]}, "input[0].type"),
        (
            ChatDialect.RESPONSES,
            {"input": [{"type": "message", "role": "tool", "content": "x"}]},
            "input[0].role",
        ),
        (
            ChatDialect.RESPONSES,
            {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
            "input[0].content[0].text",
        ),
        (
            ChatDialect.RESPONSES,
            {
                "input": [
                    {"role": "user", "content": "x"},
                    {"type": "function_call", "call_id": "c"},
                ]
            },
            "input[1].name",
        ),
        (
            ChatDialect.RESPONSES,
            {"input": [{"type": "function_call_output", "call_id": "c", "output": {"a": 1}}]},
            "input[0].output",
        ),
        # Nothing a router can read: no user text, only system turns, tool traffic or images.
        (ChatDialect.OPENAI, {"messages": [{"role": "system", "content": "x"}]}, "messages"),
        (ChatDialect.OPENAI, {"messages": [{"role": "user", "content": "  "}]}, "messages"),
        (ChatDialect.OPENAI, {"messages": [{"role": "user", "content": [IMAGE_URL]}]}, "messages"),
        (ChatDialect.OPENAI, _ONLY_TOOLS_OPENAI, "messages"),
        (ChatDialect.ANTHROPIC, _ONLY_TOOLS_ANTHROPIC, "messages"),
        (ChatDialect.RESPONSES, _ONLY_TOOLS_RESPONSES, "input"),
        (ChatDialect.RESPONSES, {"instructions": "x", "input": ""}, "input"),
    ],
)
def test_bad_bodies_name_the_field(dialect: ChatDialect, body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_chat(dialect, body)
    assert info.value.field == field


def test_no_user_text_is_said_plainly() -> None:
    with pytest.raises(InvalidArgument, match="no user message with text to route on"):
        parse_chat(ChatDialect.ANTHROPIC, _ONLY_TOOLS_ANTHROPIC)


# -- the ext_proc: section ----------------------------------------------------------------------


def test_ext_proc_section_through_the_config_loader() -> None:
    cfg = parse_config(
        two_route_config(ext_proc={"enabled": True, "model_header": "x-llm-model"}), Path("c.yaml")
    )
    assert cfg.ext_proc.enabled
    assert cfg.ext_proc.model_header == "x-llm-model"
    assert cfg.ext_proc.failure_mode == "open"  # a router problem must not block LLM calls
    assert cfg.ext_proc.responses_paths == ("/v1/responses",)
    assert cfg.ext_proc.session_header == "x-session-id"


def test_every_path_list_is_served() -> None:
    settings = ExtProcSettings(
        openai_paths=("/openai/v1/chat/completions",),
        anthropic_paths=("/anthropic/v1/messages",),
        responses_paths=("/openai/v1/responses", "/v1/responses"),
    )
    assert settings.responses_paths == ("/openai/v1/responses", "/v1/responses")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"failure_mode": "maybe"}, "ext_proc.failure_mode"),
        ({"model_header": "X Router"}, "ext_proc.model_header: must be a lowercase"),
        ({"session_header": "X-Session-Id"}, "ext_proc.session_header: must be a lowercase"),
        ({"max_body_bytes": 0}, "ext_proc.max_body_bytes"),
        ({"openai_paths": ["v1/chat"]}, "ext_proc.openai_paths"),
        ({"responses_paths": ["/v1/responses?x=1"]}, "ext_proc.responses_paths"),
        ({"rewrite_modle": True}, "ext_proc.rewrite_modle"),
        ({"route_header": "x-router-model"}, "four different header names"),
        ({"session_header": "x-router-route"}, "is one of the router's own headers"),
        (
            {"openai_paths": ["/v1/chat"], "anthropic_paths": ["/v1/chat"]},
            "'/v1/chat' listed as both openai_paths and anthropic_paths",
        ),
        (
            {"responses_paths": ["/v1/chat/completions"]},
            "'/v1/chat/completions' listed as both openai_paths and responses_paths",
        ),
        (
            {"anthropic_paths": ["/v1/responses"]},
            "'/v1/responses' listed as both anthropic_paths and responses_paths",
        ),
    ],
)
def test_bad_ext_proc_settings_are_named(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(two_route_config(ext_proc=section), Path("c.yaml"))
    assert message in str(info.value)
