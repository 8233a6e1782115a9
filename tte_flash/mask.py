"""The one TTE attention-mask rule (DESIGN.md §3).

Every sample in a packed sequence is laid out as

    [QUERY ...][THINK_1 .. THINK_K][EMB][COT_1 .. COT_M]

and each token carries a ``seq_id`` (sample index, non-decreasing along the packed sequence) and a
``token_type`` (``QUERY``/``THINK``/``EMB``/``COT``, non-decreasing within a sample). Key ``j`` is
visible to query row ``i`` iff all of:

* ``seq_id[i] == seq_id[j]``;
* ``j <= i``, or ``think_bidirectional`` and both tokens are THINK;
* not (``i`` is COT and ``j`` is EMB): the embedding never leaks into the reasoning branch;
* not (``i`` is COT and ``j`` is QUERY and not ``cot_sees_query``).

Every row sees itself, so no row is empty. This module is the single source of truth: the reference
attention, the Triton kernel's tests, the data collator and the docs all derive from
:func:`visible`. The Triton kernel re-states the same four clauses in ``tl`` code and is tested
against :func:`dense_mask`.

The same rule as intervals (:func:`mask_intervals`, O(T) memory): the rows that see a key are always one
interval, and the keys a row sees are one interval minus at most one gap (the EMB span, for COT rows).
The kernel's block table and its per-element masks are built from these intervals.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

QUERY, THINK, EMB, COT = 0, 1, 2, 3
TOKEN_TYPE_NAMES = {QUERY: "query", THINK: "think", EMB: "emb", COT: "cot"}


def visible(seq_i, type_i, idx_i, seq_j, type_j, idx_j, *, think_bidirectional: bool, cot_sees_query: bool):
    """Whether key ``j`` is visible to query ``i``; works on Python ints or broadcastable tensors.

    ``idx`` is the token's index in memory order (its offset in the packed sequence).
    """
    same_sample = seq_i == seq_j
    order_ok = idx_j <= idx_i
    if think_bidirectional:
        order_ok = order_ok | ((type_i == THINK) & (type_j == THINK))
    allowed = same_sample & order_ok & ~((type_i == COT) & (type_j == EMB))
    if not cot_sees_query:
        allowed = allowed & ~((type_i == COT) & (type_j == QUERY))
    return allowed


class MaskIntervals(NamedTuple):
    """The rule of :func:`visible` as per-token index intervals, (T,) int64 each; exact, not a bound.

    Row ``i`` sees key ``j`` iff ``row_lo[i] <= j < row_hi[i]`` and not ``gap_lo[i] <= j < gap_hi[i]``;
    equivalently iff ``col_lo[j] <= i < col_hi[j]``.
    """
    row_lo: torch.Tensor  # first key row i sees: its sample start, or a later span's start for COT rows
    row_hi: torch.Tensor  # one past the last key row i sees: i + 1, or the THINK end for bidirectional THINK rows
    gap_lo: torch.Tensor  # start of the keys inside [row_lo, row_hi) that row i does not see (EMB, for COT rows)
    gap_hi: torch.Tensor  # one past their end (gap_lo == gap_hi: no gap)
    col_lo: torch.Tensor  # first row that sees key j: j, or the THINK start for bidirectional THINK keys
    col_hi: torch.Tensor  # one past the last row that sees key j: the sample end, or the COT start


def mask_intervals(seq_ids: torch.Tensor, token_types: torch.Tensor, *, think_bidirectional: bool = False,
                   cot_sees_query: bool = True) -> MaskIntervals:
    """:class:`MaskIntervals` of a valid packed 1-D layout (see :func:`check_layout`); O(T), no host sync.

    Why intervals suffice (per sample ``[QUERY][THINK][EMB][COT]``): a key is seen by the rows from
    itself (or the THINK start, for bidirectional THINK keys) to the sample end, except that COT rows,
    which come last, drop EMB keys and, without ``cot_sees_query``, QUERY keys: the sample end then
    becomes the COT start. A COT row sees the sample from its start (the THINK start without
    ``cot_sees_query``) up to itself, EMB excepted: the gap.
    """
    tokens = seq_ids.numel()
    index = torch.arange(tokens, device=seq_ids.device)
    types = token_types.long()
    new_sample = torch.ones(tokens, dtype=torch.bool, device=seq_ids.device)
    new_sample[1:] = seq_ids[1:] != seq_ids[:-1]
    sample = torch.cumsum(new_sample, 0) - 1  # (T,) 0-based sample index
    type_counts = torch.zeros(tokens, 4, dtype=torch.long, device=seq_ids.device)  # (samples <= T, 4)
    type_counts.index_put_((sample, types), torch.ones_like(types), accumulate=True)
    length = type_counts.sum(1)
    start = torch.cumsum(length, 0) - length  # samples are contiguous and in order
    query_end = start + type_counts[:, QUERY]  # = THINK start
    think_end = query_end + type_counts[:, THINK]  # = EMB start
    cot_start = think_end + type_counts[:, EMB]
    end = start + length
    start, query_end, think_end, cot_start, end = (x[sample] for x in (start, query_end, think_end, cot_start, end))

    is_cot = types == COT
    bidirectional_think = (types == THINK) & think_bidirectional
    # COT rows start at the QUERY span (when they see it and it is not empty), else at the THINK span,
    # else at the COT span: never inside the gap, so every bound is tight (its end tokens are visible)
    cot_first = torch.where(think_end > query_end, query_end, cot_start)
    if cot_sees_query:
        cot_first = torch.where(query_end > start, start, cot_first)
    row_lo = torch.where(is_cot, cot_first, start)
    row_hi = torch.where(bidirectional_think, think_end, index + 1)
    gap_lo = torch.where(is_cot, think_end, 0)
    gap_hi = torch.where(is_cot, cot_start, 0)
    col_lo = torch.where(bidirectional_think, query_end, index)
    col_hi = torch.where((types == EMB) | ((types == QUERY) & (not cot_sees_query)), cot_start, end)
    return MaskIntervals(row_lo, row_hi, gap_lo, gap_hi, col_lo, col_hi)


def dense_mask(seq_ids: torch.Tensor, token_types: torch.Tensor, *, think_bidirectional: bool = False,
               cot_sees_query: bool = True) -> torch.Tensor:
    """Boolean mask ``(..., L, L)`` (True = attend) for ``seq_ids``/``token_types`` of shape ``(..., L)``.

    Builds an L x L tensor: for the reference path, tests and small inputs only.
    """
    seq_ids, token_types = seq_ids.long(), token_types.long()
    idx = torch.arange(seq_ids.shape[-1], device=seq_ids.device)
    return visible(seq_ids[..., :, None], token_types[..., :, None], idx[:, None],
                   seq_ids[..., None, :], token_types[..., None, :], idx[None, :],
                   think_bidirectional=think_bidirectional, cot_sees_query=cot_sees_query)


def check_layout(seq_ids: torch.Tensor, token_types: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``seq_ids``/``token_types`` form a valid packed 1-D layout."""
    if seq_ids.ndim != 1 or token_types.shape != seq_ids.shape:
        raise ValueError(f"seq_ids and token_types must be 1-D of equal length, got {tuple(seq_ids.shape)} "
                         f"and {tuple(token_types.shape)}")
    if seq_ids.numel() == 0:
        return
    seq, types = seq_ids.long(), token_types.long()
    if (seq[1:] < seq[:-1]).any():
        raise ValueError("seq_ids must be non-decreasing along the packed sequence")
    if types.min() < QUERY or types.max() > COT:
        raise ValueError(f"token_types must be in [{QUERY}, {COT}], got values in "
                         f"[{int(types.min())}, {int(types.max())}]")
    same = seq[1:] == seq[:-1]
    if (same & (types[1:] < types[:-1])).any():
        raise ValueError("token_types must be non-decreasing within a sample (query, think, emb, cot)")
