"""Fused TTE attention: varlen flash attention with the TTE mask computed in-kernel (DESIGN.md §3, §6).

Algorithm
    FlashAttention-2 with online softmax in base 2 (``exp2``, scores pre-scaled by ``scale * log2(e)``)
    over packed varlen inputs ``q: (T, Hq, D)``, ``k, v: (T, Hkv, D)``. The mask is never materialised:
    each token carries ``seq_id`` and ``token_type`` and the kernel re-states the four clauses of
    :func:`tte_flash.mask.visible`. Backward recomputes P from the saved log-sum-exp: one kernel
    accumulates dK/dV per key block (looping over the query heads of its GQA group, so repeated K/V are
    never materialised and no atomics are needed), a second one accumulates dQ per query block.

Tile skipping (cost scales with visible pairs)
    The launcher turns the layout into four O(T) int32 bound arrays (:func:`_layout_bounds`):
    ``kv_lo[i]``/``kv_hi[i]``, the first / one-past-last key visible to row ``i`` (sample start, or the
    end of the query span for COT rows when ``cot_sees_query=False``; ``i + 1``, or the end of the THINK
    span for THINK rows when ``think_bidirectional``), and ``q_lo[j]``/``q_hi[j]``, the first /
    one-past-last row that can see key ``j`` (``j`` or the THINK start; the sample end, or the COT start
    for EMB keys and, when COT does not see the query, QUERY keys). A query block only visits key
    blocks in ``[min kv_lo, max kv_hi)`` of its rows (a key block only visits query blocks in
    ``[min q_lo, max q_hi)``), so tiles of other samples are never loaded. Inside that range each tile
    is classified from five scalar loads of metadata (seq ids and types are monotone, so the first and
    last elements bound a block): a tile whose rows and keys lie in one sample, whose keys all precede
    its first row, and that holds no (COT row, EMB key) or (COT row, QUERY key, ``not cot_sees_query``)
    pair is fully visible and runs with no per-element mask; only the other (diagonal, sample-boundary,
    THINK, EMB) tiles evaluate the mask.

Dtypes and head dims
    fp16 / bf16 (fp32 accumulation), fp32 (``ieee`` dot precision, i.e. no TF32) and fp64 (fp64
    accumulation, for ``gradcheck`` under the interpreter). Any head dim 1..256; it is padded to a power of
    two >= 16 with masked loads, so 64 and 128 (Qwen2-VL-2B) run unpadded. GQA with any group size
    (``Hq % Hkv == 0``, e.g. 12 query heads over 2 KV heads).

Devices
    CUDA, or CPU under the Triton interpreter (``TRITON_INTERPRET=1`` set before this module is imported).
    When interpreting, blocks are fixed at 16 x 16 and bf16/fp16 are upcast to fp32 before ``tl.dot``
    (the interpreter's low-precision dot is wrong); on CUDA the kernels are autotuned over a few
    Hopper-oriented configs (BLOCK_M 64-128, BLOCK_N 32-128, 4-8 warps, 2-3 stages). No ``make_block_ptr``
    (removed in Triton 3.9): plain pointer arithmetic, so Triton 3.6 and 3.9 both work.

Known limits
    The configs were chosen for H100 without hardware to tune on: run ``benchmarks/attention.py`` on a GPU
    before trusting the numbers. No dropout, no attention bias, no KV cache; the LSE is returned but not
    differentiable. The first CUDA call per head dim and dtype autotunes (a few seconds).
"""
from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tte_flash.mask import COT, EMB, QUERY, THINK, check_layout

