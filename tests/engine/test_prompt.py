"""Prompt rendering, tokenization and trimming against transformers' own chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from grpc_router.engines.arch_router.prompt import (
    OUTPUT_PREFIX,
    PromptBuilder,
    answer_names,
    conversation_dicts,
    user_prompt,
)
from grpc_router.errors import InvalidArgument
from grpc_router.types import Message, Role, RouteSpec, route_set_key

ROUTES = [
    RouteSpec("code_generation", "Writing or fixing code in any programming language."),
    RouteSpec("Buses", "Book bus journeys; find a bus between two cities."),
    RouteSpec("café_ünïcode", "Routes with non-ASCII names: 日本語 and emoji 🎉."),
    RouteSpec("weather", 'Forecasts, "quoted" words and a back\\slash.'),
]
CONVERSATIONS = [
    [Message(Role.USER, "Write a Python function that reverses a list.")],
    [
        Message(Role.SYSTEM, "You are a router."),
        Message(Role.USER, "Héllo! Ünïcode, 日本語, emoji 🎉 and a tab\there."),
        Message(Role.ASSISTANT, ""),
        Message(Role.ASSISTANT, "Sure, what do you need?"),
        Message(Role.TOOL, '{"result": 1}'),
        Message(Role.DEVELOPER, "ignored"),
        Message(Role.USER, "I need a bus to Fresno on Saturday.\nFour people."),
    ],
    [Message(Role.USER, "   "), Message(Role.ASSISTANT, "x"), Message(Role.USER, "weather?")],
]
# The prompt contract (from Arch-Router-1.5B's model card) as fixed examples; see its "about".
CONTRACT: dict[str, Any] = json.loads(
    (
        Path(__file__).resolve().parents[1] / "fixtures" / "data" / "arch_router_prompt.json"
    ).read_text(encoding="utf-8")
)


def _reference(tokenizer_dir: Path, messages: list[Message]) -> tuple[str, list[int]]:
    """transformers' rendering and token ids of the Arch-Router prompt (the ground truth)."""
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    conversation = [
        {"role": str(m.role), "content": m.content}
        for m in messages
        if m.role in (Role.USER, Role.ASSISTANT) and m.content
    ]
    content = user_prompt(ROUTES, conversation)
    text = hf.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    ids = hf.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=True, add_generation_prompt=True
    )
    return text, list(ids)


@pytest.fixture(scope="module", params=["tiny-bpe", "qwen2.5"])
def tokenizer_dir(
    request: pytest.FixtureRequest, tiny_checkpoint: Path, qwen_tokenizer_dir: Path
) -> Path:
    return tiny_checkpoint if request.param == "tiny-bpe" else qwen_tokenizer_dir


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_text_and_ids_equal_transformers(tokenizer_dir: Path, case: int) -> None:
    messages = CONVERSATIONS[case]
    builder = PromptBuilder.from_dir(tokenizer_dir)
    prompt = builder.build(messages, ROUTES, budget=4096)
    ref_text, ref_ids = _reference(tokenizer_dir, messages)
    assert prompt.text == ref_text + OUTPUT_PREFIX
    # The answer prefix is tokenized with the prompt; without it the ids must be transformers'.
    n = len(builder.tokenizer.encode(OUTPUT_PREFIX, add_special_tokens=False).ids)
    assert list(prompt.ids[:-n]) == ref_ids
    assert list(prompt.ids) == builder.tokenizer.encode(prompt.text, add_special_tokens=False).ids
    assert prompt.dropped_turns == 0 and not prompt.truncated


def _text(lines: list[str]) -> str:
    return "\n".join(lines)


@pytest.mark.parametrize("case", range(len(CONTRACT["cases"])))
def test_user_prompt_matches_the_contract_byte_for_byte(case: int) -> None:
    """The assembled user message against tests/fixtures/data/arch_router_prompt.json."""
    fixture = CONTRACT["cases"][case]
    routes = [RouteSpec(r["name"], r["description"]) for r in fixture["routes"]]
    conversation = conversation_dicts(
        [Message(Role(m["role"]), m["content"]) for m in fixture["messages"]]
    )
    assert conversation == fixture["conversation"]
    expected = _text(fixture["user_prompt"])
    # The fixture agrees with its own template text, filled as the model card says.
    filled = _text(CONTRACT["task_instruction"]).format(
        routes=json.dumps(fixture["routes"]), conversation=json.dumps(conversation)
    )
    assert expected == filled + _text(CONTRACT["format_prompt"])
    assert user_prompt(routes, conversation) == expected
    assert expected.isascii()  # json.dumps defaults: ensure_ascii


def test_contract_keeps_its_odd_spacing() -> None:
    """The trained prompt's quirks that an editor or a linter would "fix" in the fixture."""
    fmt = _text(CONTRACT["format_prompt"])
    assert "XML tags.  Follow" in fmt
    assert "user latest intent. \n" in fmt and '{"route": "route_name"} \n' in fmt
    task = _text(CONTRACT["task_instruction"])
    assert task.startswith("\nYou are") and "<routes>\n\n{routes}\n\n</routes>" in task


def test_qwen_chat_rendering_matches_the_contract(qwen_tokenizer_dir: Path) -> None:
    """The whole prompt under Qwen2.5's own chat template (default system prompt, generation
    prompt), then the answer prefix."""
    builder = PromptBuilder.from_dir(qwen_tokenizer_dir)
    cases = [c for c in CONTRACT["cases"] if "qwen2_5_chat" in c]
    assert cases
    for fixture in cases:
        routes = [RouteSpec(r["name"], r["description"]) for r in fixture["routes"]]
        rendered = builder.render(routes, fixture["conversation"])
        assert rendered == _text(fixture["qwen2_5_chat"]) + OUTPUT_PREFIX


