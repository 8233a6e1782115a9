"""Fused TTE attention: varlen flash attention with the TTE mask computed in-kernel (DESIGN.md §3, §6).

Algorithm
    FlashAttention-2 with online softmax in base 2 (``exp2`` of ``score * scale * log2(e) - max``, one FFMA an
    element: the forward's row max is taken on the unscaled scores, the same for a scale > 0) over packed varlen
    inputs ``q: (T, Hq, D)``, ``k, v: (T, Hkv, D)``. The mask is never materialised.
    Backward recomputes P from the saved log-sum-exp in two kernels: the dQ kernel runs first and also
    computes ``Delta = rowsum(dO * O)`` in its prologue (the FA2 preprocess, fused: dO is loaded there
    anyway), then the dK/dV kernel accumulates dK/dV per key block over every query head of its GQA group
    in one program (no repeated K/V, no atomics); where key blocks x KV heads are fewer than the SMs, the
    group's query heads are split over programs (:func:`_dkdv_splits`) whose fp32 partials are summed in a fixed
    order (deterministic). At head dim 256 dV and dK run as two launches (one accumulator each).

Tiles to visit (FlexAttention's BlockMask idea)
    :func:`prepare_layout` checks the layout once per forward and keeps the mask as exact O(T) intervals
    (:func:`tte_flash.mask.mask_intervals`). Per block shape, a block table (:mod:`.block_table`, built
    on first use and cached in the :class:`KernelLayout`, so shared by every layer and head) gives for
    each row block the key blocks holding a visible pair, grouped by *kind*: the mask tests a tile needs
    (FULL none, CUT_LO, CUT_HI, CUT_LO_HI, CUT_ANY), and the same per key block, as int32 range bounds (20
    per row block, 8 per key block: O(T / BLOCK) whatever the sample lengths). Each kernel runs one loop
    per kind (``MASK: tl.constexpr``, a ``tl.static_range`` over the kinds), each over that kind's ranges:
    two scalar loads per range, no metadata load per tile. Program ``p`` of a launch takes the table's ``p``-th
    block in its longest-first order (most tiles first: a causal sample's last row blocks, first key blocks), so
    where the GPU dispatches programs in launch order (in practice; CUDA does not promise it) each head's longest
    programs start first and the grid's last wave holds short ones (FA3's scheduler orders causal tiles likewise).

Devices
    Every launch runs under ``torch.cuda.device(q.device)`` (:func:`_device_guard`), as FlashAttention-2
    and FlexAttention launch: on the tensors' GPU and its current stream, whichever GPU is current.

Per-element mask of a partial tile (FlashMask's bounds idea, one test per bound that cuts the tile)
    Compared in registers against int32 bounds loaded once per program, never per tile: in the forward
    and dQ kernels (rows fixed) key ``j`` is visible to row ``i`` iff ``row_lo[i] <= j < row_hi[i]`` and
    not ``gap_lo[i] <= j < gap_hi[i]`` (the EMB span, for COT rows); in the dK/dV kernel (keys fixed) iff
    ``col_lo[j] <= i < col_hi[j]``. A tile's loop applies only its kind's tests (:func:`_rows_see`,
    :func:`_cols_see`: a tile on the causal diagonal compares ``j < row_hi`` alone), each as one integer
    compare of the loop-invariant offsets within the tile against the bound shifted by the tile's start,
    and one select, per element: the floor for a per-element mask. Kinds without the HI test never hold a
    token past ``T`` and load unmasked; LSE and Delta sit in buffers with padded rows (:func:`_row_stats`), so the
    dK/dV kernel loads them unmasked in every tile. Padding rows/keys past ``T`` are never stored (their scores may be
    unmasked in a FULL or CUT_LO tile; they stay finite). Per-tile SASS of each kind's loop, Triton 3.9 and
    3.6: ``benchmarks/README.md`` ("Kernel design: compile-time evidence"). What-if, off in the shipped configs:
    ``KernelConfig.pair_mask`` masks the backward's 16-bit P / dS two elements an instruction (:func:`_keep_seen`,
    packed fp16 compares in inline PTX), the same values.

Dtypes and head dims
    fp16 / bf16 (fp32 accumulation), fp32 (``ieee`` dot precision, i.e. no TF32) and fp64 (fp64
    accumulation, for ``gradcheck`` under the interpreter). Any head dim 1..256; it is padded to a power of
    two >= 16 with masked loads, so 64 and 128 (Qwen2-VL-2B) run unpadded. GQA with any group size
    (``Hq % Hkv == 0``, e.g. 12 query heads over 2 KV heads).

Devices and block shapes
    CUDA, or CPU under the Triton interpreter (``TRITON_INTERPRET=1`` set before this module is imported).
    When interpreting, blocks are fixed at 16 x 16 and bf16/fp16 are upcast to fp32 before ``tl.dot``
    (the interpreter's low-precision dot is wrong). On CUDA each kernel has one fixed config per dtype,
    head-dim class and GPU family (:func:`_kernel_config`, :func:`_gpu_family`: wgmma tiles on sm_90, the same
    on sm_100 where they compile there without spills (tcgen05), mma.sync tiles within 99 KiB of shared memory on
    sm_80-89 and sm_120), no autotuning: the block table depends on the block shape, and every shipped config is
    checked by ``benchmarks/compile_check.py`` (no 16-bit spill on any target, shared memory within each target's
    limit; fp32 and fp64 get smaller tiles that fit). No ``make_block_ptr`` (removed in Triton 3.9): plain pointer
    arithmetic, so Triton 3.6 and 3.9 both work.

Known limits
    The configs were chosen from compile statistics (registers, spills, shared memory), not timed on a
    GPU: run ``benchmarks/attention.py`` on one before trusting the numbers. No dropout, no attention
    bias, no KV cache; the LSE is returned but not differentiable. NVIDIA GPUs of compute capability 8.0 and
    newer only, with Triton 3.4 or newer (:func:`unsupported_gpu`: a T4, a V100, an AMD GPU or an older Triton
    gets a clear error, and the model the reference path).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import re
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from tte_flash.mask import check_layout, mask_intervals

from . import block_table
from .block_table import BlockTable, build_block_table

# Read once, at the same time as the kernels below are decorated (Triton decides then too).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------

# Tile kinds of the block table (kernels/block_table.py), as constexprs the kernels can read
FULL, CUT_LO, CUT_HI, CUT_LO_HI, CUT_ANY = (tl.constexpr(kind) for kind in (
    block_table.FULL, block_table.CUT_LO, block_table.CUT_HI, block_table.CUT_LO_HI, block_table.CUT_ANY))
ROW_KINDS, COL_KINDS = tl.constexpr(block_table.ROW_KINDS), tl.constexpr(block_table.COL_KINDS)
# int32 bounds per block: a row block's kind k, range r at 4k + 2r (two ranges per kind), a key block's at 2k
ROW_BOUND_COUNT, COL_BOUND_COUNT = tl.constexpr(block_table.ROW_BOUNDS), tl.constexpr(block_table.COL_BOUNDS)


@triton.jit
def _rows_see(offs_n, n0, row_lo, row_hi, gap_lo, gap_hi, MASK: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask of a partial tile with keys ``n0 + offs_n`` from the rows' key intervals ((BLOCK_M,)
    each): only the tests that can fail in a tile of kind ``MASK`` (each kind's tests in its own branch:
    compile_check reads them). The bounds are shifted by ``n0`` per row, so each element compares the
    loop-invariant ``offs_n`` (one integer compare and one select per element and test)."""
    k = offs_n[None, :]
    if MASK == CUT_LO:
        see = k >= (row_lo - n0)[:, None]
    elif MASK == CUT_HI:
        see = k < (row_hi - n0)[:, None]
    elif MASK == CUT_LO_HI:
        see = (k >= (row_lo - n0)[:, None]) & (k < (row_hi - n0)[:, None])
    elif MASK == CUT_ANY:
        see = (k >= (row_lo - n0)[:, None]) & (k < (row_hi - n0)[:, None]) & (
            (k < (gap_lo - n0)[:, None]) | (k >= (gap_hi - n0)[:, None]))
    return see


