"""Arch-Router's prompt, rendered as ../shared/arch-router/PROMPT.md specifies (export-side copy
for the parity check and the tiny tokenizer's corpus; the server has its own)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TASK_INSTRUCTION = """
You are a helpful assistant designed to find the best suited route.
You are provided with route description within <routes></routes> XML tags:
<routes>
\n{routes}\n
</routes>

<conversation>
\n{conversation}\n
</conversation>
"""

FORMAT_PROMPT = """
Your task is to decide which route is best suit with user intent on the conversation in <conversation></conversation> XML tags.  Follow the instruction:
1. If the latest intent from user is irrelevant or user intent is full filled, response with other route {"route": "other"}.
2. You must analyze the route descriptions and find the best match route for user latest intent. 
3. You only response the name of the route that best matches the user's request, use the exact name in the <routes></routes>.

Based on your analysis, provide your response in the following JSON formats if you decide to match any route:
{"route": "route_name"} 
"""  # noqa: E501, W291


def render_user_prompt(
    routes: Sequence[dict[str, str]], conversation: Sequence[dict[str, str]]
) -> str:
    """The single user message Arch-Router was trained on."""
    kept = [
        {"role": m["role"], "content": m["content"]}
        for m in conversation
        if m["role"] in ("user", "assistant") and m["content"]
    ]
    routes_json = json.dumps([{"name": r["name"], "description": r["description"]} for r in routes])
    task = TASK_INSTRUCTION.format(routes=routes_json, conversation=json.dumps(kept))
    return task + FORMAT_PROMPT


def chat_messages(
    routes: Sequence[dict[str, str]], conversation: Sequence[dict[str, str]]
) -> list[dict[str, Any]]:
    """What goes through the checkpoint's chat template (add_generation_prompt=True)."""
    return [{"role": "user", "content": render_user_prompt(routes, conversation)}]


@dataclass(frozen=True)
class RoutingCase:
    routes: tuple[dict[str, str], ...]
    conversation: tuple[dict[str, str], ...]


_ROUTES = (
    {"name": "code_generation", "description": "Writing new code, functions or scripts."},
    {"name": "bug_fixing", "description": "Finding and fixing errors in existing code."},
    {"name": "travel_booking", "description": "Booking flights, hotels and trains."},
    {"name": "small_talk", "description": "Greetings and casual conversation."},
)

# A fixed set of routing prompts for the export-time parity check.
ROUTING_CASES: tuple[RoutingCase, ...] = (
    RoutingCase(
        _ROUTES,
        ({"role": "user", "content": "Write a Python function that reverses a linked list."},),
    ),
    RoutingCase(
        _ROUTES,
        (
            {"role": "user", "content": "My script crashes with KeyError: 'id'."},
            {"role": "assistant", "content": "Can you show the line that fails?"},
            {"role": "user", "content": "It is data['id'] inside the loop over the rows."},
        ),
    ),
    RoutingCase(
        _ROUTES[2:],
        ({"role": "user", "content": "Book me a train from Lyon to Paris on Friday morning."},),
    ),
    RoutingCase(
        _ROUTES,
        (
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "hi there, how's your day going? ünïcödé ☕"},
        ),
    ),
)