def test_dropped_messages() -> None:
    conv = conversation_dicts(CONVERSATIONS[1])
    assert [m["role"] for m in conv] == ["user", "assistant", "user"]


def test_trimming_keeps_newest_turns(qwen_tokenizer_dir: Path) -> None:
    builder = PromptBuilder.from_dir(qwen_tokenizer_dir)
    turns = [
        Message(Role.USER if i % 2 == 0 else Role.ASSISTANT, f"turn {i}: " + "words " * 60)
        for i in range(21)
    ]
    full = builder.build(turns, ROUTES, budget=100_000)
    budget = len(full.ids) - 200
    trimmed = builder.build(turns, ROUTES, budget=budget)
    assert len(trimmed.ids) <= budget
    assert trimmed.dropped_turns > 0
    kept = conversation_dicts(turns)[trimmed.dropped_turns :]
    assert trimmed.text == builder.render(ROUTES, kept)
    # Newest turns kept, and as many as fit: one more older turn would exceed the budget.
    more = conversation_dicts(turns)[trimmed.dropped_turns - 1 :]
    assert len(builder.tokenizer.encode(builder.render(ROUTES, more)).ids) > budget
    assert "turn 20:" in trimmed.text


def test_latest_user_turn_is_truncated_not_dropped(qwen_tokenizer_dir: Path) -> None:
    builder = PromptBuilder.from_dir(qwen_tokenizer_dir)
    turns = [
        Message(Role.USER, "old question"),
        Message(Role.ASSISTANT, "old answer"),
        Message(Role.USER, "START " + "blah " * 3000 + "please book a bus END"),
    ]
    prompt = builder.build(turns, ROUTES, budget=1024)
    assert len(prompt.ids) <= 1024
    assert prompt.truncated and prompt.dropped_turns == 2
    # The end of the message (closest to the intent) survives, its start is cut.
    assert "please book a bus END" in prompt.text and "START" not in prompt.text


def test_route_set_too_long_for_budget(qwen_tokenizer_dir: Path) -> None:
    builder = PromptBuilder.from_dir(qwen_tokenizer_dir)
    routes = [RouteSpec(f"r{i}", "long description " * 50) for i in range(10)]
    with pytest.raises(InvalidArgument) as err:
        builder.build([Message(Role.USER, "hi")], routes, budget=512)
    assert err.value.field == "routes"


def test_prefix_is_a_token_prefix(tokenizer_dir: Path) -> None:
    builder = PromptBuilder.from_dir(tokenizer_dir)
    for messages in CONVERSATIONS:
        prompt = builder.build(messages, ROUTES, budget=4096)
        assert prompt.prefix_len == len(prompt.prefix.ids) > 0
        assert prompt.ids[: prompt.prefix_len] == prompt.prefix.ids
        assert prompt.text.startswith(prompt.prefix.text)
        assert prompt.prefix.text.endswith("<conversation>\n\n")


def test_no_user_message_is_invalid(qwen_tokenizer_dir: Path) -> None:
    builder = PromptBuilder.from_dir(qwen_tokenizer_dir)
    with pytest.raises(InvalidArgument) as err:
        builder.build([Message(Role.ASSISTANT, "hi"), Message(Role.USER, "")], ROUTES, 2048)
    assert err.value.field == "messages"


@pytest.mark.parametrize(
    ("names", "field"),
    [([], "routes"), (["a", "a"], "routes[1].name"), (["other"], "routes[0].name"),
     ([""], "routes[0].name")],
)  # fmt: skip
def test_bad_route_sets(names: list[str], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        answer_names([RouteSpec(n, "d") for n in names])
    assert err.value.field == field


def test_route_paths_are_in_context_tokens(qwen_tokenizer_dir: Path) -> None:
    builder = PromptBuilder.from_dir(qwen_tokenizer_dir)
    tok = builder.tokenizer
    paths = builder.route_paths(["Buses", "Bus", "other", "code_generation"])
    for name, path in paths.items():
        answer = tok.encode(OUTPUT_PREFIX + name + '"}', add_special_tokens=False).ids
        prefix = tok.encode(OUTPUT_PREFIX, add_special_tokens=False).ids
        # The path is the answer's own tokens after the prefix, through the closing quote.
        assert list(path) == answer[len(prefix) : len(prefix) + len(path)]
        assert '"' in tok.decode([path[-1]])
    assert paths["Bus"] != paths["Buses"][: len(paths["Bus"])]


def test_route_set_key_follows_content_not_objects() -> None:
    """The key is remembered per route set; equal routes built anew share it, and any change
    of name, description, examples or order gives another."""
    rebuilt = [RouteSpec(r.name, r.description, r.examples) for r in ROUTES]
    assert route_set_key(rebuilt) == route_set_key(ROUTES) == route_set_key(tuple(ROUTES))
    changed = [
        [RouteSpec("other_name", ROUTES[0].description), *ROUTES[1:]],
        [RouteSpec(ROUTES[0].name, "Another description."), *ROUTES[1:]],
        [RouteSpec(ROUTES[0].name, ROUTES[0].description, ("an example",)), *ROUTES[1:]],
        list(reversed(ROUTES)),
    ]
    keys = {route_set_key(c) for c in changed} | {route_set_key(ROUTES)}
    assert len(keys) == len(changed) + 1
