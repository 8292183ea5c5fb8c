"""Constrained decoding, scores and the prefix cache at the model level, on the tiny fixture."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from grpc_router.engines.arch_router.graph import ALIGN
from grpc_router.engines.arch_router.prefill import (
    Rows,
    extend,
    prompt_and_trie,
    prompt_rows,
    tail_logits,
)
from grpc_router.engines.arch_router.prompt import Prompt, PromptBuilder
from grpc_router.engines.arch_router.runtime import DecoderSession
from grpc_router.engines.arch_router.scoring import outcome_of
from grpc_router.engines.arch_router.trie import Trie
from grpc_router.errors import InvalidArgument
from grpc_router.types import Message, Role, RouteSpec
from tests.fixtures.oracle import score_by_rows, scoring_rows, stepwise_greedy

CPU_VARIANTS = ("fp32", "int4", "int8")
ROUTES = [
    RouteSpec("code_generation", "Writing or fixing code."),
    RouteSpec("Buses", "Book bus journeys between cities."),
    RouteSpec("weather", "Weather forecasts."),
]
MESSAGES = [
    Message(Role.USER, "Can you get me a bus ticket?"),
    Message(Role.ASSISTANT, "How many do you need?"),
    Message(Role.USER, "Four, to Fresno on Saturday morning."),
]


TRIE_PATHS = {
    "a": (7, 9, 11, 3),
    "b": (7, 9, 12, 3),
    "c": (7, 13, 3),
    "d": (8, 3),
    "e": (14, 15, 16, 17, 3),
}


def _setup(artifacts: Path, variant: str) -> tuple[DecoderSession, PromptBuilder, Prompt]:
    session = DecoderSession(artifacts / variant / "model.onnx", provider="cpu")
    builder = PromptBuilder.from_dir(artifacts / variant)
    return session, builder, builder.build(MESSAGES, ROUTES, budget=2048)


def packed_trie_logits(
    session: DecoderSession, trie: Trie, prompt: Rows, root_logits: np.ndarray
) -> dict[int, np.ndarray]:
    """Every internal node's logits from one run after the prompt's KV."""
    return tail_logits(session, trie.tail(full=True), prompt, root_logits)


def _full(session: DecoderSession, ids: tuple[int, ...]) -> tuple[np.ndarray, Rows]:
    root, rows = prompt_rows(session, session.empty_past(1), 0, [ids])
    return root[0], rows[0]


def _plain_greedy(session: DecoderSession, ids: tuple[int, ...], steps: int) -> list[int]:
    """Unconstrained greedy decoding, one token per run (the reference callers' loop)."""
    n = len(ids)
    out = session.run(
        np.asarray([ids]), np.ones((1, n), np.int64), np.arange(n)[None], session.empty_past(1)
    )
    tokens: list[int] = []
    for _ in range(steps):
        tok = int(np.argmax(out.logits[0, -1]))
        tokens.append(tok)
        n += 1
        out = session.run(
            np.asarray([[tok]]), np.ones((1, n), np.int64), np.asarray([[n - 1]]), out.present
        )
    return tokens


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_constrained_equals_plain_greedy(tiny_artifacts: Path, variant: str) -> None:
    session, _, prompt = _setup(tiny_artifacts, variant)
    g = _plain_greedy(session, prompt.ids, 4)
    vocab = session.vocab
    other = [t for t in range(5, vocab) if t not in g][:3]
    # Route "target" is what the model emits greedily; "decoy" shares its first two tokens, so
    # the decode must pass two branching nodes before the route is unique.
    paths = {
        "target": (g[0], g[1], g[2], g[3]),
        "decoy": (g[0], g[1], other[0], g[3]),
        "sibling": (g[0], other[1]),
        "far": (other[2], g[1]),
        "other": (other[0], other[1]),
    }
    trie = Trie(paths)
    root, rows = _full(session, prompt.ids)
    outcome, runs = stepwise_greedy(session, trie, rows, root)
    assert outcome.route == "target"
    assert runs == 2  # after g0 (two children) and after g1 (two children); unique after g2
    scored, _ = score_by_rows(session, trie, rows, root)
    assert scored.route == "target"


def _assert_path_logits(
    session: DecoderSession, trie: Trie, prompt: Rows, nodes: dict[int, np.ndarray]
) -> None:
    """Each node's logits are those of its own path fed after a copy of the prompt's KV."""
    for seq in scoring_rows(trie):
        logits, _ = extend(session, prompt, [seq])
        at = 0
        for d, tok in enumerate(seq):
            at = trie.descend(at, tok)
            np.testing.assert_allclose(nodes[at], logits[0][d], rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_packed_trie_equals_one_row_per_continuation(tiny_artifacts: Path, variant: str) -> None:
    """The whole trie in one sequence (tree mask) gives each node the logits it gets when its
    path is fed on its own after a copy of the prompt's KV."""
    session, _, prompt = _setup(tiny_artifacts, variant)
    paths = TRIE_PATHS
    trie = Trie(paths)
    root, rows = _full(session, prompt.ids)  # the graph computed the last position only
    n = len(prompt.ids)
    every = session.run(
        np.asarray([prompt.ids]), np.ones((1, n), np.int64), np.arange(n)[None],
        session.empty_past(1),
    )  # fmt: skip
    assert every.logits.shape[1] == n
    if variant == "int4":  # not exact: padding to ALIGN moves its last bits
        np.testing.assert_allclose(root, every.logits[0, -1], rtol=0, atol=1e-4)
    else:
        assert np.array_equal(root, every.logits[0, -1])
    packed = packed_trie_logits(session, trie, rows, root)
    internal = [i for i, n in enumerate(trie.nodes) if n.children]
    assert sorted(packed) == internal
    _assert_path_logits(session, trie, rows, packed)
    by_rows, runs = score_by_rows(session, trie, rows, root, rows_per_run=2)
    by_tree = outcome_of(trie, packed, full=True)
    # 5 rows, 2 a run; a graph with fused attention (int8) takes one row a run after a past
    assert runs == (5 if session.one_row_prefill else 3)
    assert session.one_row_prefill == (variant == "int8")
    assert by_tree.route == by_rows.route
    for name in paths:
        assert by_tree.scores[name] == pytest.approx(by_rows.scores[name], rel=1e-4)


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_scores_are_normalised_path_probabilities(tiny_artifacts: Path, variant: str) -> None:
    session, builder, prompt = _setup(tiny_artifacts, variant)
    names = [r.name for r in ROUTES] + ["other"]
    paths = builder.route_paths(names)
    trie = Trie(paths)
    root, rows = _full(session, prompt.ids)
    outcome = outcome_of(trie, packed_trie_logits(session, trie, rows, root), full=True)
    assert set(outcome.scores) == set(names)
    assert math.isclose(sum(outcome.scores.values()), 1.0, rel_tol=1e-9)
    assert outcome.confidence == outcome.scores[outcome.route]
    # Reference: each path's token probabilities computed one run per token, then normalised.
    logp = {}
    for name, path in paths.items():
        total, ids = 0.0, list(prompt.ids)
        for tok in path:
            n = len(ids)
            out = session.run(
                np.asarray([ids]), np.ones((1, n), np.int64), np.arange(n)[None],
                session.empty_past(1),
            )  # fmt: skip
            row = out.logits[0, -1].astype(np.float64)
            total += row[tok] - (row.max() + math.log(np.exp(row - row.max()).sum()))
            ids.append(tok)
        logp[name] = total
    norm = sum(math.exp(v) for v in logp.values())
    for name in names:
        assert outcome.scores[name] == pytest.approx(math.exp(logp[name]) / norm, rel=1e-4)
    # Without full scores: the same route, confidence = P(decoded path until unique).
    decided, _ = stepwise_greedy(session, trie, rows, root)
    assert decided.route == outcome.route and decided.scores == {}
    assert 0.0 < decided.confidence <= 1.0


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_prefix_cache_equals_full_prefill(tiny_artifacts: Path, variant: str) -> None:
    session, _, prompt = _setup(tiny_artifacts, variant)
    full_root, _ = _full(session, prompt.ids)
    end = len(prompt.prefix.ids)
    assert prompt.ids[:end] == prompt.prefix.ids and end % ALIGN
    # Exact variants: the prefix's own end, and every cut before it; int4: aligned cuts (its
    # kernel tiles rows by how many there are, so the engine cuts its prefixes there).
    cuts = [end // ALIGN * ALIGN] if variant == "int4" else range(end - ALIGN, end + 1)
    for n in cuts:
        out = session.run(
            np.asarray([prompt.ids[:n]]), np.ones((1, n), np.int64), np.arange(n)[None],
            session.empty_past(1),
        )  # fmt: skip
        cached_root, _ = prompt_rows(session, out.present, n, [prompt.ids[n:]])
        assert np.array_equal(cached_root[0], full_root), n  # bit-identical


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_batched_prefill_equals_alone(tiny_artifacts: Path, variant: str) -> None:
    session, builder, prompt = _setup(tiny_artifacts, variant)
    others = [
        builder.build([Message(Role.USER, "weather in Paris tomorrow?")], ROUTES, 2048),
        builder.build([*MESSAGES, Message(Role.USER, "and back on Monday " * 9)], ROUTES, 2048),
    ]
    prompts = [prompt, *others]
    alone = [_full(session, p.ids)[0] for p in prompts]
    batched, rows = prompt_rows(session, session.empty_past(3), 0, [p.ids for p in prompts])
    for a, b, r, p in zip(alone, batched, rows, prompts, strict=True):
        if variant == "int4":  # not exact: the rows a run holds move its last bits
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        else:
            assert np.array_equal(a, b)
        assert r.length == len(p.ids)


def _same(variant: str, a: np.ndarray, b: np.ndarray) -> None:
    if variant == "int4":  # not exact: the rows a run holds move its last bits
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    else:
        assert np.array_equal(a, b)


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_trie_in_the_prompts_run_equals_a_run_after_it(tiny_artifacts: Path, variant: str) -> None:
    """The trie fed after the prompt in its own prefill run gives the prompt's last token the
    prefill's logits and every node those of a trie run after the prompt's KV; so the decisions,
    full or greedy, are those of the runs one after another."""
    session, _, prompt = _setup(tiny_artifacts, variant)
    trie = Trie(TRIE_PATHS)
    root, rows = _full(session, prompt.ids)
    packed = packed_trie_logits(session, trie, rows, root)
    (nodes,), _ = prompt_and_trie(
        session, session.empty_past(1), 0, [prompt.ids], [trie.tail(full=True)]
    )
    assert sorted(nodes) == sorted(packed)
    _same(variant, nodes[0], root)
    for node, logits in packed.items():
        np.testing.assert_allclose(nodes[node], logits, rtol=0, atol=1e-4)
    by_runs, _ = score_by_rows(session, trie, rows, root)
    joined = outcome_of(trie, nodes, full=True)
    assert joined.route == by_runs.route
    for name in TRIE_PATHS:
        assert joined.scores[name] == pytest.approx(by_runs.scores[name], rel=1e-4)
    # Greedy needs only the nodes still shared by several routes: 7 and 7-9.
    (few,), _ = prompt_and_trie(
        session, session.empty_past(1), 0, [prompt.ids], [trie.tail(full=False)]
    )
    shared = {n for n, node in enumerate(trie.nodes) if len(node.routes) > 1}
    assert set(few) == shared and len(shared) == 3
    stepped, _ = stepwise_greedy(session, trie, rows, root)
    walked = outcome_of(trie, few, full=False)
    assert walked.route == stepped.route and walked.scores == {}
    assert walked.confidence == pytest.approx(stepped.confidence, rel=1e-4)


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_trie_in_the_prompts_run_does_not_depend_on_batch_cache_or_chunks(
    tiny_artifacts: Path, variant: str
) -> None:
    session, builder, prompt = _setup(tiny_artifacts, variant)
    prompts = [
        prompt,
        builder.build([Message(Role.USER, "weather in Paris tomorrow?")], ROUTES, 2048),
        builder.build([*MESSAGES, Message(Role.USER, "and back on Monday " * 9)], ROUTES, 2048),
    ]
    trie = Trie(TRIE_PATHS)
    tails = [trie.tail(full=True), trie.tail(full=False), trie.tail(full=True)]
    alone = [
        prompt_and_trie(session, session.empty_past(1), 0, [p.ids], [t])[0][0]
        for p, t in zip(prompts, tails, strict=True)
    ]
    ids = [p.ids for p in prompts]
    batched, _ = prompt_and_trie(session, session.empty_past(3), 0, ids, tails)
    # 16 tokens a row a run: rows go on after a finished row's trie widened the run
    chunked, _ = prompt_and_trie(session, session.empty_past(3), 0, ids, tails, chunk_tokens=48)
    n = len(prompt.prefix.ids) // ALIGN * ALIGN
    prefix = session.run(
        np.asarray([ids[0][:n]]), np.ones((1, n), np.int64), np.arange(n)[None],
        session.empty_past(1),
    )  # fmt: skip
    (cached,), _ = prompt_and_trie(session, prefix.present, n, [ids[0][n:]], tails[:1])
    # the whole prompt and its trie in one run without a past (the fused kernel ignores
    # position_ids there, so the engine splits such a run at an aligned boundary)
    one_run, _ = prompt_and_trie(
        session, session.empty_past(1), 0, ids[:1], tails[:1], chunk_tokens=4096
    )
    for other in (batched, chunked, one_run + alone[1:]):
        for a, b in zip(alone, other, strict=True):
            assert sorted(a) == sorted(b)
            for node in a:
                _same(variant, a[node], b[node])
    assert sorted(cached) == sorted(alone[0])
    for node in cached:
        _same(variant, cached[node], alone[0][node])


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_trie_after_a_prompt_too_short_to_split(tiny_artifacts: Path, variant: str) -> None:
    """Under 17 tokens and no past, the trie goes in a run after the prompt; every node still
    gets the logits of its own path fed after the prompt."""
    session, _, prompt = _setup(tiny_artifacts, variant)
    trie = Trie(TRIE_PATHS)
    ids = prompt.ids[:12]
    (nodes,), _ = prompt_and_trie(session, session.empty_past(1), 0, [ids], [trie.tail(full=True)])
    _, rows = _full(session, ids)
    _assert_path_logits(session, trie, rows, nodes)


def test_trie_rejects_a_path_that_prefixes_another() -> None:
    with pytest.raises(InvalidArgument):
        Trie({"a": (1, 2), "b": (1, 2, 3)})
    trie = Trie({"a": (1, 2), "b": (1, 3, 4), "c": (5, 6)})
    # (1,) is covered by (1, 3): one row fewer to run.
    assert scoring_rows(trie) == [(5,), (1, 3)]


@pytest.mark.parametrize("variant", ["fp32", "int8", "fp16"])
def test_kv_kept_on_the_device_gives_the_same_logits(tiny_artifacts: Path, variant: str) -> None:
    """IO binding with the KV left where the graph ran (the GPU path), here through the CPU
    provider: the same unpadded runs give the same numbers, and the KV never becomes numpy."""
    host, _, prompt = _setup(tiny_artifacts, variant)
    device = DecoderSession(tiny_artifacts / variant / "model.onnx", provider="cpu", device_kv=True)
    assert device.device_kv and not host.device_kv
    n = len(prompt.prefix.ids) // ALIGN * ALIGN
    refs, outs = [], []
    for session, out in ((host, refs), (device, outs)):
        prefix = session.run(
            np.asarray([prompt.ids[:n]]), np.ones((1, n), np.int64), np.arange(n)[None],
            session.empty_past(1),
        )  # fmt: skip
        root, (rows,) = prompt_rows(session, prefix.present, n, [prompt.ids[n:]], align=1)
        assert rows.length == len(prompt.ids)  # unpadded: nothing was cut
        trie = Trie({"a": (7, 8), "b": (7, 9), "c": (10,)})
        node_logits = packed_trie_logits(session, trie, rows, root[0])
        out += [root[0], *(node_logits[k] for k in sorted(node_logits))]
        if session is device:
            assert not isinstance(rows.past[0], np.ndarray)  # an OrtValue, left on the device
            assert rows.past[0].shape() == [1, session.kv_heads, len(prompt.ids), session.head_dim]
    for a, b in zip(refs, outs, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 if variant != "fp16" else 1e-2)
    assert device.device_kv  # no fallback happened


def test_kv_on_device_falls_back_to_the_host_once(
    tiny_artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = DecoderSession(tiny_artifacts / "int8" / "model.onnx", provider="cpu", device_kv=True)

    def broken(feed: object) -> object:
        raise RuntimeError("no device here")

    monkeypatch.setattr(session, "_run_bound", broken)
    ids = np.asarray([[5, 6, 7]])
    out = session.run(ids, np.ones((1, 3), np.int64), np.arange(3)[None], session.empty_past(1))
    assert not session.device_kv and isinstance(out.present[0], np.ndarray)
    assert out.logits.shape[:2] == (1, 3)


def test_kv_on_device_without_onnx_stays_on_the_host(
    tiny_artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server installed without the gpu extra has no onnx package to rewrite the graph."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    session = DecoderSession(tiny_artifacts / "int8" / "model.onnx", provider="cpu", device_kv=True)
    assert not session.device_kv
    ids = np.asarray([[5, 6, 7]])
    out = session.run(ids, np.ones((1, 3), np.int64), np.arange(3)[None], session.empty_past(1))
    assert isinstance(out.present[0], np.ndarray)


def test_kv_on_device_when_the_rewritten_graph_will_not_load(
    tiny_artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An onnxruntime that cannot load the rewritten graph (say, without the external-data
    folder option) serves from the artifact's own graph, the KV in host memory."""

    def refuse(self: DecoderSession, model_file: Path, opts: object) -> object:
        raise RuntimeError("unknown session option")

    monkeypatch.setattr(DecoderSession, "_bindable_session", refuse)
    session = DecoderSession(tiny_artifacts / "int8" / "model.onnx", provider="cpu", device_kv=True)
    assert not session.device_kv
    ids = np.asarray([[5, 6, 7]])
    out = session.run(
        ids, np.ones((1, 3), np.int64), np.arange(3)[None], session.empty_past(1), keep=1
    )
    assert isinstance(out.present[0], np.ndarray) and out.logits.shape[1] == 1