@triton.jit
def _cols_see(offs_m, m0, col_lo, col_hi, MASK: tl.constexpr):
    """(BLOCK_N, BLOCK_M) mask of a partial tile of the dK/dV kernel with rows ``m0 + offs_m`` from the keys' row
    intervals ((BLOCK_N,) each), as :func:`_rows_see`."""
    r = offs_m[None, :]
    if MASK == CUT_LO:
        see = r >= (col_lo - m0)[:, None]
    elif MASK == CUT_HI:
        see = r < (col_hi - m0)[:, None]
    elif MASK == CUT_LO_HI:
        see = (r >= (col_lo - m0)[:, None]) & (r < (col_hi - m0)[:, None])
    return see


# The 16-bit masks of PAIR_MASK (below): inline PTX on a GPU; the interpreter, which runs no PTX, applies the same
# fp16 compares with tl.where
PAIR_ASM = tl.constexpr(not _INTERPRET)
# per kind: PTX that sets $0 to the 16-bit pair $1 with each half whose offset (pair $2) fails the kind's tests
# zeroed; one compare of two fp16 pairs per bound gives 0xffff / 0 per half (PTX set.<cmp>.u32.f16x2), ANDed in
_PAIR_TESTS = {
    1: ("set.ge.u32.f16x2 m, $2, $3;", "and.b32 $0, $1, m;"),  # CUT_LO: offset >= lo ($3)
    2: ("set.lt.u32.f16x2 m, $2, $3;", "and.b32 $0, $1, m;"),  # CUT_HI: offset < hi ($3)
    3: ("set.ge.u32.f16x2 m, $2, $3; set.lt.u32.f16x2 h, $2, $4;", "and.b32 m, m, h; and.b32 $0, $1, m;"),
    # CUT_ANY: lo ($3) <= offset < hi ($4), and not gap_lo ($5) <= offset < gap_hi ($6)
    4: ("set.ge.u32.f16x2 m, $2, $3; set.lt.u32.f16x2 h, $2, $4; set.lt.u32.f16x2 g, $2, $5; "
        "set.ge.u32.f16x2 e, $2, $6;", "and.b32 m, m, h; and.b32 m, m, $1; or.b32 g, g, e; and.b32 $0, m, g;"),
}
assert tuple(_PAIR_TESTS) == (block_table.CUT_LO, block_table.CUT_HI, block_table.CUT_LO_HI, block_table.CUT_ANY)
_PAIR_ASM_TEXT = {kind: "{ .reg .b32 m, h, g, e; " + tests + " " + merge + " }"
                  for kind, (tests, merge) in _PAIR_TESTS.items()}
PAIR_LO, PAIR_HI, PAIR_LO_HI, PAIR_ANY = (tl.constexpr(_PAIR_ASM_TEXT[kind]) for kind in range(1, 5))


@triton.jit
def _tile_bound(bound, start):
    """``bound - start`` as fp16: compared with a tile's offsets (0..BLOCK-1 <= 255) it gives the int32 compare's
    answer, since fp16 holds every integer up to 2048 exactly and rounds the others (inf past 65504) to values of
    the same sign and magnitude >= 2048."""
    return (bound - start).to(tl.float16)


@triton.jit
def _keep_seen(x, offs, start, lo, hi, gap_lo, gap_hi, MASK: tl.constexpr):
    """The 16-bit tile ``x`` (R, C) with the elements its kind ``MASK`` does not see set to +0: (r, c) is seen iff
    ``lo[r] <= start + offs[c] < hi[r]`` and, for CUT_ANY, not ``gap_lo[r] <= start + offs[c] < gap_hi[r]`` (the
    tests of :func:`_rows_see`, bounds (R,) int32). On a GPU two elements per instruction: the bounds shifted by the
    tile start as fp16 pairs, one packed compare per bound and one AND per pair of ``x`` (inline PTX), where an int32
    compare and a select took one instruction each per element. ``x`` may hold inf / NaN where it is not seen (an
    unmasked exp): the AND clears every bit."""
    k = offs.to(tl.float16)[None, :]
    lo16 = _tile_bound(lo, start)[:, None]
    hi16 = _tile_bound(hi, start)[:, None]
    if PAIR_ASM:
        if MASK == CUT_LO:
            x = tl.inline_asm_elementwise(PAIR_LO, "=r,r,r,r", [x, k, lo16], dtype=x.dtype, is_pure=True, pack=2)
        elif MASK == CUT_HI:
            x = tl.inline_asm_elementwise(PAIR_HI, "=r,r,r,r", [x, k, hi16], dtype=x.dtype, is_pure=True, pack=2)
        elif MASK == CUT_LO_HI:
            x = tl.inline_asm_elementwise(PAIR_LO_HI, "=r,r,r,r,r", [x, k, lo16, hi16], dtype=x.dtype, is_pure=True,
                                          pack=2)
        elif MASK == CUT_ANY:
            x = tl.inline_asm_elementwise(PAIR_ANY, "=r,r,r,r,r,r,r",
                                          [x, k, lo16, hi16, _tile_bound(gap_lo, start)[:, None],
                                           _tile_bound(gap_hi, start)[:, None]],
                                          dtype=x.dtype, is_pure=True, pack=2)
    else:
        if MASK == CUT_LO:
            see = k >= lo16
        elif MASK == CUT_HI:
            see = k < hi16
        elif MASK == CUT_LO_HI:
            see = (k >= lo16) & (k < hi16)
        elif MASK == CUT_ANY:
            see = (k >= lo16) & (k < hi16) & ((k < _tile_bound(gap_lo, start)[:, None])
                                              | (k >= _tile_bound(gap_hi, start)[:, None]))
        x = tl.where(see, x, 0.0)
    return x


