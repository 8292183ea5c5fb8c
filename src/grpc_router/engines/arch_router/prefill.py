"""Batched prefill over a shared past, with each prompt's trie tail in its own run.

A decision must not depend on its batch neighbours, on padding or on the prefix cache. On
onnxruntime's CPU kernels, padding *before* a row's tokens (left padding, or a gap between its
past and its new tokens) changes the last bits of its logits, and so do quantized MatMul tiles
that straddle two rows. So only the prefill is batched across requests, over one shared past
length, with every row right-padded to a multiple of ALIGN, and the trie nodes a decision needs
follow each prompt in its own row of that run (`prompt_and_trie`: one pass over the weights per
decision). The tests prove the property per variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from grpc_router.engines.arch_router.graph import ALIGN, PAD_ID
from grpc_router.engines.arch_router.runtime import (
    DecoderSession,
    FloatArray,
    Int64Array,
    KVTensor,
    on_host,
)
from grpc_router.engines.arch_router.trie import TrieTail


@dataclass(slots=True)
class Rows:
    """The KV state of a batch of sequences. The KV may live on the session's device
    (OrtValues); what only numpy can do brings it back to the host first."""

    past: list[KVTensor]
    mask: Int64Array
    """[batch, past_len]: 1 for real tokens, 0 for padding."""
    next_pos: Int64Array
    """[batch]: position id of each row's next token (its count of real tokens)."""

    @property
    def batch(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def take(self, index: Sequence[int]) -> Rows:
        idx = np.asarray(index, dtype=np.int64)
        return Rows(
            [np.take(p, idx, axis=0) for p in on_host(self.past)],
            np.take(self.mask, idx, axis=0),
            np.take(self.next_pos, idx, axis=0),
        )

    def row(self, i: int, length: int) -> Rows:
        """Row i alone, cut to its first `length` positions (dropping trailing padding)."""
        if self.batch == 1 and length == self.length:
            return self  # nothing to cut: a device-resident KV stays where it is
        return Rows(
            [p[i : i + 1, :, :length] for p in on_host(self.past)],
            self.mask[i : i + 1, :length],
            self.next_pos[i : i + 1],
        )

    def cut(self, length: int) -> Rows:
        """Every row cut to its first `length` positions (rows of equal real length)."""
        return Rows(
            [p[:, :, :length] for p in on_host(self.past)],
            self.mask[:, :length],
            self.next_pos,
        )

    def copy(self) -> Rows:
        """A compact copy that does not keep a larger batch's arrays alive."""
        past = [np.ascontiguousarray(p) if isinstance(p, np.ndarray) else p for p in self.past]
        return Rows(past, self.mask.copy(), self.next_pos)

    @staticmethod
    def stack(rows: Sequence[Rows]) -> Rows:
        """Concatenate rows of equal length along the batch axis."""
        if len(rows) == 1:
            return rows[0]
        return Rows(
            [
                np.concatenate(layer, axis=0)
                for layer in zip(*(on_host(r.past) for r in rows), strict=True)
            ],
            np.concatenate([r.mask for r in rows], axis=0),
            np.concatenate([r.next_pos for r in rows], axis=0),
        )


def extend(
    session: DecoderSession,
    rows: Rows,
    tokens: Sequence[Sequence[int]],
    *,
    align: int = 1,
    last_only: bool = False,
) -> tuple[list[FloatArray], Rows]:
    """Feed each row its tokens (right-padded to a multiple of `align`) in one run; return
    each row's logits: at every new position, or with `last_only` at its last real one (the
    graph then computes only those, and its last layer only the rows that lead to them)."""
    ids, new_mask, positions = _layout(rows, tokens, align)
    mask = np.concatenate([rows.mask, new_mask], axis=1)
    out = session.run(ids, mask, positions, rows.past, keep=-1 if last_only else 0)
    counts = np.asarray([len(t) for t in tokens], dtype=np.int64)
    if last_only:  # [batch, 1, vocab]: each row's last real position
        logits = [out.logits[i] for i in range(len(tokens))]
    else:
        logits = [out.logits[i, : len(t)] for i, t in enumerate(tokens)]
    return logits, Rows(out.present, mask, rows.next_pos + counts)


def _layout(
    rows: Rows, tokens: Sequence[Sequence[int]], align: int
) -> tuple[Int64Array, Int64Array, Int64Array]:
    """input_ids, the new tokens' mask and position_ids of a run: each row's tokens
    right-padded to a width that is a multiple of `align`, positions continuing its past."""
    width = -(-max(len(t) for t in tokens) // align) * align
    ids = np.full((rows.batch, width), PAD_ID, dtype=np.int64)
    new_mask = np.zeros((rows.batch, width), dtype=np.int64)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = t
        new_mask[i, : len(t)] = 1
    positions = rows.next_pos[:, None] + np.arange(width, dtype=np.int64)[None, :]
    return ids, new_mask, positions


def tail_logits(
    session: DecoderSession, tail: TrieTail, prompt: Rows, root_logits: FloatArray
) -> dict[int, FloatArray]:
    """A tail's node logits from one run after the prompt's KV, used as it is (not copied per
    continuation)."""
    node_logits: dict[int, FloatArray] = {0: root_logits}
    if not tail:
        return node_logits
    past_len, size = prompt.length, len(tail)
    allowed = np.zeros((1, 1, size, past_len + size), dtype=np.int64)
    allowed[..., :past_len] = prompt.mask[0]
    allowed[0, 0, :, past_len:] = tail.sees
    ids = np.asarray([tail.tokens], dtype=np.int64)
    positions = prompt.next_pos[:, None] + tail.offsets[None, :]
    mask = np.concatenate([prompt.mask, np.ones((1, size), dtype=np.int64)], axis=1)
    out = session.run(ids, mask, positions, prompt.past, mask4d=allowed)
    for i, node in enumerate(tail.nodes):
        node_logits[node] = out.logits[0, i]  # views: this run's logits are not reused
    return node_logits


def prompt_rows(
    session: DecoderSession,
    past: list[KVTensor],
    past_len: int,
    suffixes: Sequence[Sequence[int]],
    *,
    chunk_tokens: int = 512,
    align: int = ALIGN,
) -> tuple[list[FloatArray], list[Rows]]:
    """Prefill the suffixes after a shared-length past, batched and right-padded to multiples
    of `align`; returns each prompt's last logits and its KV state cut to its own length.
    (`align` 1 for a lone prompt whose KV stays on a device: no padding, so nothing to cut.)

    Long suffixes go in chunks (a multiple of ALIGN per row, about `chunk_tokens` per run):
    this bounds the activations' memory. A chunk
    boundary is like a cached-prefix boundary: aligned, it leaves the numbers unchanged."""
    logits, rows = _prefill(session, past, past_len, suffixes, None, chunk_tokens, align)
    return [node_logits[0] for node_logits in logits], rows


def prompt_and_trie(
    session: DecoderSession,
    past: list[KVTensor],
    past_len: int,
    suffixes: Sequence[Sequence[int]],
    tails: Sequence[TrieTail],
    *,
    chunk_tokens: int = 512,
    align: int = ALIGN,
    keep_kv: bool = False,
) -> tuple[list[dict[int, FloatArray]], list[Rows]]:
    """`prompt_rows` with each prompt's trie tail fed after its last token in the same run:
    the logits of every node a decision needs (0: the prompt's last token) from one pass over
    the weights, instead of a run per step or a trie run after the prefill. The tail starts
    where the prompt ends, whatever the batch, so a row's numbers do not depend on its
    neighbours.

    Also returns each prompt's KV state, whose first positions are the prompt's: with
    `keep_kv`, a row of a batch is cut out of it (host views, for the prefix cache to copy);
    a row that ran alone, or any row without `keep_kv`, is the run's state as it is (nothing
    extends a trie's KV, and on a device cutting it would copy it out)."""
    return _prefill(session, past, past_len, suffixes, tails, chunk_tokens, align, keep_kv)


def _prefill(
    session: DecoderSession,
    past: list[KVTensor],
    past_len: int,
    suffixes: Sequence[Sequence[int]],
    tails: Sequence[TrieTail] | None,
    chunk_tokens: int,
    align: int,
    keep_kv: bool = False,
) -> tuple[list[dict[int, FloatArray]], list[Rows]]:
    """Each prompt's node logits (0: its last token) and KV state (see `prompt_and_trie`)."""
    if session.one_row_prefill and tails and any(tails) and not past_len:
        return _prefill_fused_split(session, suffixes, tails, chunk_tokens, align, keep_kv)
    if session.one_row_prefill and len(suffixes) > 1:  # fused attention: one prompt per run
        lasts: list[dict[int, FloatArray]] = []
        states: list[Rows] = []
        for i, suffix in enumerate(suffixes):
            own = [p[i : i + 1] for p in on_host(past)]
            row_tails = tails[i : i + 1] if tails else None
            (last_i,), (rows_i,) = _prefill(
                session, own, past_len, [suffix], row_tails, chunk_tokens, align, keep_kv
            )
            lasts.append(last_i)
            states.append(rows_i)
        return lasts, states
    return _prefill_batched(session, past, past_len, suffixes, tails, chunk_tokens, align, keep_kv)


def _prefill_fused_split(
    session: DecoderSession,
    suffixes: Sequence[Sequence[int]],
    tails: Sequence[TrieTail],
    chunk_tokens: int,
    align: int,
    keep_kv: bool,
) -> tuple[list[dict[int, FloatArray]], list[Rows]]:
    """Prompts without a past under fused attention: that kernel rotates a run without a past
    by index, not by position_ids, so the trie (positions by depth) goes in a run with one (an
    aligned chunk boundary, which changes no number), or after the prompt if it is too short
    to split."""
    split: list[dict[int, FloatArray]] = []
    split_rows: list[Rows] = []
    for suffix, tail in zip(suffixes, tails, strict=True):
        head = (len(suffix) - 1) // ALIGN * ALIGN
        if not head:
            (root,), (alone,) = _prefill(
                session, session.empty_past(1), 0, [suffix], None, chunk_tokens, align
            )
            split.append(tail_logits(session, tail, alone, root[0]))
            split_rows.append(alone)
            continue
        _, (state,) = _prefill(
            session, session.empty_past(1), 0, [suffix[:head]], None, chunk_tokens, ALIGN
        )
        (last_i,), (rows_i,) = _prefill(
            session, state.past, head, [suffix[head:]], [tail], chunk_tokens, align, keep_kv
        )
        split.append(last_i)
        split_rows.append(rows_i)
    return split, split_rows


def _prefill_batched(
    session: DecoderSession,
    past: list[KVTensor],
    past_len: int,
    suffixes: Sequence[Sequence[int]],
    tails: Sequence[TrieTail] | None,
    chunk_tokens: int,
    align: int,
    keep_kv: bool,
) -> tuple[list[dict[int, FloatArray]], list[Rows]]:
    """Every prompt in the same runs, chunk by chunk; a prompt leaves the batch with its last
    chunk (and its tail)."""
    batch = len(suffixes)
    per_row = max(ALIGN, chunk_tokens // batch // ALIGN * ALIGN)
    rows = Rows(
        past,
        np.ones((batch, past_len), dtype=np.int64),
        np.full((batch,), past_len, dtype=np.int64),
    )
    last: dict[int, dict[int, FloatArray]] = {}
    done: dict[int, Rows] = {}
    active = list(range(batch))
    offset = 0
    while active:
        pieces = [suffixes[i][offset : offset + per_row] for i in active]
        offset += per_row
        ending = [len(suffixes[i]) <= offset for i in active]
        row_tails = [
            tails[i] if tails and end else None for i, end in zip(active, ending, strict=True)
        ]
        logits, rows = _feed(session, rows, pieces, row_tails, align)
        keep: list[int] = []
        for r, i in enumerate(active):
            if not ending[r]:
                keep.append(r)
                continue
            last[i] = logits[r]  # [m, vocab] views of this run's logits
            done[i] = _prompt_state(rows, r, past_len + len(suffixes[i]), row_tails[r], keep_kv)
        del logits
        if keep and len(keep) < len(active):
            rows = rows.take(keep)
        if keep and rows.length > past_len + offset:  # a neighbour's trie made the run wider
            rows = rows.cut(past_len + offset)
        active = [active[r] for r in keep]
    return [last[i] for i in range(batch)], [done[i] for i in range(batch)]


def _prompt_state(rows: Rows, r: int, length: int, tail: TrieTail | None, keep_kv: bool) -> Rows:
    """Row r's KV state once its prompt is in: cut to the prompt; or, for a prompt fed with a
    tail, the run's state as it is when nobody asked for the KV or when the run held this row
    alone (its first `length` positions are the prompt's: no copy is needed to keep them)."""
    if tail and (not keep_kv or rows.batch == 1):
        return rows
    state = rows.row(r, length)
    if rows.batch > 1 and not tail:  # a view would keep the whole batch's KV alive
        state = state.copy()
    return state


def _feed(
    session: DecoderSession,
    rows: Rows,
    pieces: Sequence[Sequence[int]],
    tails: Sequence[TrieTail | None],
    align: int,
) -> tuple[list[dict[int, FloatArray]], Rows]:
    """One prefill run: each row's piece, then its tail if it has one; each row's logits at
    its piece's last token (key 0) and at its tail's nodes."""
    if not any(tails):
        logits, rows = extend(session, rows, pieces, align=align, last_only=True)
        return [{0: row[-1]} for row in logits], rows
    counts = [len(p) for p in pieces]
    seqs = [[*p, *(t.tokens if t else ())] for p, t in zip(pieces, tails, strict=True)]
    ids, new_mask, positions = _layout(rows, seqs, align)
    width = ids.shape[1]
    # [batch, 1, seq, past+seq], ANDed with the graph's causal and padding mask
    allowed = np.ones((rows.batch, 1, width, rows.length + width), dtype=np.int64)
    for r, (n, tail) in enumerate(zip(counts, tails, strict=True)):
        if tail:
            k, at = len(tail), rows.length + n
            positions[r, n : n + k] = rows.next_pos[r] + n + tail.offsets
            allowed[r, 0, n : n + k, at : at + k] = tail.sees
    keep = 1 + max(len(t) if t else 0 for t in tails)  # each row's last real `keep` tokens
    mask = np.concatenate([rows.mask, new_mask], axis=1)
    out = session.run(ids, mask, positions, rows.past, keep=-keep, mask4d=allowed)
    result: list[dict[int, FloatArray]] = []
    for r, tail in enumerate(tails):
        k = len(tail) if tail else 0
        node_logits = {0: out.logits[r, keep - 1 - k]}  # the piece's last token
        for i, node in enumerate(tail.nodes if tail else ()):
            node_logits[node] = out.logits[r, keep - k + i]
        result.append(node_logits)
    return result, Rows(out.present, mask, rows.next_pos + np.asarray(counts, dtype=np.int64))
