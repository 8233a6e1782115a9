"""Block-level visibility table of a packed TTE layout (FlexAttention's BlockMask idea, DESIGN.md §11).

For a tiling of the (rows x keys) score matrix into BLOCK_M x BLOCK_N tiles, the table lists, per row
block, the key blocks holding at least one visible pair, split into *partial* ones (the per-element mask
is needed) and *full* ones (every pair visible: no mask), and the same transposed per key block for the
dK/dV kernel. It is built once per layout and block shape with O(T) torch ops on the layout's device
(one host sync for the sizes) and shared by every layer and head; the kernels' inner loops then read one
int32 per tile.

Exactness comes from the column form of the mask (:func:`tte_flash.mask.mask_intervals`): the rows that
see key ``j`` are exactly ``[col_lo[j], col_hi[j])``, so a tile's visible-pair count is a sum of interval
overlaps, computed per (key, row block) pair the key's interval touches. Visited tiles are therefore the
non-empty ones (FlexAttention's block count) and a tile is full iff its count is BLOCK_M * BLOCK_N
(a tile overhanging the last token is never full).

CSR layout, for row block ``b``: ``row_blocks[row_offsets[2b]:row_offsets[2b+1]]`` are its partial key
blocks, ``row_blocks[row_offsets[2b+1]:row_offsets[2b+2]]`` its full ones, in increasing order; the
``col_*`` pair is the same per key block, listing row blocks.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class BlockTable(NamedTuple):
    block_m: int  # rows per tile
    block_n: int  # keys per tile
    row_offsets: torch.Tensor  # (2 * row_blocks + 1,) int32: partial, then full entries of each row block
    row_blocks: torch.Tensor  # (tiles,) int32: key block indices, grouped by row block
    col_offsets: torch.Tensor  # (2 * key_blocks + 1,) int32: partial, then full entries of each key block
    col_blocks: torch.Tensor  # (tiles,) int32: row block indices, grouped by key block
    tile_pairs: torch.Tensor  # (tiles,) int64: visible pairs per tile, in row_blocks order (accounting)
    tile_full: torch.Tensor  # (tiles,) bool: full tiles, in row_blocks order (accounting)


def _csr(group, is_full, member, groups):
    """Entries sorted by (group, partial before full, member) and the (2 * groups + 1,) offsets."""
    slot = group * 2 + is_full.long()  # (tiles,)
    order = torch.argsort(slot * (member.max() + 1 if member.numel() else 1) + member)
    counts = torch.bincount(slot, minlength=2 * groups)
    offsets = torch.zeros(2 * groups + 1, dtype=torch.int32, device=group.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets, member[order].to(torch.int32).contiguous(), order


def build_block_table(col_lo: torch.Tensor, col_hi: torch.Tensor, block_m: int, block_n: int) -> BlockTable:
    """The table of a layout given its exact column intervals ((T,) integer each, col_lo[j] <= j < col_hi[j])."""
    tokens = col_lo.numel()
    device = col_lo.device
    col_lo, col_hi = col_lo.long(), col_hi.long()
    row_blocks = -(-tokens // block_m)
    key_blocks = -(-tokens // block_n)
    first = col_lo // block_m  # (T,) the row blocks key j's interval touches: first..last
    span = (col_hi - 1) // block_m - first + 1
    key = torch.repeat_interleave(torch.arange(tokens, device=device), span)  # (pairs,): one per (key, row block)
    pair_start = torch.cumsum(span, 0) - span
    row_block = first[key] + torch.arange(key.numel(), device=device) - pair_start[key]
    m0 = row_block * block_m
    overlap = torch.minimum(col_hi[key], m0 + block_m) - torch.maximum(col_lo[key], m0)  # >= 1 by construction
    tile, inverse = torch.unique(row_block * key_blocks + key // block_n, sorted=True, return_inverse=True)
    pairs = torch.zeros(tile.numel(), dtype=torch.long, device=device).index_add_(0, inverse, overlap)
    full = pairs == block_m * block_n
    tile_row, tile_key = tile // key_blocks, tile % key_blocks
    row_offsets, row_entries, row_order = _csr(tile_row, full, tile_key, row_blocks)
    col_offsets, col_entries, _ = _csr(tile_key, full, tile_row, key_blocks)
    return BlockTable(block_m, block_n, row_offsets, row_entries, col_offsets, col_entries, pairs[row_order],
                      full[row_order])


def tile_counts(table: BlockTable) -> dict:
    """Visited / partial / full tiles and visible pairs over computed pairs (every visited tile has a visible pair)."""
    visited = table.row_blocks.numel()
    visible = int(table.tile_pairs.sum())
    full = int(table.tile_full.sum())
    computed = visited * table.block_m * table.block_n
    return dict(block_m=table.block_m, block_n=table.block_n, visited=visited, with_visible_pair=visited,
                partial=visited - full, full=full, visible_pairs=visible,
                visible_over_computed=visible / computed if computed else 0.0)