@triton.jit
def _key_tiles(X_HEAD, stride_t, offs_n, offs_d, T, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """Where a row-block kernel (forward, dQ) loads one KV head's (T, HEAD_DIM) K or V tiles from: the first tile's
    pointers, or with ``TMA`` a descriptor (rows past ``T`` and columns past ``HEAD_DIM`` read as zeros)."""
    if TMA:
        src = tl.make_tensor_descriptor(X_HEAD, shape=[T, HEAD_DIM], strides=[stride_t, 1],
                                        block_shape=[BLOCK_N, BLOCK_D])
    else:
        src = X_HEAD + offs_n[:, None] * stride_t + offs_d[None, :]
    return src


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_src, v_src, BOUNDS, offs_n, row_lo, row_hi, gap_lo, gap_hi, d_ok, T,
               stride_kt, stride_vt, qk_scale, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
               DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr = False,
               WARP_SPECIALIZE: tl.constexpr = False):
    """Online-softmax update of one row block over its key blocks of kind ``MASK`` (two ranges). K/V come from
    pointers (``k_src``/``v_src`` the first tile's) or, with ``TMA``, from tensor descriptors (TMA loads: rows past
    ``T`` read as zeros, no mask); ``WARP_SPECIALIZE`` asks Triton for producer/consumer warps in the tile loop."""
    for seg in range(0, 2):
        start = tl.load(BOUNDS + 4 * MASK + 2 * seg)  # two scalar loads per range, none per tile
        end = tl.load(BOUNDS + 4 * MASK + 2 * seg + 1)
        for block in tl.range(start, end, warp_specialize=WARP_SPECIALIZE):
            n0 = block * BLOCK_N
            if TMA:
                k = k_src.load([n0, 0]).to(DOT_DTYPE)
                v = v_src.load([n0, 0])
            else:
                if MASK == FULL or MASK == CUT_LO:  # no HI test: the tile lies inside [0, T)
                    key_mask = d_ok[None, :]
                else:
                    key_mask = (offs_n < T - n0)[:, None] & d_ok[None, :]  # the tile past T
                k = tl.load(k_src + n0 * stride_kt, mask=key_mask, other=0.0).to(DOT_DTYPE)
                v = tl.load(v_src + n0 * stride_vt, mask=key_mask, other=0.0)
            # unscaled scores: max(qk) x scale is the max of qk x scale for a scale > 0, rounding included (monotone),
            # so the scale joins the exp's argument in one FFMA an element instead of an FMUL more
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
            if MASK != FULL:
                qk = tl.where(_rows_see(offs_n, n0, row_lo, row_hi, gap_lo, gap_hi, MASK), qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.exp2(qk * qk_scale - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            p = p.to(v.dtype).to(DOT_DTYPE)
            acc = acc * alpha[:, None] + tl.dot(p, v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, ROW_LO, ROW_HI, GAP_LO, GAP_HI, ROW_BOUNDS, ROW_ORDER,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                T, stride_stats, GROUP, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                TMA: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False):
    """One (query block, query head): O and LSE (base 2) of BLOCK_M rows (``TMA``, ``WARP_SPECIALIZE``: see
    :class:`KernelConfig`)."""
    row_block = tl.load(ROW_ORDER + tl.program_id(0))  # the row blocks with the most tiles run first
    head = tl.program_id(1)
    kv_head = head // GROUP
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    d_ok = offs_d < HEAD_DIM
    row_mask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + head * stride_qh + rows[:, None] * stride_qt + offs_d[None, :], mask=row_mask, other=0.0)
    q = q.to(DOT_DTYPE)
    row_lo = tl.load(ROW_LO + rows, mask=row_ok, other=0)  # padding rows: empty intervals
    row_hi = tl.load(ROW_HI + rows, mask=row_ok, other=0)
    gap_lo = tl.load(GAP_LO + rows, mask=row_ok, other=0)
    gap_hi = tl.load(GAP_HI + rows, mask=row_ok, other=0)
    bounds = ROW_BOUNDS + ROW_BOUND_COUNT * row_block  # this row block's key-block ranges per kind
    k_src = _key_tiles(K + kv_head * stride_kh, stride_kt, offs_n, offs_d, T, HEAD_DIM, BLOCK_N, BLOCK_D, TMA)
    v_src = _key_tiles(V + kv_head * stride_vh, stride_vt, offs_n, offs_d, T, HEAD_DIM, BLOCK_N, BLOCK_D, TMA)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    for kind in tl.static_range(1, ROW_KINDS):  # one loop per partial kind, with only that kind's mask tests
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_src, v_src, bounds, offs_n, row_lo, row_hi, gap_lo, gap_hi,
                                   d_ok, T, stride_kt, stride_vt, qk_scale, BLOCK_N, kind, DOT_DTYPE, DOT_PRECISION,
                                   TMA, WARP_SPECIALIZE)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_src, v_src, bounds, offs_n, row_lo, row_hi, gap_lo, gap_hi, d_ok,
                               T, stride_kt, stride_vt, qk_scale, BLOCK_N, FULL, DOT_DTYPE, DOT_PRECISION, TMA,
                               WARP_SPECIALIZE)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows (every real row sees itself)
    out = (acc / l_safe[:, None]).to(O.dtype.element_ty)
    tl.store(O + head * stride_oh + rows[:, None] * stride_ot + offs_d[None, :], out, mask=row_mask)
    tl.store(LSE + head * stride_stats + rows, m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_src, v_src, BOUNDS, offs_n, row_lo, row_hi, gap_lo, gap_hi, d_ok, T,
              stride_kt, stride_vt, qk_scale, BLOCK_N: tl.constexpr, MASK: tl.constexpr, DOT_DTYPE: tl.constexpr,
              DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, PAIR_MASK: tl.constexpr):
    """dQ of one row block accumulated over its key blocks of kind ``MASK`` (two ranges); K/V from pointers (the first
    tile's) or, with ``TMA``, from descriptors (rows past ``T`` read as zeros), as in :func:`_fwd_tiles`."""
    # the ranges unrolled here (a dynamic loop over them spills at head dim 256 on sm_90, 64x16 tiles)
    for seg in tl.static_range(0, 2):
        start = tl.load(BOUNDS + 4 * MASK + 2 * seg)  # two scalar loads per range, none per tile
        end = tl.load(BOUNDS + 4 * MASK + 2 * seg + 1)
        for block in range(start, end):
            n0 = block * BLOCK_N
            if TMA:
                k_in = k_src.load([n0, 0])
                v_in = v_src.load([n0, 0])
            else:
                if MASK == FULL or MASK == CUT_LO:  # no HI test: the tile lies inside [0, T)
                    key_mask = d_ok[None, :]
                else:
                    key_mask = (offs_n < T - n0)[:, None] & d_ok[None, :]  # the tile past T
                k_in = tl.load(k_src + n0 * stride_kt, mask=key_mask, other=0.0)
                v_in = tl.load(v_src + n0 * stride_vt, mask=key_mask, other=0.0)
            k = k_in.to(DOT_DTYPE)
            v = v_in.to(DOT_DTYPE)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            p = tl.exp2(qk - lse[:, None])
            if MASK != FULL and not PAIR_MASK:
                p = tl.where(_rows_see(offs_n, n0, row_lo, row_hi, gap_lo, gap_hi, MASK), p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = (p * (dp - delta[:, None])).to(k_in.dtype)
            if MASK != FULL and PAIR_MASK:  # masked after the rounding to 16 bits, two elements an instruction
                ds = _keep_seen(ds, offs_n, n0, row_lo, row_hi, gap_lo, gap_hi, MASK)
            dq += tl.dot(ds.to(DOT_DTYPE), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, ROW_LO, ROW_HI, GAP_LO, GAP_HI, ROW_BOUNDS, ROW_ORDER,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                   stride_dot, stride_doh, stride_dqt, stride_dqh,
                   T, stride_stats, GROUP, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   TMA: tl.constexpr = False, PAIR_MASK: tl.constexpr = False):
    """One (query block, query head): Delta = rowsum(dO * O) (stored for the dK/dV kernel) and dQ of BLOCK_M rows
    (``TMA``: K/V by descriptors, see :class:`KernelConfig`)."""
    row_block = tl.load(ROW_ORDER + tl.program_id(0))  # the row blocks with the most tiles run first
    head = tl.program_id(1)
    kv_head = head // GROUP
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    d_ok = offs_d < HEAD_DIM
    row_mask = row_ok[:, None] & d_ok[None, :]

    do = tl.load(DO + head * stride_doh + rows[:, None] * stride_dot + offs_d[None, :], mask=row_mask, other=0.0)
    o = tl.load(O + head * stride_oh + rows[:, None] * stride_ot + offs_d[None, :], mask=row_mask, other=0.0)
    delta = tl.sum(do.to(ACC_DTYPE) * o.to(ACC_DTYPE), axis=1)  # (BLOCK_M,)
    tl.store(DELTA + head * stride_stats + rows, delta, mask=row_ok)
    do = do.to(DOT_DTYPE)
    q = tl.load(Q + head * stride_qh + rows[:, None] * stride_qt + offs_d[None, :], mask=row_mask, other=0.0)
    q = q.to(DOT_DTYPE)
    lse = tl.load(LSE + head * stride_stats + rows, mask=row_ok, other=0.0)
    row_lo = tl.load(ROW_LO + rows, mask=row_ok, other=0)
    row_hi = tl.load(ROW_HI + rows, mask=row_ok, other=0)
    gap_lo = tl.load(GAP_LO + rows, mask=row_ok, other=0)
    gap_hi = tl.load(GAP_HI + rows, mask=row_ok, other=0)
    bounds = ROW_BOUNDS + ROW_BOUND_COUNT * row_block  # this row block's key-block ranges per kind
    k_src = _key_tiles(K + kv_head * stride_kh, stride_kt, offs_n, offs_d, T, HEAD_DIM, BLOCK_N, BLOCK_D, TMA)
    v_src = _key_tiles(V + kv_head * stride_vh, stride_vt, offs_n, offs_d, T, HEAD_DIM, BLOCK_N, BLOCK_D, TMA)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    for kind in tl.static_range(1, ROW_KINDS):  # one loop per partial kind, with only that kind's mask tests
        dq = _dq_tiles(dq, q, do, lse, delta, k_src, v_src, bounds, offs_n, row_lo, row_hi, gap_lo, gap_hi, d_ok,
                       T, stride_kt, stride_vt, qk_scale, BLOCK_N, kind, DOT_DTYPE, DOT_PRECISION, TMA, PAIR_MASK)
    dq = _dq_tiles(dq, q, do, lse, delta, k_src, v_src, bounds, offs_n, row_lo, row_hi, gap_lo, gap_hi, d_ok,
                   T, stride_kt, stride_vt, qk_scale, BLOCK_N, FULL, DOT_DTYPE, DOT_PRECISION, TMA, PAIR_MASK)
    dq *= sm_scale
    tl.store(DQ + head * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_mask)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, BOUNDS, offs_m, offs_d, col_lo, col_hi, d_ok, T, stride_stats,
                kv_head, split, GROUP, SPLITS, stride_qt, stride_qh, stride_dot, stride_doh, qk_scale,
                BLOCK_M: tl.constexpr, MASK: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                WITH_DK: tl.constexpr, WITH_DV: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr,
                PAIR_MASK: tl.constexpr):
    """dK/dV of one key block accumulated over its row blocks of kind ``MASK`` (one range) for the query heads
    ``split``, ``split + SPLITS``, ... of its KV head's group (only dK or only dV where the other flag is off: its
    accumulator is then carried unchanged). The head loop sits inside the kind's loop, not around the kinds'
    loops: what each kind's tile loop keeps in registers across it is then live in that kind's loop only (around
    four kinds it spilled)."""
    start = tl.load(BOUNDS + 2 * MASK)  # two scalar loads per range, none per tile
    end = tl.load(BOUNDS + 2 * MASK + 1)
    for g in range(split, GROUP, SPLITS):
        head = kv_head * GROUP + g
        if TMA:  # Q / DO are descriptors over (T, heads x HEAD_DIM): this head's tiles start at column head x HEAD_DIM
            q_src, do_src = Q, DO
        else:
            q_src, do_src = Q + head * stride_qh, DO + head * stride_doh
        dk, dv = _dkdv_head_tiles(dk, dv, k, v, q_src, do_src, head * HEAD_DIM, LSE + head * stride_stats,
                                  DELTA + head * stride_stats, start, end, offs_m, offs_d, col_lo, col_hi, d_ok, T,
                                  stride_qt, stride_dot, qk_scale, BLOCK_M, MASK, DOT_DTYPE, DOT_PRECISION, WITH_DK,
                                  WITH_DV, TMA, PAIR_MASK)
    return dk, dv


