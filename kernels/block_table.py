"""Block-level visibility table of a packed TTE layout as per-block ranges (DESIGN.md §11).

For a tiling of the (rows x keys) score matrix into BLOCK_M x BLOCK_N tiles, the table says, per row
block, which key blocks hold at least one visible pair, split into *partial* ones (the per-element mask
is needed) and *full* ones (every pair visible: no mask), and the same transposed per key block for the
dK/dV kernel. This is FlexAttention's BlockMask (per row block the key blocks to visit and which are
full), stored not as a list of blocks but as ranges, as FlashMask stores a mask as column bounds: for
the TTE mask a block's visible blocks are a contiguous range with a few sub-ranges cut out, so the
table is O(T / BLOCK) int32 whatever the sample lengths (one 128k-token sample: kilobytes, where a
list of tiles grows with the sample's length squared), built with O(T) torch ops on the layout's device
and no host sync, once per layout and block shape and shared by every layer and head.

Format: ``row_bounds`` is ``(row blocks, 8)`` int32, ``col_bounds`` ``(key blocks, 8)``. For one block
the 8 non-decreasing bounds ``b0..b7`` cut ``[b0, b7)`` into seven ranges of the other side's blocks::

    [b0, b1) partial   [b1, b2) full   [b2, b3) partial   [b3, b4) skipped
    [b4, b5) partial   [b5, b6) full   [b6, b7) partial

A kernel visits the partial ranges in increasing block order (its masked loop), then the full ones
(its mask-free loop), one inner ``for`` per range (``tte_attention._segments``): two scalar loads per
range, none per tile. The order is the one a sorted list of the same tiles would give. The key-block
side has one full range only, and its ``b2 .. b6`` are equal: the dK/dV kernel walks b0-b1, b6-b7
(partial) and b1-b2 (full) only.

Why ranges are exact (the intervals are :func:`tte_flash.mask.mask_intervals`'s):

* *Key block, rows that see it* (``col_bounds``): the rows that see key ``j`` are one interval
  ``[col_lo[j], col_hi[j])`` containing ``j``; over a block of consecutive keys their union is one
  interval, so the visited row blocks are one range, and the rows that see every key of the block (the
  intersection) one range inside it: partial ``[b0, b1)``, full ``[b1, b2)``, partial ``[b6, b7)``, the
  ranges between empty (``b2 == ... == b6``).
* *Row block, keys it sees* (``row_bounds``): row ``i`` sees ``[row_lo[i], row_hi[i])`` (which contains
  ``i``) minus the gap ``[gap_lo[i], gap_hi[i])`` (the EMB span, for COT rows only). The union over
  consecutive rows is one interval; a key inside it is unseen only if every row whose interval holds it
  is a COT row with it in the gap, which happens only for the EMB keys of the block's first sample when
  the block starts inside that sample's COT span (any later sample's EMB rows are in the block, and they
  see the EMB keys). Whole key blocks of such EMB keys are the skipped range ``[b3, b4)``. A tile is full
  iff its keys lie in every row's interval (the intersection ``[max row_lo, min row_hi)``, empty when the
  block spans two samples or overhangs ``T``) and outside the gap of any COT row in the block (the same
  EMB span for all of them): two ranges, before and after that span.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

BOUNDS = 8  # int32 bounds per block


class BlockTable(NamedTuple):
    block_m: int  # rows per tile
    block_n: int  # keys per tile
    row_bounds: torch.Tensor  # (row blocks, 8) int32: key-block ranges of each row block (module docstring)
    col_bounds: torch.Tensor  # (key blocks, 8) int32: row-block ranges of each key block
    visible_pairs: torch.Tensor  # () int64: visible (row, key) pairs of the layout (all inside visited tiles)


def _blocks(x: torch.Tensor, block: int, fill: int) -> torch.Tensor:
    """(T,) -> (ceil(T / block), block) int64, the tail padded with ``fill``."""
    tokens = x.numel()
    padded = torch.full((-(-tokens // block) * block,), fill, dtype=torch.long, device=x.device)
    padded[:tokens] = x
    return padded.view(-1, block)


def _ceil_div(x: torch.Tensor, d: int) -> torch.Tensor:
    return -torch.div(-x, d, rounding_mode="floor")


def _ranges(lo: torch.Tensor, hi: torch.Tensor, block: int):
    """Whole blocks inside the key (or row) intervals [lo, hi): (first, end), end <= first when none."""
    return _ceil_div(lo, block), torch.div(hi, block, rounding_mode="floor")


def _chain(v0: torch.Tensor, v1: torch.Tensor, cuts) -> torch.Tensor:
    """(n, 8) bounds of the visited range [v0, v1) with three ordered sub-ranges cut out (full, skipped,
    full, as (start, end) each); an empty cut collapses onto the previous bound so the bounds stay sorted."""
    bounds, last = [v0], v0
    for start, end in cuts:
        start, end = torch.maximum(start, last), torch.minimum(end, v1)
        empty = start >= end
        start, end = torch.where(empty, last, start), torch.where(empty, last, end)
        bounds += [start, end]
        last = end
    bounds.append(torch.maximum(v1, last))
    return torch.stack(bounds, 1).to(torch.int32).contiguous()


def build_block_table(row_lo, row_hi, gap_lo, gap_hi, col_lo, col_hi, block_m: int, block_n: int) -> BlockTable:
    """The table of a layout given its exact intervals ((T,) integer each, as :class:`MaskIntervals`: row ``i``
    sees ``[row_lo, row_hi)`` minus ``[gap_lo, gap_hi)``; the rows that see key ``j`` are ``[col_lo, col_hi)``).
    O(T) time and memory, no host sync."""
    tokens = col_lo.numel()
    big = tokens + max(block_m, block_n)  # past every bound: a padding row/key sees nothing, intersects all
    row_lo, row_hi, gap_lo, gap_hi, col_lo, col_hi = (x.long() for x in (row_lo, row_hi, gap_lo, gap_hi, col_lo,
                                                                        col_hi))

    # per row block: the keys its rows see (union), see all (intersection), and the EMB gap of its COT rows
    union_lo = _blocks(row_lo, block_m, big).amin(1)
    union_hi = _blocks(row_hi, block_m, 0).amax(1)
    common_lo = _blocks(row_lo, block_m, big).amax(1)
    common_hi = _blocks(row_hi, block_m, 0).amin(1)  # common_lo >= common_hi: no full tile
    emb_lo = _blocks(gap_lo, block_m, 0).amax(1)  # one sample's COT rows share one gap
    emb_hi = _blocks(gap_hi, block_m, 0).amax(1)
    first = torch.arange(union_lo.numel(), device=col_lo.device) * block_m  # the block's first row
    v0, v1 = torch.div(union_lo, block_n, rounding_mode="floor"), _ceil_div(union_hi, block_n)
    full_lo, full_hi = _ranges(common_lo, common_hi, block_n)
    has_gap = emb_hi > emb_lo
    before_gap_hi = torch.where(has_gap, torch.minimum(full_hi, torch.div(emb_lo, block_n, rounding_mode="floor")),
                                full_hi)
    after_gap_lo = torch.where(has_gap, torch.maximum(full_lo, _ceil_div(emb_hi, block_n)), full_hi)
    # a block starting inside a sample's COT span does not see that sample's EMB keys: skip whole blocks of them
    skip_lo, skip_hi = _ranges(gap_lo[first], gap_hi[first], block_n) if tokens else (v0, v0)
    row_bounds = _chain(v0, v1, [(full_lo, before_gap_hi), (skip_lo, skip_hi), (after_gap_lo, full_hi)])

    # per key block: the rows that see one of its keys (union), see all of them (intersection)
    union_lo = _blocks(col_lo, block_n, big).amin(1)
    union_hi = _blocks(col_hi, block_n, 0).amax(1)
    full_lo, full_hi = _ranges(_blocks(col_lo, block_n, big).amax(1), _blocks(col_hi, block_n, 0).amin(1), block_m)
    c0, c3 = torch.div(union_lo, block_m, rounding_mode="floor"), _ceil_div(union_hi, block_m)
    col_bounds = _chain(c0, c3, [(full_lo, full_hi), (c3, c3), (c3, c3)])

    visible = (col_hi - col_lo).sum()
    return BlockTable(block_m, block_n, row_bounds, col_bounds, visible)


def range_counts(bounds: torch.Tensor):
    """(partial, full) blocks of each row of a bounds tensor ((n, 8) -> two (n,) int64)."""
    b = bounds.long()
    partial = (b[:, 1] - b[:, 0]) + (b[:, 3] - b[:, 2]) + (b[:, 5] - b[:, 4]) + (b[:, 7] - b[:, 6])
    return partial, (b[:, 2] - b[:, 1]) + (b[:, 6] - b[:, 5])


def tile_counts(table: BlockTable) -> dict:
    """Visited / partial / full tiles and visible pairs over computed pairs (every visited tile has a visible pair)."""
    partial, full = (int(x.sum()) for x in range_counts(table.row_bounds))
    visited = partial + full
    visible = int(table.visible_pairs)
    computed = visited * table.block_m * table.block_n
    return dict(block_m=table.block_m, block_n=table.block_n, visited=visited, with_visible_pair=visited,
                partial=partial, full=full, visible_pairs=visible,
                visible_over_computed=visible / computed if computed else 0.0)


def tiles(table: BlockTable, by_row: bool = True):
    """Every visited tile in a kernel's visiting order: (group, member, full), (tiles,) each, where a group is a
    row block (``by_row``) or a key block; per group its partial members, then its full ones, each ascending.
    Materialises the tiles (O(tiles)): for tests and accounting, never on the launch path."""
    bounds = (table.row_bounds if by_row else table.col_bounds).long()
    groups = torch.arange(bounds.shape[0], device=bounds.device)
    parts = []
    for kind, (lo, hi) in enumerate([(0, 1), (2, 3), (4, 5), (6, 7), (1, 2), (5, 6)]):  # partial x4, full x2
        size = bounds[:, hi] - bounds[:, lo]
        group = torch.repeat_interleave(groups, size)
        start = torch.cumsum(size, 0) - size
        member = bounds[group, lo] + torch.arange(group.numel(), device=bounds.device) - start[group]
        parts.append((group, member, torch.full_like(group, int(kind >= 4))))
    group, member, full = (torch.cat(x) for x in zip(*parts))
    order = torch.argsort((group * 2 + full) * (bounds.max() + 1 if bounds.numel() else 1) + member)
    return group[order], member[order], full[order].bool()


def tile_pairs(row_block: torch.Tensor, key_block: torch.Tensor, col_lo: torch.Tensor, col_hi: torch.Tensor,
               block_m: int, block_n: int, chunk: int = 1 << 16) -> torch.Tensor:
    """Visible pairs of each tile (row block, key block) from the column intervals: for each key of the
    tile, the overlap of its rows with the block's; O(tiles * BLOCK_N), in chunks (accounting only)."""
    tokens = col_lo.numel()
    lo, hi = _blocks(col_lo.long(), block_n, 0), _blocks(col_hi.long(), block_n, 0)  # padding keys: empty
    out = torch.empty(row_block.numel(), dtype=torch.long, device=col_lo.device)
    for start in range(0, row_block.numel(), chunk):
        rb, kb = row_block[start:start + chunk].long(), key_block[start:start + chunk].long()
        m0 = (rb * block_m)[:, None]
        m1 = torch.clamp(m0 + block_m, max=tokens)
        overlap = torch.minimum(hi[kb], m1) - torch.maximum(lo[kb], m0)
        out[start:start + chunk] = overlap.clamp(min=0).sum(1)
    return out
