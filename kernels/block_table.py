"""Block-level visibility table of a packed TTE layout, with a mask class per tile (DESIGN.md §3, §11).

For a tiling of the (rows x keys) score matrix into BLOCK_M x BLOCK_N tiles, the table says, per row
block, which key blocks hold at least one visible pair and, for each, which of the mask's tests can fail
inside it (the tile's *kind*); and the same per key block for the dK/dV kernel. A kernel runs one loop per
kind, compiled with only that kind's tests, so a tile cut only by the causal diagonal compares ``j < row_hi``
and nothing else, and a tile every pair of which is visible compares nothing. This is FlexAttention's
BlockMask (per row block the key blocks to visit, full ones apart) with FlashMask's bounds (a partial tile's
mask from int32 bounds compared in registers), split one step further by which bound cuts the tile.

Kinds (the tests a kernel applies; row i, key j; the intervals are :func:`tte_flash.mask.mask_intervals`'s)::

    FULL       0  none: every pair of the tile is visible
    CUT_LO     1  j >= row_lo[i] only (a sample start, or a COT row that does not see its QUERY span)
    CUT_HI     2  j < row_hi[i] only (the causal diagonal, the end of a bidirectional THINK span, T)
    CUT_LO_HI  3  both (a tile across a sample boundary on the diagonal, short samples)
    CUT_ANY    4  both and not gap_lo[i] <= j < gap_hi[i] (COT rows x the EMB span: the only gap)

For a key block (the dK/dV kernel: rows that see key j are ``[col_lo[j], col_hi[j])``), CUT_LO tests
``i >= col_lo[j]``, CUT_HI ``i < col_hi[j]``; there is no gap, so no CUT_ANY.

Why each kind is one or two ranges of blocks (row side; the key side is the same with rows and keys
swapped and no gap). Over the real rows of a row block (padding rows past ``T`` are ignored: their
outputs are never stored), let ``L = max row_lo``, ``H = min row_hi``, and ``[G0, G1)`` span every
COT row's gap. In key block ``b`` (keys ``[b*BN, (b+1)*BN)``) the LO test can fail only if
``b*BN < L`` (a prefix of the blocks), the HI test only if ``(b+1)*BN > H`` (a suffix: it holds
every block past ``T``, since ``row_hi <= T``), the gap test only if the block meets ``[G0, G1)`` (a
middle range). So of the visited range (below) the kind of block ``b`` is CUT_ANY inside the gap range,
else FULL / CUT_LO / CUT_HI / CUT_LO_HI by the two conditions: each kind is a range minus the gap
range, at most two ranges. A kind whose tests do not include HI holds no block past ``T``: it loads
its tiles unmasked.

Visited blocks (every one holds a visible pair): the keys a row block sees are one interval (the union of
its rows' intervals, each of which contains its row) except, for COT rows, the EMB gap: a key in the union
is unseen only if every row that holds it is a COT row with it in its gap, which happens only for the EMB
keys of the block's first sample when the block starts inside that sample's COT span (a later sample's EMB
row is in the block and sees them). Whole key blocks of such EMB keys (inside the gap range) are left out
of CUT_ANY's range: that range minus this *skipped* one, two ranges again.

Format: ``row_bounds`` is ``(row blocks, 5 kinds x 2 ranges x 2)`` int32 and ``col_bounds`` ``(key blocks,
4 kinds x 1 range x 2)``: for kind ``k`` and range ``r`` the other side's blocks ``[start, end)`` sit at
``4k + 2r`` (row side) or ``2k`` (key side); an empty range is ``(0, 0)``. A kernel walks the partial kinds
in increasing order, then FULL, each range in increasing block order: two scalar loads per range, none per tile.
``row_order`` / ``col_order`` list each side's blocks with the most tiles first: a program's first load maps its
program id to its block, so the longest programs start first (:func:`_longest_first`). The
table is O(T / BLOCK) int32 whatever the sample lengths (one 128k-token sample: kilobytes), built with O(T)
torch ops on the layout's device and no host sync, once per layout and block shape, and shared by every
layer and head.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

FULL, CUT_LO, CUT_HI, CUT_LO_HI, CUT_ANY = range(5)  # tile kinds: the mask tests a tile needs (docstring)
KIND_NAMES = {FULL: "full", CUT_LO: "cut_lo", CUT_HI: "cut_hi", CUT_LO_HI: "cut_lo_hi", CUT_ANY: "cut_any"}
ROW_KINDS, ROW_RANGES = 5, 2  # row side: every kind, each up to two ranges (a range minus the gap range)
COL_KINDS, COL_RANGES = 4, 1  # key side: no gap, so no CUT_ANY and one range per kind
ROW_BOUNDS, COL_BOUNDS = ROW_KINDS * ROW_RANGES * 2, COL_KINDS * COL_RANGES * 2  # int32 per block


class BlockTable(NamedTuple):
    block_m: int  # rows per tile
    block_n: int  # keys per tile
    row_bounds: torch.Tensor  # (row blocks, 20) int32: key-block ranges of each kind per row block (docstring)
    col_bounds: torch.Tensor  # (key blocks, 8) int32: row-block ranges of each kind per key block
    visible_pairs: torch.Tensor  # () int64: visible (row, key) pairs of the layout (all inside visited tiles)
    row_order: torch.Tensor  # (row blocks,) int32: the row blocks, most tiles first (ties: lower block first)
    col_order: torch.Tensor  # (key blocks,) int32: the key blocks, most tiles first


def _blocks(x: torch.Tensor, block: int, fill: int) -> torch.Tensor:
    """(T,) -> (ceil(T / block), block) int64, the tail padded with ``fill``."""
    tokens = x.numel()
    padded = torch.full((-(-tokens // block) * block,), fill, dtype=torch.long, device=x.device)
    padded[:tokens] = x
    return padded.view(-1, block)


def _ceil_div(x: torch.Tensor, d: int) -> torch.Tensor:
    return -torch.div(-x, d, rounding_mode="floor")


def _floor_div(x: torch.Tensor, d: int) -> torch.Tensor:
    return torch.div(x, d, rounding_mode="floor")


def _minus(start, end, cut_start, cut_end):
    """[start, end) minus [cut_start, cut_end) as two ranges (an empty cut must be given as (big, big))."""
    return [(start, torch.minimum(end, cut_start)), (torch.maximum(start, cut_end), end)]


def _pack(ranges) -> torch.Tensor:
    """(n, 2 * len(ranges)) int32 of (start, end) pairs, an empty range written (0, 0)."""
    columns = []
    for start, end in ranges:
        empty = end <= start
        columns += [torch.where(empty, 0, start), torch.where(empty, 0, end)]
    return torch.stack(columns, 1).to(torch.int32).contiguous()


def _kind_ranges(first, end, lo_end, hi_start):
    """(start, end) of FULL, CUT_LO, CUT_HI, CUT_LO_HI in the visited blocks [first, end): the LO test can fail in
    blocks < lo_end, the HI test in blocks >= hi_start."""
    return [(torch.maximum(first, lo_end), torch.minimum(end, hi_start)),
            (first, torch.minimum(torch.minimum(lo_end, hi_start), end)),
            (torch.maximum(torch.maximum(lo_end, hi_start), first), end),
            (torch.maximum(hi_start, first), torch.minimum(lo_end, end))]


def _side(lo, hi, block: int, other: int, big: int):
    """Per block of ``block`` tokens (real tokens only): its visited range of ``other``-blocks and the block
    bounds of its LO / HI tests, from the token intervals [lo, hi) of the other side."""
    first = _floor_div(_blocks(lo, block, big).amin(1), other)
    end = _ceil_div(_blocks(hi, block, 0).amax(1), other)
    lo_end = _ceil_div(_blocks(lo, block, 0).amax(1), other)  # LO can fail only in blocks < lo_end
    hi_start = _floor_div(_blocks(hi, block, big).amin(1), other)  # HI can fail only in blocks >= hi_start
    return first, end, lo_end, hi_start


def build_block_table(row_lo, row_hi, gap_lo, gap_hi, col_lo, col_hi, block_m: int, block_n: int) -> BlockTable:
    """The table of a layout given its exact intervals ((T,) integer each, as :class:`MaskIntervals`: row ``i``
    sees ``[row_lo, row_hi)`` minus ``[gap_lo, gap_hi)``; the rows that see key ``j`` are ``[col_lo, col_hi)``).
    O(T) time and memory, no host sync."""
    tokens = col_lo.numel()
    big = tokens + max(block_m, block_n)  # past every bound: padding tokens drop out of every min / max
    nowhere = -(-big // min(block_m, block_n)) + 1  # a block index past every block: an empty cut
    row_lo, row_hi, gap_lo, gap_hi, col_lo, col_hi = (x.long() for x in (row_lo, row_hi, gap_lo, gap_hi, col_lo,
                                                                        col_hi))
    # row side: the four kinds of the gap-free test, minus the blocks meeting a COT row's gap (CUT_ANY)
    first, end, lo_end, hi_start = _side(row_lo, row_hi, block_m, block_n, big)
    has_gap = gap_hi > gap_lo
    gap_first = _floor_div(_blocks(torch.where(has_gap, gap_lo, big), block_m, big).amin(1), block_n)
    gap_end = _ceil_div(_blocks(torch.where(has_gap, gap_hi, 0), block_m, 0).amax(1), block_n)
    no_gap = gap_end <= gap_first
    gap_first, gap_end = torch.where(no_gap, nowhere, gap_first), torch.where(no_gap, nowhere, gap_end)
    # a block starting inside a sample's COT span sees none of that sample's EMB keys: skip whole blocks of them
    starts = torch.arange(first.numel(), device=col_lo.device) * block_m
    skip_first = _ceil_div(gap_lo[starts], block_n) if tokens else first
    skip_end = _floor_div(gap_hi[starts], block_n) if tokens else first
    no_skip = skip_end <= skip_first
    skip_first, skip_end = torch.where(no_skip, nowhere, skip_first), torch.where(no_skip, nowhere, skip_end)
    ranges = []
    for start, stop in _kind_ranges(first, end, lo_end, hi_start):
        ranges += _minus(start, stop, gap_first, gap_end)
    ranges += _minus(torch.maximum(gap_first, first), torch.minimum(gap_end, end), skip_first, skip_end)
    row_bounds = _pack(ranges)

    # key side: rows that see key j are one interval, so no gap and one range per kind
    col_bounds = _pack(_kind_ranges(*_side(col_lo, col_hi, block_n, block_m, big)))
    visible = (col_hi - col_lo).sum()
    return BlockTable(block_m, block_n, row_bounds, col_bounds, visible, _longest_first(row_bounds),
                      _longest_first(col_bounds))


def _longest_first(bounds: torch.Tensor) -> torch.Tensor:
    """The blocks of one side ordered by their visited tiles, most first, ties in block order (int32): a kernel's
    program ``p`` takes block ``order[p]``, so the GPU starts the longest programs first and ends on short ones
    (longest-processing-time-first: a causal sample's last row blocks and first key blocks hold the most tiles)."""
    tiles = (bounds[:, 1::2].long() - bounds[:, 0::2].long()).sum(1)
    return torch.sort(tiles, descending=True, stable=True).indices.to(torch.int32)


def _ranges(table: BlockTable, by_row: bool) -> torch.Tensor:
    """(blocks, kinds, ranges, 2) int64 view of one side's bounds."""
    bounds = table.row_bounds if by_row else table.col_bounds
    kinds, ranges = (ROW_KINDS, ROW_RANGES) if by_row else (COL_KINDS, COL_RANGES)
    return bounds.long().view(-1, kinds, ranges, 2)


def visiting_order(by_row: bool = True) -> list:
    """The order the kernels visit one side's kinds in: the partial kinds in increasing order, then FULL."""
    return list(range(1, ROW_KINDS if by_row else COL_KINDS)) + [FULL]


def kind_counts(table: BlockTable, by_row: bool = True) -> torch.Tensor:
    """(blocks, kinds) int64: tiles of each kind per block of one side."""
    ranges = _ranges(table, by_row)
    return (ranges[..., 1] - ranges[..., 0]).sum(2)


def tile_counts(table: BlockTable) -> dict:
    """Visited / partial / full tiles, tiles of each kind (row side) and visible pairs over computed pairs (every
    visited tile has a visible pair)."""
    per_kind = [int(x) for x in kind_counts(table).sum(0)] if table.row_bounds.numel() else [0] * ROW_KINDS
    visited, full = sum(per_kind), per_kind[FULL]
    visible = int(table.visible_pairs)
    computed = visited * table.block_m * table.block_n
    return dict(block_m=table.block_m, block_n=table.block_n, visited=visited, with_visible_pair=visited,
                partial=visited - full, full=full, **{KIND_NAMES[k]: per_kind[k] for k in KIND_NAMES if k != FULL},
                visible_pairs=visible, visible_over_computed=visible / computed if computed else 0.0)


def tile_kinds(table: BlockTable, by_row: bool = True):
    """Every visited tile in a kernel's visiting order: (group, member, kind), (tiles,) int64 each, where a group is
    a row block (``by_row``) or a key block; per group its kinds in :func:`visiting_order`, each kind's ranges in
    order, members ascending. Materialises the tiles (O(tiles)): for tests and accounting, never on a launch path."""
    order = torch.tensor(visiting_order(by_row))
    ranges = _ranges(table, by_row)[:, order]
    blocks, kinds, per_kind = ranges.shape[:3]
    start, size = ranges[..., 0].reshape(blocks, -1), (ranges[..., 1] - ranges[..., 0]).reshape(blocks, -1)
    slot = torch.arange(kinds * per_kind, device=ranges.device).expand(blocks, -1)
    group = torch.arange(blocks, device=ranges.device)[:, None].expand(-1, kinds * per_kind)
    start, size, slot, group = (x.reshape(-1) for x in (start, size, slot, group))  # (group, kind, range) order
    tile_slot = torch.repeat_interleave(torch.arange(size.numel(), device=ranges.device), size)
    offset = torch.arange(tile_slot.numel(), device=ranges.device) - (torch.cumsum(size, 0) - size)[tile_slot]
    return group[tile_slot], start[tile_slot] + offset, order[torch.div(slot[tile_slot], per_kind, rounding_mode="floor")]


def tiles(table: BlockTable, by_row: bool = True):
    """Every visited tile: (group, member, full), (tiles,) each, in the kernels' visiting order (:func:`tile_kinds`)."""
    group, member, kind = tile_kinds(table, by_row)
    return group, member, kind == FULL


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