@triton.jit
def _dkdv_head_tiles(dk, dv, k, v, q_src, do_src, col, LSE_HEAD, DELTA_HEAD, start, end, offs_m, offs_d, col_lo,
                     col_hi, d_ok, T, stride_qt, stride_dot, qk_scale, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, WITH_DK: tl.constexpr,
                     WITH_DV: tl.constexpr, TMA: tl.constexpr, PAIR_MASK: tl.constexpr):
    """dK/dV of one key block over one query head's row blocks ``[start, end)`` of kind ``MASK``. Q and dO tiles come
    from this head's pointers or, with ``TMA``, from descriptors at column ``col`` (rows past ``T`` read as zeros;
    no pointer tensors held across the loop)."""
    if not TMA:
        q_ptrs = q_src + offs_m[:, None] * stride_qt + offs_d[None, :]
        do_ptrs = do_src + offs_m[:, None] * stride_dot + offs_d[None, :]
    for block in range(start, end):
        m0 = block * BLOCK_M
        rows = m0 + offs_m
        if MASK == FULL or MASK == CUT_LO:  # no HI test: the tile lies inside [0, T)
            row_mask = d_ok[None, :]
        else:
            row_mask = (rows < T)[:, None] & d_ok[None, :]
        lse = tl.load(LSE_HEAD + rows)  # rows padded past T (_row_stats): no mask (those rows are never seen)
        if TMA:
            q_in = q_src.load([m0, col])
            do_in = do_src.load([m0, col])
        else:
            q_in = tl.load(q_ptrs + m0 * stride_qt, mask=row_mask, other=0.0)
            do_in = tl.load(do_ptrs + m0 * stride_dot, mask=row_mask, other=0.0)
        q = q_in.to(DOT_DTYPE)
        do = do_in.to(DOT_DTYPE)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(qk_t - lse[None, :])
        if MASK != FULL and not PAIR_MASK:
            p_t = tl.where(_cols_see(offs_m, m0, col_lo, col_hi, MASK), p_t, 0.0)
        if WITH_DV:
            p16 = p_t.to(do_in.dtype)
            if MASK != FULL and PAIR_MASK:  # masked after the rounding to 16 bits, two elements an instruction
                p16 = _keep_seen(p16, offs_m, m0, col_lo, col_hi, col_lo, col_hi, MASK)
            dv += tl.dot(p16.to(DOT_DTYPE), do, input_precision=DOT_PRECISION)
        if WITH_DK:
            delta = tl.load(DELTA_HEAD + rows)  # padded with zeros past T (_row_stats): no mask
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = (p_t * (dp_t - delta[None, :])).to(q_in.dtype)
            if MASK != FULL and PAIR_MASK:
                ds_t = _keep_seen(ds_t, offs_m, m0, col_lo, col_hi, col_lo, col_hi, MASK)
            dk += tl.dot(ds_t.to(DOT_DTYPE), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, COL_LO, COL_HI, COL_BOUNDS, COL_ORDER,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                     stride_dks, stride_dkt, stride_dkh, stride_dvs, stride_dvt, stride_dvh,
                     T, stride_stats, GROUP, SPLITS, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, WITH_DK: tl.constexpr, WITH_DV: tl.constexpr,
                     TMA: tl.constexpr = False, PAIR_MASK: tl.constexpr = False):
    """One (key block, KV head, split): dK and dV of BLOCK_N keys, summed over the query heads ``split``,
    ``split + SPLITS``, ... of the KV head's GROUP (SPLITS == 1: all of them, written in the output dtype; else an
    fp32 partial per split, summed by the launcher in a fixed order). Only dK or only dV where the other flag is
    off: head dim 256 runs two launches, one accumulator each."""
    key_block = tl.load(COL_ORDER + tl.program_id(0))  # the key blocks with the most tiles run first
    kv_head = tl.program_id(1) // SPLITS
    split = tl.program_id(1) % SPLITS
    keys = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = keys < T
    d_ok = offs_d < HEAD_DIM
    key_mask = key_ok[:, None] & d_ok[None, :]

    k = tl.load(K + kv_head * stride_kh + keys[:, None] * stride_kt + offs_d[None, :], mask=key_mask, other=0.0)
    v = tl.load(V + kv_head * stride_vh + keys[:, None] * stride_vt + offs_d[None, :], mask=key_mask, other=0.0)
    k = k.to(DOT_DTYPE)
    v = v.to(DOT_DTYPE)
    col_lo = tl.load(COL_LO + keys, mask=key_ok, other=0)  # padding keys: empty intervals
    col_hi = tl.load(COL_HI + keys, mask=key_ok, other=0)
    bounds = COL_BOUNDS + COL_BOUND_COUNT * key_block  # this key block's row-block ranges per kind
    if TMA:  # one descriptor each over (T, heads x HEAD_DIM) (contiguous q / dO, HEAD_DIM == BLOCK_D): no pointer tiles
        q_src = tl.make_tensor_descriptor(Q, shape=[T, stride_qt], strides=[stride_qt, 1],
                                          block_shape=[BLOCK_M, BLOCK_D])
        do_src = tl.make_tensor_descriptor(DO, shape=[T, stride_dot], strides=[stride_dot, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
    else:
        q_src, do_src = Q, DO

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    for kind in tl.static_range(1, COL_KINDS):  # one loop per partial kind, with only that kind's mask tests
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_src, do_src, LSE, DELTA, bounds, offs_m, offs_d, col_lo, col_hi, d_ok, T,
                             stride_stats, kv_head, split, GROUP, SPLITS, stride_qt, stride_qh, stride_dot, stride_doh,
                             qk_scale, BLOCK_M, kind, DOT_DTYPE, DOT_PRECISION, WITH_DK, WITH_DV, HEAD_DIM, TMA,
                             PAIR_MASK)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_src, do_src, LSE, DELTA, bounds, offs_m, offs_d, col_lo, col_hi, d_ok, T,
                         stride_stats, kv_head, split, GROUP, SPLITS, stride_qt, stride_qh, stride_dot, stride_doh,
                         qk_scale, BLOCK_M, FULL, DOT_DTYPE, DOT_PRECISION, WITH_DK, WITH_DV, HEAD_DIM, TMA, PAIR_MASK)

    if WITH_DK:
        dk *= sm_scale
        tl.store(DK + split * stride_dks + kv_head * stride_dkh + keys[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=key_mask)
    if WITH_DV:
        tl.store(DV + split * stride_dvs + kv_head * stride_dvh + keys[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=key_mask)


# ----------------------------------------------------------------------------------------------------
# Launchers: checks, layout intervals and block tables, block choice
# ----------------------------------------------------------------------------------------------------

class KernelLayout(NamedTuple):
    """A checked packed layout as exact visibility intervals (:class:`tte_flash.mask.MaskIntervals`, int32)
    and its block tables; build once per step (:func:`prepare_layout`), reuse in every layer and head."""
    seq_ids: torch.Tensor  # (T,) int32, samples renumbered 0..n-1
    token_types: torch.Tensor  # (T,) uint8, non-decreasing within a sample
    kv_lo: torch.Tensor  # (T,) int32: first key row i sees
    kv_hi: torch.Tensor  # (T,) int32: one past the last key row i sees
    q_lo: torch.Tensor  # (T,) int32: first row that sees key j (the rows that see j are exactly [q_lo, q_hi))
    q_hi: torch.Tensor  # (T,) int32: one past the last row that sees key j
    think_bidirectional: bool  # THINK tokens of a sample see each other
    cot_sees_query: bool  # COT rows see the QUERY span
    gap_lo: torch.Tensor  # (T,) int32: row i does not see keys in [gap_lo, gap_hi) (EMB, for COT rows)
    gap_hi: torch.Tensor  # (T,) int32
    tables: dict  # (block_m, block_n) -> BlockTable, built on first use

    @property
    def bounds(self):
        return self.kv_lo, self.kv_hi, self.q_lo, self.q_hi

    def block_table(self, block_m: int, block_n: int) -> BlockTable:
        """The tiles to visit for this block shape (built once, then cached; O(T), no host sync)."""
        key = (int(block_m), int(block_n))
        if key not in self.tables:
            self.tables[key] = build_block_table(self.kv_lo, self.kv_hi, self.gap_lo, self.gap_hi, self.q_lo,
                                                 self.q_hi, *key)
        return self.tables[key]


def prepare_layout(seq_ids, token_types, *, think_bidirectional=False, cot_sees_query=True) -> KernelLayout:
    """Check a packed layout and compute its intervals (O(T) torch ops; the checks sync with the host)."""
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
    bounds = mask_intervals(seq_ids, token_types, think_bidirectional=bool(think_bidirectional),
                            cot_sees_query=bool(cot_sees_query))
    kv_lo, kv_hi, gap_lo, gap_hi, q_lo, q_hi = (x.to(torch.int32).contiguous() for x in bounds)
    return KernelLayout(seq_ids, token_types, kv_lo, kv_hi, q_lo, q_hi, bool(think_bidirectional),
                        bool(cot_sees_query), gap_lo, gap_hi, {})


def _check_qkv(q, k, v, layout: KernelLayout):
    """Raise ``ValueError`` with a clear message for q, k, v the kernels cannot take (no host sync), and
    ``RuntimeError`` where the GPU (:func:`unsupported_gpu`) or the Triton interpreter installed
    (:func:`_interpreter_problem`) cannot run them."""
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
    problem = unsupported_gpu(q.device)
    if problem:
        raise RuntimeError(problem)
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"tte_attention needs CUDA tensors (got {q.device}); on CPU set TRITON_INTERPRET=1 "
                         "before triton is imported, or use tte_flash.attention.reference_attention")
    if _INTERPRET and q.device.type != "cuda":
        problem = _interpreter_problem(triton.__version__, np.__version__)
        if problem:
            raise RuntimeError(problem)


# Triton compiles tensor-core dots for NVIDIA GPUs of compute capability 8.0 and newer only (its README; since
# Triton 3.3 every tl.dot below 8.0 is FMA code): on a T4 (7.5) or V100 (7.0) these kernels spill tens of KiB a
# thread and most launches need more than their 64 / 96 KiB of shared memory (``compile_check.py --targets 75``)
MIN_CAPABILITY = (8, 0)
# The oldest Triton that compiles these kernels (tl.range's warp_specialize, tl.make_tensor_descriptor): 3.4, which
# PyTorch 2.8 pins; 3.2 and 3.3 (PyTorch 2.6, 2.7) stop at the first compile with an AttributeError
MIN_TRITON = (3, 4)
_USE_REFERENCE = ("use attn_backend='reference' (the default picks it here) or "
                  "tte_flash.attention.reference_attention")


def unsupported_gpu(device) -> str | None:
    """Why the kernels cannot run on CUDA ``device`` (a message naming the GPU or the Triton, and what to use
    instead), or None where they can: NVIDIA GPUs of compute capability :data:`MIN_CAPABILITY` and newer, with
    Triton :data:`MIN_TRITON` or newer. Not on ROCm: its tiles and dot settings are NVIDIA's
    (``benchmarks/rocm_compile.py``). Read once per GPU (it runs on every kernel call)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _gpu_problem(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _gpu_problem(index: int) -> str | None:
    if _release(triton.__version__) < MIN_TRITON:
        return (f"the Triton kernels need triton {MIN_TRITON[0]}.{MIN_TRITON[1]} or newer (PyTorch 2.8 and later pin "
                f"it); triton {triton.__version__} is installed: upgrade torch (and with it triton), or "
                f"{_USE_REFERENCE}")
    name = torch.cuda.get_device_name(index)
    if torch.version.hip:
        return (f"the Triton kernels are built for NVIDIA GPUs; on ROCm (cuda:{index}, {name}) they do not compile for "
                "MI250 / MI350 (gfx90a / gfx950: no tf32 dot precision) and their tiles exceed MI300X's 64 KiB of LDS "
                f"and spill there (gfx942): {_USE_REFERENCE}")
    capability = torch.cuda.get_device_capability(index)
    if tuple(capability) >= MIN_CAPABILITY:
        return None
    return (f"the Triton kernels need an NVIDIA GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or "
            f"newer (Ampere, Ada, Hopper, Blackwell); cuda:{index} ({name}) is {capability[0]}.{capability[1]}, where "
            f"Triton has no tensor-core dots and the kernels' tiles do not fit its shared memory: {_USE_REFERENCE}")


def _release(version: str) -> tuple:
    """(3, 6) of '3.6.0', (2, 4) of '2.4.0rc1'."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def _interpreter_problem(triton_version: str, numpy_version: str):
    """Why the Triton interpreter cannot run these kernels, or None. Before Triton 3.7 the interpreter turns a loaded
    scalar into a loop bound with ``int()`` of a one-element array, which numpy 2.4 and later refuse
    (triton-lang/triton#9171): every tile loop here runs over bounds loaded from the block table."""
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"the Triton {triton_version} interpreter cannot run tte_attention with numpy {numpy_version}: "
                "before Triton 3.7 it reads loaded loop bounds with int() of a 1-element array, which numpy >= 2.4 "
                "refuses (triton-lang/triton#9171). Use triton >= 3.7 or numpy < 2.4 on the CPU, or "
                "tte_flash.attention.reference_attention (GPU runs are compiled and unaffected)")
    return None


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


