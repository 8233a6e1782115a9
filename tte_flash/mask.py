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
"""
from __future__ import annotations

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
