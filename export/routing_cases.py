"""The routing prompts the export's parity check runs, rendered the way the server renders them.

The prompt text and its assembly are the server's own (`grpc_router.engines.arch_router.prompt`,
held to the model's prompt contract by tests/fixtures/data), so that the parity check measures
the exported graph on exactly what it will be asked at serve time. What lives here is
export-only: a fixed set of route sets and conversations, and the chat message list that the
checkpoint's chat template turns into token ids on the PyTorch side.
"""

from __future__ import annotations

from dataclasses import dataclass

from grpc_router.engines.arch_router.prompt import conversation_dicts, user_prompt
from grpc_router.types import Message, Role, RouteSpec


@dataclass(frozen=True)
class RoutingCase:
    """One route set and one conversation, as a caller of the router would send them."""

    routes: tuple[RouteSpec, ...]
    messages: tuple[Message, ...]

    def user_prompt(self) -> str:
        """The single user message Arch-Router was trained on."""
        return user_prompt(self.routes, conversation_dicts(self.messages))

    def chat_messages(self) -> list[dict[str, str]]:
        """What goes through the checkpoint's chat template (add_generation_prompt=True)."""
        return [{"role": "user", "content": self.user_prompt()}]


_ROUTES = (
    RouteSpec("code_generation", "Writing new code, functions or scripts."),
    RouteSpec("bug_fixing", "Finding and fixing errors in existing code."),
    RouteSpec("travel_booking", "Booking flights, hotels and trains."),
    RouteSpec("small_talk", "Greetings and casual conversation."),
)

ROUTING_CASES: tuple[RoutingCase, ...] = (
    RoutingCase(
        _ROUTES,
        (Message(Role.USER, "Write a Python function that reverses a linked list."),),
    ),
    RoutingCase(
        _ROUTES,
        (
            Message(Role.USER, "My script crashes with KeyError: 'id'."),
            Message(Role.ASSISTANT, "Can you show the line that fails?"),
            Message(Role.USER, "It is data['id'] inside the loop over the rows."),
        ),
    ),
    RoutingCase(
        _ROUTES[2:],
        (Message(Role.USER, "Book me a train from Lyon to Paris on Friday morning."),),
    ),
    RoutingCase(
        _ROUTES,
        (
            Message(Role.SYSTEM, "You are terse."),
            Message(Role.USER, "hi there, how's your day going? ünïcödé ☕"),
        ),
    ),
)
"""A fixed set of routing prompts: one turn, several turns, a subset of the routes, and a system
turn (dropped by the prompt) with non-ASCII text."""