class KernelConfig(NamedTuple):
    block_m: int  # rows (queries) per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int  # software-pipelining depth of the inner loop's loads
    dkdv_launches: int = 1  # dK/dV kernel only: 1 (both in one program), 2 (dV then dK: one accumulator each)
    tma: bool = False  # fwd, dQ: K/V, dK/dV: Q/dO through TMA descriptors (sm_90; dK/dV: power-of-two head dims)
    warp_specialize: bool = False  # forward only: tl.range(..., warp_specialize=True) on the tile loops (sm_90)
    pair_mask: bool = False  # dQ, dK/dV, 16-bit inputs: partial tiles mask P / dS two elements an instruction
    dk_stages: int = 0  # dK/dV in two launches only: the dK launch's num_stages (0: num_stages, as the dV launch)


# One fixed config per kernel, operand size and head-dim class (largest head dim it serves): the block table
# depends on the block shape, so there is no autotuning over it. Chosen from benchmarks/compile_check.py's
# registers / spills / shared memory for sm_90 and sm_80 (no GPU timing yet). fp32 and fp64 tiles are
# smaller: their operands take 2-4x the shared memory and registers of 16-bit ones.
_CONFIGS = {
    # d256: 64x32 w4 spilled 40 B with Triton 3.9 once each tile kind had its own loop (128x32 w8: 236 registers)
    ("fwd", 2): ((128, KernelConfig(128, 64, 8, 3)), (256, KernelConfig(128, 32, 8, 2))),
    ("dq", 2): ((64, KernelConfig(128, 64, 8, 2)), (128, KernelConfig(128, 32, 8, 2)),
                (256, KernelConfig(64, 32, 8, 2))),  # d256: 64x16 w4 spilled 112 B with Triton 3.6
    # dK/dV: keys are the wgmma M side (64 rows a warpgroup): FA3's 128 keys x 64 queries at d64, 128 x 32 at d128
    # (128 x 64 spills 72 B there); d256: both 64 x 256 fp32 accumulators do not fit, so dV and dK run as two
    # launches (16 x 32 w8 had no wgmma: 32 keys < 64)
    ("dkdv", 2): ((64, KernelConfig(64, 128, 8, 2)), (128, KernelConfig(32, 128, 8, 2)),
                  (256, KernelConfig(16, 64, 8, 2, dkdv_launches=2))),
    # fp32 dots are IEEE (FMA, no tensor cores): small tiles, the larger ones spill heavily
    ("fwd", 4): ((128, KernelConfig(32, 16, 8, 2)), (256, KernelConfig(16, 16, 4, 2))),
    ("dq", 4): ((128, KernelConfig(32, 16, 8, 2)), (256, KernelConfig(16, 16, 4, 2))),
    ("dkdv", 4): ((128, KernelConfig(16, 32, 8, 2)), (256, KernelConfig(16, 16, 8, 2))),
    # fp64: for gradcheck-style checks, not speed
    ("fwd", 8): ((256, KernelConfig(16, 16, 4, 1)),),
    ("dq", 8): ((256, KernelConfig(16, 16, 4, 1)),),
    ("dkdv", 8): ((256, KernelConfig(16, 16, 8, 1)),),
}
# GPUs without wgmma (mma.sync, operands in registers): sm_80-89 (A100, A10, L4, L40S, RTX 30xx/40xx) and sm_120/121
# (RTX 50xx, RTX PRO Blackwell, DGX Spark). Their 16-bit tiles, chosen for no spill with Triton 3.6 and 3.9 on sm_80
# and sm_120 and for at most 99 KiB of shared memory (the limit of every one of them but sm_80/87): the Hopper tiles
# spill there (sm_120, Triton 3.9: 108 B fwd d128, 92 / 212 B dK/dV d64 / d128), and so did this table's earlier
# backward tiles (sm_80: 296 B dQ d256 at 64x16 w4, 16-36 B dQ d128 at 128x32 w8)
_MMA_CONFIGS = {
    ("fwd", 2): ((64, KernelConfig(128, 64, 8, 3)), (128, KernelConfig(128, 32, 8, 3)),
                 (256, KernelConfig(64, 32, 8, 2))),
    ("dq", 2): ((64, KernelConfig(128, 64, 8, 2)), (128, KernelConfig(64, 64, 8, 2)),
                (256, KernelConfig(32, 32, 8, 2))),
    ("dkdv", 2): ((64, KernelConfig(32, 64, 8, 2)), (128, KernelConfig(32, 64, 8, 2)),
                  (256, KernelConfig(16, 32, 8, 2))),
}
# Datacenter Blackwell (sm_100/103: B200, B300; tcgen05, Hopper's shared memory): the Hopper tiles where they compile
# without spills there with Triton 3.6 and 3.9, else the nearest that does and still runs on tcgen05 (Blackwell's
# tensor-core MMA: 32 keys or fewer on the M side fall back to mma.sync). Hopper's spill there: dK/dV d128 in one
# launch 572 B (3.9) / 48 B (3.6; as two launches none), dQ d64 36 B (3.6), fwd d256 292 / 224 B, dQ d256 4 B (3.6),
# dK/dV d256's dK launch 516 / 84 B (with one pipeline stage, none; the dV launch spills 8 B with one, none with two)
_BLACKWELL_CONFIGS = {
    ("fwd", 2): ((128, KernelConfig(128, 64, 8, 3)), (256, KernelConfig(64, 32, 8, 2))),
    ("dq", 2): ((64, KernelConfig(64, 64, 4, 2)), (128, KernelConfig(128, 32, 8, 2)),
                (256, KernelConfig(64, 32, 8, 1))),
    ("dkdv", 2): ((64, KernelConfig(64, 128, 8, 2)), (128, KernelConfig(32, 128, 8, 2, dkdv_launches=2)),
                  (256, KernelConfig(16, 64, 8, 2, dkdv_launches=2, dk_stages=1))),
}
_INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}  # several tiles per sample in the small tests