# Read once, at the same time as the kernels below are decorated (Triton decides then too).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_QUERY, _THINK, _EMB, _COT = tl.constexpr(QUERY), tl.constexpr(THINK), tl.constexpr(EMB), tl.constexpr(COT)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _tile_is_partial(SEQ, TYPES, m0, n0, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     COT_SEES_QUERY: tl.constexpr):
    """Whether the (rows m0.., keys n0..) tile needs the per-element mask; False means all pairs visible.

    Relies on the validated layout: seq ids non-decreasing, types non-decreasing within a sample.
    """
    m_last = tl.minimum(m0 + BLOCK_M, T) - 1
    n_last = tl.minimum(n0 + BLOCK_N, T) - 1
    seq_key_first = tl.load(SEQ + n0)
    seq_row_last = tl.load(SEQ + m_last)
    row_has_cot = tl.load(TYPES + m_last) == _COT
    key_type_first = tl.load(TYPES + n0)
    key_type_last = tl.load(TYPES + n_last)
    # keys n0..n_last all precede row m0, and n0..m_last lies in one sample (seq ids are monotone)
    full = (m0 + BLOCK_M <= T) & (n0 + BLOCK_N - 1 <= m0) & (seq_key_first == seq_row_last)
    full = full & ~(row_has_cot & (key_type_first <= _EMB) & (key_type_last >= _EMB))
    if not COT_SEES_QUERY:
        full = full & ~(row_has_cot & (key_type_first == _QUERY))
    return full == 0


@triton.jit
def _visible(row, row_seq, row_type, key, key_seq, key_type, THINK_BIDIRECTIONAL: tl.constexpr,
             COT_SEES_QUERY: tl.constexpr):
    """The DESIGN §3 rule on broadcastable (row, key) tensors; mirrors tte_flash.mask.visible."""
    order_ok = key <= row
    if THINK_BIDIRECTIONAL:
        order_ok = order_ok | ((row_type == _THINK) & (key_type == _THINK))
    row_cot = row_type == _COT
    vis = (row_seq == key_seq) & order_ok & ~(row_cot & (key_type == _EMB))
    if not COT_SEES_QUERY:
        vis = vis & ~(row_cot & (key_type == _QUERY))
    return vis


@triton.jit
def _row_block_key_range(KV_LO, KV_HI, rows, row_ok, T, BLOCK_N: tl.constexpr):
    """[lo, hi): the key range any row of the block can see, lo rounded down to a key block."""
    lo = tl.min(tl.load(KV_LO + rows, mask=row_ok, other=T), axis=0) // BLOCK_N * BLOCK_N
    hi = tl.max(tl.load(KV_HI + rows, mask=row_ok, other=0), axis=0)
    return lo, hi


