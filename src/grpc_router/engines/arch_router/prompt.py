"""Arch-Router's prompt, rendered byte for byte as the model was trained, and tokenized.

The prompt contract (docs/arch-router.md; a test fixture holds it): two constants filled with
`json.dumps` (Python defaults) of the routes and the conversation, sent as ONE user message
through the checkpoint's own chat template. The chat template is rendered the way transformers
renders it (sandboxed Jinja, trim_blocks, lstrip_blocks, its `tojson`), so no transformers is
needed at serve time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer  # type: ignore[import-untyped]

from grpc_router.errors import ArtifactError, InvalidArgument
from grpc_router.types import OTHER_ROUTE, Message, Role, RouteSpec, route_set_key

TASK_INSTRUCTION = (
    "\nYou are a helpful assistant designed to find the best suited route.\n"
    "You are provided with route description within <routes></routes> XML tags:\n"
    "<routes>\n\n{routes}\n\n</routes>\n\n<conversation>\n\n{conversation}\n\n</conversation>\n"
)
FORMAT_PROMPT = (
    "\nYour task is to decide which route is best suit with user intent on the conversation in "
    "<conversation></conversation> XML tags.  Follow the instruction:\n"
    "1. If the latest intent from user is irrelevant or user intent is full filled, response "
    'with other route {"route": "other"}.\n'
    "2. You must analyze the route descriptions and find the best match route for user latest "
    "intent. \n"
    "3. You only response the name of the route that best matches the user's request, use the "
    "exact name in the <routes></routes>.\n\n"
    "Based on your analysis, provide your response in the following JSON formats if you decide "
    "to match any route:\n"
    '{"route": "route_name"} \n'
)
# The model was trained to start its answer with this; feeding it saves decode steps.
OUTPUT_PREFIX = '{"route": "'
# What follows a route name in the answer; its first token closes the name's token path.
OUTPUT_SUFFIX = '"}'
# The conversation JSON always starts like this (a non-empty list of role/content objects).
_CONVERSATION_START = '[{"role": "user", "content": "x"}]'
_KEPT_ROLES = (Role.USER, Role.ASSISTANT)


def routes_json(routes: Sequence[RouteSpec]) -> str:
    return json.dumps([{"name": r.name, "description": r.description} for r in routes])


def conversation_dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    """User and assistant turns with content; system, developer, tool and empty ones dropped."""
    return [
        {"role": str(m.role), "content": m.content}
        for m in messages
        if m.role in _KEPT_ROLES and m.content != ""
    ]


def user_prompt(routes: Sequence[RouteSpec], conversation: list[dict[str, str]]) -> str:
    """The single user message Arch-Router was trained on."""
    return (
        TASK_INSTRUCTION.format(routes=routes_json(routes), conversation=json.dumps(conversation))
        + FORMAT_PROMPT
    )


class ChatTemplate:
    """A Hugging Face chat template rendered like transformers' apply_chat_template."""

    def __init__(self, source: str, special_tokens: dict[str, Any] | None = None) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(source)
        self._special = dict(special_tokens or {})

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        return self._template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self._special,
        )


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers overrides Jinja's tojson, which would HTML-escape.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@dataclass(frozen=True, slots=True)
class RoutePrefix:
    """The constant head of the prompt for one route set: its KV can be computed once."""

    key: str
    text: str
    ids: tuple[int, ...]
    """Tokens that every prompt with this route set starts with (boundary checked)."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """A tokenized routing prompt, ending with OUTPUT_PREFIX."""

    text: str
    ids: tuple[int, ...]
    prefix: RoutePrefix
    prefix_len: int
    """How many leading ids equal `prefix.ids` (0 when the boundary moved: no cache use)."""
    dropped_turns: int
    truncated: bool
    """True when the latest user turn alone exceeded the budget and its start was cut."""


class PromptBuilder:
    """Renders, trims and tokenizes Arch-Router prompts with an artifact's tokenizer."""

    def __init__(self, tokenizer: Tokenizer, chat_template: ChatTemplate) -> None:
        self.tokenizer = tokenizer
        self.template = chat_template
        self._output_prefix_ids = self._encode(OUTPUT_PREFIX)
        self._prefixes: dict[str, RoutePrefix] = {}

    @classmethod
    def from_dir(cls, directory: Path) -> PromptBuilder:
        """Load tokenizer.json and the chat template (tokenizer_config.json or .jinja file)."""
        tok_file = directory / "tokenizer.json"
        cfg_file = directory / "tokenizer_config.json"
        if not tok_file.is_file() or not cfg_file.is_file():
            raise ArtifactError(
                f"{directory}: tokenizer.json and tokenizer_config.json are required; "
                "re-run `make export` to rebuild the artifact"
            )
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        source = cfg.get("chat_template")
        jinja_file = directory / "chat_template.jinja"
        if source is None and jinja_file.is_file():
            source = jinja_file.read_text(encoding="utf-8")
        if not isinstance(source, str):
            raise ArtifactError(
                f"{directory}: no chat_template in tokenizer_config.json or chat_template.jinja"
            )
        special = {
            k: v
            for k, v in cfg.items()
            if k.endswith("_token") and (v is None or isinstance(v, str))
        }
        special["additional_special_tokens"] = cfg.get("additional_special_tokens", [])
        return cls(Tokenizer.from_file(str(tok_file)), ChatTemplate(source, special))

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def render(self, routes: Sequence[RouteSpec], conversation: list[dict[str, str]]) -> str:
        """The full prompt text, generation prompt and OUTPUT_PREFIX included."""
        content = user_prompt(routes, conversation)
        chat = [{"role": "user", "content": content}]
        return self.template.render(chat, add_generation_prompt=True) + OUTPUT_PREFIX

    def route_prefix(self, routes: Sequence[RouteSpec]) -> RoutePrefix:
        key = route_set_key(routes)
        found = self._prefixes.get(key)
        if found is not None:
            return found
        sentinel = "\x00CONVERSATION\x00"
        text = self.render(routes, [{"role": "user", "content": sentinel}])
        head = text[: text.index(json.dumps([{"role": "user", "content": sentinel}]))]
        head_ids = self._encode(head)
        probe_ids = self._encode(head + _CONVERSATION_START)
        # BPE may merge across the boundary: keep only tokens stable under any continuation.
        n = 0
        while n < len(head_ids) and n < len(probe_ids) and head_ids[n] == probe_ids[n]:
            n += 1
        prefix = RoutePrefix(key=key, text=head, ids=head_ids[:n])
        if len(self._prefixes) >= 256:
            self._prefixes.pop(next(iter(self._prefixes)))
        self._prefixes[key] = prefix
        return prefix

    def build(
        self, messages: Sequence[Message], routes: Sequence[RouteSpec], budget: int
    ) -> Prompt:
        """Render and tokenize, keeping the newest turns within `budget` tokens.

        Older turns go first; the latest user turn is never dropped. When it alone is over the
        budget, its oldest text is cut (the end of a message is closest to the intent).
        """
        conversation = conversation_dicts(messages)
        last_user = max(
            (i for i, m in enumerate(conversation) if m["role"] == Role.USER), default=-1
        )
        if last_user < 0:
            raise InvalidArgument("messages", "needs at least one non-empty user message")
        prefix = self.route_prefix(routes)

        def encode(conv: list[dict[str, str]]) -> tuple[str, tuple[int, ...]]:
            text = self.render(routes, conv)
            return text, self._encode(text)

        text, ids = encode(conversation)
        dropped, truncated = 0, False
        if len(ids) > budget:
            # Smallest start index that fits, searched over [0, last_user]: fewer turns, fewer
            # tokens, so the predicate is monotone.
            lo, hi = 1, last_user
            best: tuple[int, str, tuple[int, ...]] | None = None
            while lo <= hi:
                mid = (lo + hi) // 2
                t, i = encode(conversation[mid:])
                if len(i) <= budget:
                    best, hi = (mid, t, i), mid - 1
                else:
                    lo = mid + 1
            if best is not None:
                dropped, text, ids = best
            else:
                dropped = len(conversation) - 1
                text, ids, truncated = self._truncate(routes, conversation[last_user], budget)
        n = len(prefix.ids)
        prefix_len = n if ids[:n] == prefix.ids else 0
        return Prompt(text, ids, prefix, prefix_len, dropped, truncated)

    def _truncate(
        self, routes: Sequence[RouteSpec], turn: dict[str, str], budget: int
    ) -> tuple[str, tuple[int, ...], bool]:
        content = turn["content"]
        enc = self.tokenizer.encode(content, add_special_tokens=False)
        offsets = [start for start, _ in enc.offsets]
        cut = 0
        while True:
            kept = content[offsets[cut] :] if cut < len(offsets) else ""
            text = self.render(routes, [{"role": "user", "content": kept}])
            ids = self._encode(text)
            if len(ids) <= budget:
                return text, ids, True
            if cut >= len(offsets):
                raise InvalidArgument(
                    "routes",
                    f"the route descriptions alone take {len(ids)} tokens, over the prompt "
                    f"budget of {budget}; shorten them or raise prompt_token_budget",
                )
            cut = min(len(offsets), cut + max(1, len(ids) - budget))

    def route_paths(self, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
        """Token path of each answer name, as tokenized after OUTPUT_PREFIX, ending with the
        token that holds the closing quote (so that "bus" is not favoured over "buses")."""
        paths: dict[str, tuple[int, ...]] = {}
        start = len(OUTPUT_PREFIX)
        for name in names:
            escaped = json.dumps(name)[1:-1]
            enc = self.tokenizer.encode(
                OUTPUT_PREFIX + escaped + OUTPUT_SUFFIX, add_special_tokens=False
            )
            ids, offsets = list(enc.ids), enc.offsets
            k = len(self._output_prefix_ids)
            if tuple(ids[:k]) == self._output_prefix_ids:
                end = start + len(escaped)  # index of the closing quote
                path = [t for t, (s, _) in zip(ids[k:], offsets[k:], strict=True) if s <= end]
            else:
                # The name merges with the quote before it; use its standalone tokens.
                path = list(self._encode(escaped + OUTPUT_SUFFIX[0]))
            paths[name] = tuple(path)
        return paths


def answer_names(routes: Sequence[RouteSpec]) -> list[str]:
    """Route names the model may answer, plus OTHER_ROUTE, validated."""
    names = [r.name for r in routes]
    if not names:
        raise InvalidArgument("routes", "at least one route is required")
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not name:
            raise InvalidArgument(f"routes[{i}].name", "must not be empty")
        if name == OTHER_ROUTE:
            raise InvalidArgument(f"routes[{i}].name", f"{OTHER_ROUTE!r} is reserved")
        if name in seen:
            raise InvalidArgument(f"routes[{i}].name", f"duplicate route name {name!r}")
        seen.add(name)
    return [*names, OTHER_ROUTE]