def _kernel_config(kernel_name: str, dtype: torch.dtype, head_dim: int, blocks=None) -> KernelConfig:
    """The launch config: fixed ``blocks`` (``{"BLOCK_M", "BLOCK_N"}``, optionally ``"DKDV_LAUNCHES"``, ``"TMA"``,
    ``"WARP_SPECIALIZE"``, ``"PAIR_MASK"``, ``"DK_STAGES"``; 16 x 16
    when interpreting), else the shipped one for the dtype, head dim and the current GPU's family
    (:func:`_gpu_family`)."""
    if blocks is None and _INTERPRET:
        blocks = _INTERPRET_BLOCKS
    if blocks is not None:
        return KernelConfig(blocks["BLOCK_M"], blocks["BLOCK_N"], 4, 2, blocks.get("DKDV_LAUNCHES", 1),
                            blocks.get("TMA", False), blocks.get("WARP_SPECIALIZE", False),
                            blocks.get("PAIR_MASK", False), blocks.get("DK_STAGES", 0))
    block_d = max(16, triton.next_power_of_2(head_dim))
    configs = _FAMILY_CONFIGS[_gpu_family(triton.runtime.driver.active.get_current_target().arch)]
    return next(config for largest, config in configs[kernel_name, dtype.itemsize] if block_d <= largest)