@triton.jit
def _row_block_visible(SEQ, TYPES, rows, row_seq, row_type, keys, key_ok, THINK_BIDIRECTIONAL: tl.constexpr,
                       COT_SEES_QUERY: tl.constexpr):
    """(BLOCK_M, BLOCK_N) visibility of a partial tile, rows on the first axis."""
    key_seq = tl.load(SEQ + keys, mask=key_ok, other=-1)
    key_type = tl.load(TYPES + keys, mask=key_ok, other=0)
    return _visible(rows[:, None], row_seq[:, None], row_type[:, None], keys[None, :],
                    key_seq[None, :], key_type[None, :], THINK_BIDIRECTIONAL, COT_SEES_QUERY)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, SEQ, TYPES, KV_LO, KV_HI,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                T, GROUP, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                THINK_BIDIRECTIONAL: tl.constexpr, COT_SEES_QUERY: tl.constexpr, ACC_DTYPE: tl.constexpr,
                DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One (query block, query head): O and LSE (base 2) of BLOCK_M rows."""
    m0 = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    kv_head = head // GROUP
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    d_ok = offs_d < HEAD_DIM
    row_mask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + head * stride_qh + rows[:, None] * stride_qt + offs_d[None, :], mask=row_mask, other=0.0)
    q = q.to(DOT_DTYPE)
    row_seq = tl.load(SEQ + rows, mask=row_ok, other=-2)  # -2: padding rows match no key
    row_type = tl.load(TYPES + rows, mask=row_ok, other=0)
    lo, hi = _row_block_key_range(KV_LO, KV_HI, rows, row_ok, T, BLOCK_N)
    k_ptrs = K + kv_head * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + kv_head * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    for n0 in range(lo, hi, BLOCK_N):
        keys = n0 + offs_n
        key_ok = keys < T
        key_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs + n0 * stride_kt, mask=key_mask, other=0.0).to(DOT_DTYPE)
        v = tl.load(v_ptrs + n0 * stride_vt, mask=key_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if _tile_is_partial(SEQ, TYPES, m0, n0, T, BLOCK_M, BLOCK_N, COT_SEES_QUERY):
            vis = _row_block_visible(SEQ, TYPES, rows, row_seq, row_type, keys, key_ok, THINK_BIDIRECTIONAL,
                                     COT_SEES_QUERY)
            qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = p.to(V.dtype.element_ty).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows (every real row sees itself)
    out = (acc / l_safe[:, None]).to(O.dtype.element_ty)
    tl.store(O + head * stride_oh + rows[:, None] * stride_ot + offs_d[None, :], out, mask=row_mask)
    tl.store(LSE + head * T + rows, m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SEQ, TYPES, Q_LO, Q_HI,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                     stride_dks, stride_dkt, stride_dkh, stride_dvs, stride_dvt, stride_dvh,
                     T, GROUP, HEADS_PER_SPLIT, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, THINK_BIDIRECTIONAL: tl.constexpr, COT_SEES_QUERY: tl.constexpr,
                     ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One (key block, KV head, split): dK and dV of BLOCK_N keys, summed over HEADS_PER_SPLIT query heads.

    With more than one split (small grids), each split writes its partial sums to its own slice of
    DK/DV (``stride_dks`` apart) and the launcher adds them up: deterministic, no atomics.
    """
    n0 = tl.program_id(0) * BLOCK_N
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    keys = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = keys < T
    d_ok = offs_d < HEAD_DIM
    key_mask = key_ok[:, None] & d_ok[None, :]

    k = tl.load(K + kv_head * stride_kh + keys[:, None] * stride_kt + offs_d[None, :], mask=key_mask, other=0.0)
    v = tl.load(V + kv_head * stride_vh + keys[:, None] * stride_vt + offs_d[None, :], mask=key_mask, other=0.0)
    k = k.to(DOT_DTYPE)
    v = v.to(DOT_DTYPE)
    key_seq = tl.load(SEQ + keys, mask=key_ok, other=-1)  # -1: padding keys match no row
    key_type = tl.load(TYPES + keys, mask=key_ok, other=0)
    lo = tl.min(tl.load(Q_LO + keys, mask=key_ok, other=T), axis=0) // BLOCK_M * BLOCK_M
    hi = tl.max(tl.load(Q_HI + keys, mask=key_ok, other=0), axis=0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    for g in range(split * HEADS_PER_SPLIT, (split + 1) * HEADS_PER_SPLIT):
        head = kv_head * GROUP + g
        q_ptrs = Q + head * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
        do_ptrs = DO + head * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :]
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + offs_m
            row_ok = rows < T
            row_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptrs + m0 * stride_qt, mask=row_mask, other=0.0).to(DOT_DTYPE)
            do = tl.load(do_ptrs + m0 * stride_dot, mask=row_mask, other=0.0).to(DOT_DTYPE)
            lse = tl.load(LSE + head * T + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + head * T + rows, mask=row_ok, other=0.0)
            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
            p_t = tl.exp2(qk_t - lse[None, :])
            if _tile_is_partial(SEQ, TYPES, m0, n0, T, BLOCK_M, BLOCK_N, COT_SEES_QUERY):
                row_seq = tl.load(SEQ + rows, mask=row_ok, other=-2)
                row_type = tl.load(TYPES + rows, mask=row_ok, other=0)
                vis = _visible(rows[None, :], row_seq[None, :], row_type[None, :], keys[:, None],
                               key_seq[:, None], key_type[:, None], THINK_BIDIRECTIONAL, COT_SEES_QUERY)
                p_t = tl.where(vis, p_t, 0.0)
            dv += tl.dot(p_t.to(DO.dtype.element_ty).to(DOT_DTYPE), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(Q.dtype.element_ty).to(DOT_DTYPE), q, input_precision=DOT_PRECISION)

    dk *= sm_scale
    tl.store(DK + split * stride_dks + kv_head * stride_dkh + keys[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=key_mask)
    tl.store(DV + split * stride_dvs + kv_head * stride_dvh + keys[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=key_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, SEQ, TYPES, KV_LO, KV_HI,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dqt, stride_dqh,
                   T, GROUP, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   THINK_BIDIRECTIONAL: tl.constexpr, COT_SEES_QUERY: tl.constexpr, ACC_DTYPE: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One (query block, query head): dQ of BLOCK_M rows."""
    m0 = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    kv_head = head // GROUP
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    d_ok = offs_d < HEAD_DIM
    row_mask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + head * stride_qh + rows[:, None] * stride_qt + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + head * stride_doh + rows[:, None] * stride_dot + offs_d[None, :], mask=row_mask, other=0.0)
    q = q.to(DOT_DTYPE)
    do = do.to(DOT_DTYPE)
    lse = tl.load(LSE + head * T + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + head * T + rows, mask=row_ok, other=0.0)
    row_seq = tl.load(SEQ + rows, mask=row_ok, other=-2)
    row_type = tl.load(TYPES + rows, mask=row_ok, other=0)
    lo, hi = _row_block_key_range(KV_LO, KV_HI, rows, row_ok, T, BLOCK_N)
    k_ptrs = K + kv_head * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + kv_head * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    for n0 in range(lo, hi, BLOCK_N):
        keys = n0 + offs_n
        key_ok = keys < T
        key_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs + n0 * stride_kt, mask=key_mask, other=0.0).to(DOT_DTYPE)
        v = tl.load(v_ptrs + n0 * stride_vt, mask=key_mask, other=0.0).to(DOT_DTYPE)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(qk - lse[:, None])
        if _tile_is_partial(SEQ, TYPES, m0, n0, T, BLOCK_M, BLOCK_N, COT_SEES_QUERY):
            vis = _row_block_visible(SEQ, TYPES, rows, row_seq, row_type, keys, key_ok, THINK_BIDIRECTIONAL,
                                     COT_SEES_QUERY)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(K.dtype.element_ty).to(DOT_DTYPE), k, input_precision=DOT_PRECISION)

    dq *= sm_scale
    tl.store(DQ + head * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_mask)


# ----------------------------------------------------------------------------------------------------
# Launchers: checks, layout bounds, block choice
# ----------------------------------------------------------------------------------------------------

class KernelLayout(NamedTuple):
    """A checked packed layout with its visibility bounds; build once per step, reuse in every layer."""
    seq_ids: torch.Tensor  # (T,) int32, non-decreasing
    token_types: torch.Tensor  # (T,) uint8, non-decreasing within a sample
    kv_lo: torch.Tensor  # (T,) int32: first key row i can see
    kv_hi: torch.Tensor  # (T,) int32: one past the last key row i can see
    q_lo: torch.Tensor  # (T,) int32: first row that can see key j
    q_hi: torch.Tensor  # (T,) int32: one past the last row that can see key j
    think_bidirectional: bool  # THINK tokens of a sample see each other
    cot_sees_query: bool  # COT rows see the QUERY span

    @property
    def bounds(self):
        return self.kv_lo, self.kv_hi, self.q_lo, self.q_hi


def prepare_layout(seq_ids, token_types, *, think_bidirectional=False, cot_sees_query=True) -> KernelLayout:
    """Check a packed layout and compute its bounds (O(T) torch ops; the checks sync with the host)."""
    for name, x in (("seq_ids", seq_ids), ("token_types", token_types)):
        if not isinstance(x, torch.Tensor) or x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {getattr(x, 'dtype', type(x))}")
    if seq_ids.device != token_types.device:
        raise ValueError(f"seq_ids and token_types must be on one device, got {seq_ids.device} and "
                         f"{token_types.device}")
    check_layout(seq_ids, token_types)
    # renumber samples 0..n-1 before the int32 cast: ids that differ by a multiple of 2**32 must not merge
    # (check_layout guarantees they never decrease, so a new sample starts wherever the id changes)
    changes = torch.zeros_like(seq_ids, dtype=torch.int32)
    changes[1:] = (seq_ids[1:] != seq_ids[:-1]).to(torch.int32)
    seq_ids, token_types = torch.cumsum(changes, 0, dtype=torch.int32).contiguous(), token_types.to(torch.uint8).contiguous()
    bounds = _layout_bounds(seq_ids, token_types, think_bidirectional=bool(think_bidirectional),
                            cot_sees_query=bool(cot_sees_query))
    return KernelLayout(seq_ids, token_types, *bounds, bool(think_bidirectional), bool(cot_sees_query))


def _layout_bounds(seq_ids, token_types, *, think_bidirectional, cot_sees_query):
    """Per-token visibility bounds (kv_lo, kv_hi, q_lo, q_hi), int32 (T,) each; O(T), no host sync.

    The keys row i can see lie in [kv_lo[i], kv_hi[i]); the rows that can see key j in [q_lo[j], q_hi[j]).
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
    think_end = query_end + type_counts[:, THINK]
    cot_start = think_end + type_counts[:, EMB]
    end = start + length
    start, query_end, think_end, cot_start, end = (x[sample] for x in (start, query_end, think_end, cot_start, end))

    is_think = types == THINK
    # COT rows start at the query (when they see it and it is not empty), else at the THINK span, else at
    # the COT span: never at <emb>, which they must not see
    cot_first = torch.where(think_end > query_end, query_end, cot_start)
    if cot_sees_query:
        cot_first = torch.where(query_end > start, start, cot_first)
    kv_lo = torch.where(types == COT, cot_first, start)
    kv_hi = torch.where(is_think & think_bidirectional, think_end, index + 1)
    q_lo = torch.where(is_think & think_bidirectional, query_end, index)
    q_hi = torch.where((types == EMB) | ((types == QUERY) & (not cot_sees_query)), cot_start, end)
    return tuple(x.to(torch.int32).contiguous() for x in (kv_lo, kv_hi, q_lo, q_hi))


def _check_qkv(q, k, v, layout: KernelLayout):
    """Raise ``ValueError`` with a clear message for q, k, v the kernels cannot take (no host sync)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise ValueError(f"{name} must be a 3-D tensor (tokens, heads, head_dim), got "
                             f"{getattr(x, 'shape', type(x))}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(f"q, k, v must share one dtype in {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    tokens, q_heads, head_dim = q.shape
    if k.shape[0] != tokens or k.shape[2] != head_dim:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in tokens or head_dim")
    if k.shape[1] == 0 or q_heads % k.shape[1] != 0:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({k.shape[1]})")
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {_MAX_HEAD_DIM}], got {head_dim}")
    if q.numel() >= 2**31 or k.numel() >= 2**31:
        raise ValueError("tensors of 2**31 or more elements are not supported (int32 offsets)")
    if layout.seq_ids.numel() != tokens:
        raise ValueError(f"seq_ids/token_types have {layout.seq_ids.numel()} tokens, q has {tokens}")
    devices = {x.device for x in (q, k, v, layout.seq_ids)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"tte_attention needs CUDA tensors (got {q.device}); on CPU set TRITON_INTERPRET=1 "
                         "before triton is imported, or use tte_flash.attention.reference_attention")


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


def _dtype_constexprs(dtype):
    """Accumulator dtype, tl.dot operand dtype and dot precision for an input dtype.

    fp32 accumulation (fp64 for fp64); the interpreter's 16-bit tl.dot is wrong, so there the operands
    are rounded to the input dtype as on GPU, then upcast to fp32. fp32 dots use IEEE fp32, not TF32
    (the precision flag is ignored for 16-bit operands; "tf32" is just Triton's default there).
    """
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    low_precision = dtype in (torch.float16, torch.bfloat16)
    dot = tl.float32 if _INTERPRET and low_precision else _TL_DTYPES[dtype]
    return dict(ACC_DTYPE=acc, DOT_DTYPE=dot, DOT_PRECISION="tf32" if low_precision else "ieee")


# Interpreter: small fixed blocks (several tiles per sample in tests). CUDA: autotuned over Hopper-minded
# (BLOCK_M, BLOCK_N, warps, stages); untuned guesses, see the module docstring.
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}
_FWD_CONFIGS = ((128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 2))
_DKDV_CONFIGS = ((32, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 2), (16, 64, 4, 2))
_DQ_CONFIGS = ((128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2), (64, 16, 4, 2))
_KERNELS = {"fwd": (_fwd_kernel, _FWD_CONFIGS), "dkdv": (_bwd_dkdv_kernel, _DKDV_CONFIGS),
            "dq": (_bwd_dq_kernel, _DQ_CONFIGS)}


@functools.cache
def _tuned(kernel_name):
    """The autotuned CUDA variant of a kernel (built lazily: autotune needs a GPU driver)."""
    kernel, configs = _KERNELS[kernel_name]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in configs]
    return triton.autotune(configs=configs, key=["HEAD_DIM", "GROUP"])(kernel)


def _launch(kernel_name, tokens, grid_rest, args, blocks=None, **constexprs):
    """Launch over (token blocks, *grid_rest): fixed ``blocks`` (default when interpreting) or autotuned."""
    block_key = "BLOCK_N" if kernel_name == "dkdv" else "BLOCK_M"  # dK/dV programs own key blocks
    if blocks is None and not _INTERPRET:
        _tuned(kernel_name)[lambda meta: (triton.cdiv(tokens, meta[block_key]), *grid_rest)](*args, **constexprs)
        return
    blocks = blocks or _INTERPRET_BLOCKS
    _KERNELS[kernel_name][0][(triton.cdiv(tokens, blocks[block_key]), *grid_rest)](*args, **blocks, **constexprs)


def _group_splits(tokens, kv_heads, group, device):
    """How many programs share one KV head's query heads in the dK/dV kernel: the smallest divisor of the
    group that gives about two waves of programs (assuming 128-key blocks); 1 when interpreting."""
    if _INTERPRET or device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    blocks = triton.cdiv(tokens, 128) * kv_heads
    return next(d for d in range(1, group + 1) if group % d == 0 and (blocks * d >= target or d == group))


def _attention_forward(q, k, v, layout: KernelLayout, *, scale, out=None, blocks=None):
    """Forward launcher on checked, contiguous inputs: returns (out (T, Hq, D), lse (Hq, T), base 2)."""
    tokens, q_heads, head_dim = q.shape
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty(q_heads, tokens, device=q.device,
                      dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    args = (q, k, v, out, lse, layout.seq_ids, layout.token_types, layout.kv_lo, layout.kv_hi,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), tokens, q_heads // k.shape[1], scale * _LOG2E)
    _launch("fwd", tokens, (q_heads,), args, blocks, HEAD_DIM=head_dim,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)), THINK_BIDIRECTIONAL=layout.think_bidirectional,
            COT_SEES_QUERY=layout.cot_sees_query, **_dtype_constexprs(q.dtype))
    return out, lse


def _attention_backward(do, q, k, v, out, lse, layout: KernelLayout, *, scale, grads=None, blocks=None,
                        splits=None):
    """Backward launcher: returns (dq, dk, dv); ``grads`` optionally supplies the three output buffers,
    ``splits`` the number of programs per KV head's query-head group in the dK/dV kernel."""
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    splits = splits or _group_splits(tokens, kv_heads, group, q.device)
    dq, dk, dv = grads if grads is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    # partial dK/dV per split, in the accumulator dtype, summed below (deterministic)
    dk_part, dv_part = ((dk[None], dv[None]) if splits == 1 else
                        [torch.empty(splits, *k.shape, device=k.device, dtype=lse.dtype) for _ in range(2)])
    delta = (do.to(lse.dtype) * out.to(lse.dtype)).sum(-1).transpose(0, 1).contiguous()  # (Hq, T)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                  THINK_BIDIRECTIONAL=layout.think_bidirectional, COT_SEES_QUERY=layout.cot_sees_query,
                  **_dtype_constexprs(q.dtype))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               do.stride(0), do.stride(1))
    _launch("dkdv", tokens, (kv_heads, splits),
            (q, k, v, do, lse, delta, dk_part, dv_part, layout.seq_ids, layout.token_types, layout.q_lo,
             layout.q_hi, *strides, *dk_part.stride()[:3], *dv_part.stride()[:3], tokens, group, group // splits,
             scale * _LOG2E, scale), blocks, **common)
    if splits > 1:
        dk.copy_(dk_part.sum(0))
        dv.copy_(dv_part.sum(0))
    _launch("dq", tokens, (q_heads,),
            (q, k, v, do, lse, delta, dq, layout.seq_ids, layout.token_types, layout.kv_lo, layout.kv_hi, *strides,
             dq.stride(0), dq.stride(1), tokens, group, scale * _LOG2E, scale), blocks, **common)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# Autograd and the public functions
# ----------------------------------------------------------------------------------------------------

class _TTEAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale):
        out, lse = _attention_forward(q, k, v, layout, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale = layout, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _attention_backward(d_out.contiguous(), q, k, v, out, lse, ctx.layout, scale=ctx.scale)
        return dq, dk, dv, None, None


def tte_attention_with_layout(q, k, v, layout: KernelLayout, *, scale=None, return_lse=False):
    """:func:`tte_attention` on a layout from :func:`prepare_layout` (skips the layout checks and bounds)."""
    _check_qkv(q, k, v, layout)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.shape[0] == 0:
        out = q.new_empty(q.shape) + 0 * (k.sum() + v.sum())  # keeps the autograd graph
        lse = torch.empty(q.shape[1], 0, device=q.device, dtype=torch.float32)
        return (out, lse) if return_lse else out
    out, lse2 = _TTEAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), layout, scale)
    return (out, lse2 * _LN2) if return_lse else out


def tte_attention(q, k, v, seq_ids, token_types, *, think_bidirectional=False, cot_sees_query=True, scale=None,
                  return_lse=False):
    """Fused TTE attention on packed varlen tokens; differentiable in q, k and v.

    q: (T, Hq, D); k, v: (T, Hkv, D) with Hq % Hkv == 0; seq_ids: (T,) integer, non-decreasing;
    token_types: (T,) integer in {0 query, 1 think, 2 emb, 3 cot}, non-decreasing within a sample.
    ``scale`` defaults to D ** -0.5. Returns (T, Hq, D) in q's dtype, and with ``return_lse`` also the
    natural-log log-sum-exp of each row's scaled scores, (Hq, T) float32 (float64 for float64 inputs;
    not differentiable). Many layers on one layout: :func:`prepare_layout` once, then
    :func:`tte_attention_with_layout`.
    """
    layout = prepare_layout(seq_ids, token_types, think_bidirectional=think_bidirectional,
                            cot_sees_query=cot_sees_query)
    return tte_attention_with_layout(q, k, v, layout, scale=scale, return_lse=return_lse)