# each family's whole table (its 16-bit tiles over the shared fp32 / fp64 ones), merged once
_FAMILY_CONFIGS = {"hopper": _CONFIGS, "blackwell": {**_CONFIGS, **_BLACKWELL_CONFIGS},
                   "mma": {**_CONFIGS, **_MMA_CONFIGS}}


def _gpu_family(arch) -> str:
    """Which tiles a target gets, from Triton's target arch (the compute capability as an int, e.g. 90; a string
    on ROCm): "hopper" (sm_90, wgmma), "blackwell" (sm_100-119, tcgen05), "mma" (every other: sm_80-89, sm_120 and
    later consumer parts, and anything unknown, whose tiles fit 99 KiB of shared memory and need no wgmma)."""
    if not isinstance(arch, int):
        return "hopper"  # ROCm: refused before any launch (unsupported_gpu); these are what rocm_compile.py compiles
    if arch == 90:
        return "hopper"
    return "blackwell" if 100 <= arch < 120 else "mma"


def _launch_config(kernel_name: str, q: torch.Tensor, blocks=None) -> KernelConfig:
    """:func:`_kernel_config` for a launch on ``q``'s device: the tiles of that GPU's family, whichever GPU is
    current (Triton reads the current device's target)."""
    with _device_guard(q.device):
        return _kernel_config(kernel_name, q.dtype, q.shape[-1], blocks)


def _device_guard(device: torch.device):
    """The context a launch runs in: ``torch.cuda.device(device)`` for a CUDA tensor, so the kernel runs on the
    tensors' GPU and its current stream, not on whichever GPU is current (with ``device_map="auto"`` over
    several GPUs that was an illegal address or a race with another device's stream; FlashAttention-2 and
    FlexAttention guard the same way); nothing for the CPU (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(kernel, grid, args, config: KernelConfig, **constexprs):
    """Launch ``kernel`` under its first argument's device (q for every kernel here); with ``config.tma`` it loads
    through TMA descriptors (``TMA=True``; descriptors made on a GPU need Triton's scratch allocator, set here).
    FP fusion is asked for, not left to Triton's default (off from Triton 3.10; 3.9 warns on every first compile):
    the tiles were chosen and counted with the forward's ``qk * scale - m`` as one FFMA an element."""
    device = args[0].device
    if config.tma:
        constexprs["TMA"] = True
        if device.type == "cuda":
            triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))
    with _device_guard(device):
        kernel[grid](*args, BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps,
                     num_stages=config.num_stages, enable_fp_fusion=True, **constexprs)


def _table_args(layout: KernelLayout, config: KernelConfig, by_row: bool):
    table = layout.block_table(config.block_m, config.block_n)
    return (table.row_bounds, table.row_order) if by_row else (table.col_bounds, table.col_order)


def _attention_forward(q, k, v, layout: KernelLayout, *, scale, out=None, blocks=None):
    """Forward launcher on checked, contiguous inputs: returns (out (T, Hq, D), lse (Hq, T), base 2); ``lse`` is a view
    of a buffer with padded rows (:func:`_row_stats`), which the backward reads as it is."""
    tokens, q_heads, head_dim = q.shape
    out = torch.empty_like(q) if out is None else out
    lse = _row_stats(q_heads, tokens, q.device, torch.float64 if q.dtype == torch.float64 else torch.float32)
    config = _launch_config("fwd", q, blocks)
    args = (q, k, v, out, lse, layout.kv_lo, layout.kv_hi, layout.gap_lo, layout.gap_hi,
            *_table_args(layout, config, by_row=True),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), tokens, lse.stride(0), q_heads // k.shape[1], scale * _LOG2E)
    extra = dict(WARP_SPECIALIZE=True) if config.warp_specialize else {}
    _launch(_fwd_kernel, (triton.cdiv(tokens, config.block_m), q_heads), args, config, HEAD_DIM=head_dim,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)), **_dtype_constexprs(q.dtype), **extra)
    return out, lse


def _attention_backward(do, q, k, v, out, lse, layout: KernelLayout, *, scale, grads=None, blocks=None):
    """Backward launcher: returns (dq, dk, dv); ``grads`` optionally supplies the three output buffers.

    The dQ kernel runs first: it also writes Delta = rowsum(dO * O), which the dK/dV kernel reads.
    """
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    dq, dk, dv = grads if grads is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    if not _padded_stats(lse, q_heads, tokens):  # not laid out as _attention_forward's: copied into such a buffer
        lse = _row_stats(q_heads, tokens, lse.device, lse.dtype).copy_(lse)
    delta = _row_stats(q_heads, tokens, lse.device, lse.dtype, zero=True)  # (Hq, T), written by the dQ kernel
    common = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), **_dtype_constexprs(q.dtype))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    config = _launch_config("dq", q, blocks)
    _launch(_bwd_dq_kernel, (triton.cdiv(tokens, config.block_m), q_heads),
            (q, k, v, out, do, lse, delta, dq, layout.kv_lo, layout.kv_hi, layout.gap_lo, layout.gap_hi,
             *_table_args(layout, config, by_row=True), *strides, out.stride(0), out.stride(1),
             do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), tokens, lse.stride(0), q_heads // kv_heads,
             scale * _LOG2E, scale), config, **common, **_pair_mask(config, q.dtype))
    config = _launch_config("dkdv", q, blocks)
    if _STATS_ALIGN % config.block_m:  # its last row block would read past the padded LSE / Delta
        raise ValueError(f"the dK/dV kernel's BLOCK_M must divide {_STATS_ALIGN}, got {config.block_m}")
    key_blocks, group = triton.cdiv(tokens, config.block_n), q_heads // kv_heads
    splits = _dkdv_splits(q.device, key_blocks * kv_heads, group, blocks)
    if splits == 1:
        dk_out, dv_out = dk, dv
    else:  # fp32 partial sums per split, (splits, T, Hkv, D); summed below in a fixed order (deterministic)
        acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        dk_out, dv_out = (torch.empty((splits, *x.shape), device=x.device, dtype=acc_dtype) for x in (dk, dv))
    args = (q, k, v, do, lse, delta, dk_out, dv_out, layout.q_lo, layout.q_hi,
            *_table_args(layout, config, by_row=False), *strides, do.stride(0), do.stride(1),
            *_split_strides(dk_out, splits), *_split_strides(dv_out, splits), tokens, lse.stride(0), group, splits,
            scale * _LOG2E,
            scale)
    # two launches where both accumulators do not fit in registers (head dim 256): dV (2 dots a tile), then dK (3)
    passes = [(True, True)] if config.dkdv_launches == 1 else [(False, True), (True, False)]
    # TMA: Q / dO by descriptors over (T, Hq x D), so a tile's columns must be one head's exactly
    if config.tma and common["BLOCK_D"] != head_dim:
        raise ValueError(f"the dK/dV kernel's TMA loads need a power-of-two head dim >= 16, got {head_dim}")
    for with_dk, with_dv in passes:
        dk_only = with_dk and not with_dv and config.dk_stages
        _launch(_bwd_dkdv_kernel, (key_blocks, kv_heads * splits), args,
                config._replace(num_stages=config.dk_stages) if dk_only else config, **common,
                **_pair_mask(config, q.dtype), WITH_DK=with_dk, WITH_DV=with_dv)
    if splits > 1:
        dk.copy_(dk_out.sum(0))
        dv.copy_(dv_out.sum(0))
    return dq, dk, dv


def _pair_mask(config: KernelConfig, dtype: torch.dtype) -> dict:
    """The backward kernels' ``PAIR_MASK`` flag for ``config.pair_mask``: their partial tiles then mask the 16-bit
    P / dS two elements an instruction (:func:`_keep_seen`); ValueError for 32- and 64-bit inputs, which have no
    16-bit tiles to mask."""
    if not config.pair_mask:
        return {}
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"pair_mask masks 16-bit P / dS tiles: it needs float16 or bfloat16 inputs, got {dtype}")
    if torch.version.hip and not _INTERPRET:
        raise ValueError("pair_mask is NVIDIA PTX: not for a ROCm GPU")
    return dict(PAIR_MASK=True)


_STATS_ALIGN = 256  # LSE / Delta rows are padded to a multiple of this (a multiple of every dK/dV BLOCK_M)


def _padded(tokens: int) -> int:
    return triton.cdiv(tokens, _STATS_ALIGN) * _STATS_ALIGN


def _row_stats(heads: int, tokens: int, device, dtype, zero: bool = False) -> torch.Tensor:
    """A (heads, tokens) per-row statistic (LSE, Delta): a view of a (heads, tokens padded to a multiple of 256)
    buffer. The dK/dV kernel's tiles reach up to BLOCK_M - 1 rows past ``tokens`` (the last row block), so it loads
    LSE and Delta without masks (a masked load is an ISETP and a SEL per element with Triton 3.6, and a tile loads
    2 x 16 of them a thread): those rows are never seen (P = 0 there: a select, or the pair mask's AND, clears
    whatever LSE holds), so LSE's padding only has to be in bounds, while Delta's must be finite (dS = P (dP - Delta)
    with P = 0): ``zero`` fills the buffer with zeros (the dQ kernel then stores rows < T only)."""
    make = torch.zeros if zero else torch.empty
    return make(heads, _padded(tokens), device=device, dtype=dtype)[:, :tokens]


def _padded_stats(x: torch.Tensor, heads: int, tokens: int) -> bool:
    """Whether ``x`` (heads, tokens) is laid out as :func:`_row_stats` makes it: rows ``_padded(tokens)`` apart, and
    storage for all of them (the dK/dV kernel reads up to the padded length unmasked)."""
    padded = _padded(tokens)
    return (x.stride() == (padded, 1) and x.untyped_storage().nbytes()
            >= (x.storage_offset() + heads * padded) * x.element_size())


def _split_strides(x: torch.Tensor, splits: int):
    """(split, token, head) strides of a dK/dV output: the gradient itself, or its (splits, T, Hkv, D) partials."""
    return (0, x.stride(0), x.stride(1)) if splits == 1 else (x.stride(0), x.stride(1), x.stride(2))


def _dkdv_splits(device: torch.device, programs: int, group: int, blocks=None) -> int:
    """Query-head splits of the dK/dV kernel: the fewest (a divisor of the GQA group) that give at least one
    program per SM (a 4k-token layout with 2 KV heads and 64-key blocks has 128 programs for 132 SMs); 1 on the
    CPU unless ``blocks["DKDV_SPLITS"]`` asks for more (tests)."""
    if blocks is not None and "DKDV_SPLITS" in blocks:
        return int(blocks["DKDV_SPLITS"])
    if device.type != "cuda":
        return 1
    return fewest_splits(programs, group, torch.cuda.get_device_properties(device).multi_processor_count)


def fewest_splits(programs: int, group: int, sms: int) -> int:
    """The fewest splits of a GQA group (a divisor of it) that give ``programs`` x splits >= ``sms``, else the group."""
    return next((s for s in range(1, group + 1) if group % s == 0 and programs * s >= sms), group)


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
    if not (math.isfinite(scale) and scale > 0):  # the forward takes each row's max of the unscaled scores
        raise ValueError(f"tte_attention needs a finite scale > 0, got {scale}")
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
    ``scale`` (finite, > 0) defaults to D ** -0.5. Returns (T, Hq, D) in q's dtype, and with ``return_lse`` also the
    natural-log log-sum-exp of each row's scaled scores, (Hq, T) float32 (float64 for float64 inputs;
    not differentiable). Many layers on one layout: :func:`prepare_layout` once, then
    :func:`tte_attention_with_layout`.
    """
    layout = prepare_layout(seq_ids, token_types, think_bidirectional=think_bidirectional,
                            cot_sees_query=cot_sees_query)
    return tte_attention_with_layout(q, k, v, layout, scale=scale, return_lse=return_lse)
