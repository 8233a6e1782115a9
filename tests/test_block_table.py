"""The kernels' block table (``tte_flash.kernels.block_table``) as ranges equals the tile lists of the
earlier construction (kept below as the reference: one entry per (key, row block) pair a key's rows
touch, O(sum of sample lengths squared)), tile by tile, in the kernels' visiting order, with the same
full/partial split and pair counts, on random packed layouts; and it stays O(T) for one long sample.

No kernel launch here: the table is pure torch arithmetic (the kernel's use of it is tested against the
float64 oracle in ``test_kernel.py``).
"""
import random

import pytest
import torch

from tte_flash.kernels.block_table import build_block_table, tile_counts, tile_pairs, tiles
from tte_flash.mask import COT, EMB, QUERY, THINK, dense_mask, mask_intervals

BLOCKS = [(16, 16), (32, 16), (16, 32), (64, 32), (128, 64), (16, 64), (128, 32)]


def layout(samples):
    """seq_ids (int32) and token_types (uint8) of samples given as (query, think, emb, cot) lengths."""
    seq, types = [], []
    for index, lengths in enumerate(samples):
        for kind, count in zip((QUERY, THINK, EMB, COT), lengths):
            seq += [index] * count
            types += [kind] * count
    return torch.tensor(seq, dtype=torch.int32), torch.tensor(types, dtype=torch.uint8)


def intervals(samples, think_bidirectional, cot_sees_query):
    seq, types = layout(samples)
    bounds = mask_intervals(seq, types, think_bidirectional=think_bidirectional, cot_sees_query=cot_sees_query)
    return [x.to(torch.int32) for x in bounds]  # as prepare_layout keeps them


def reference_tiles(col_lo, col_hi, block_m, block_n):
    """The earlier builder: every (key, row block) pair a key's row interval touches, summed per tile.
    Returns (row side, key side, pairs): [(group, member, full)] per side, each group's partial members
    then its full ones, ascending; and the visible pairs of each row-side tile."""
    tokens = col_lo.numel()
    col_lo, col_hi = col_lo.long(), col_hi.long()
    key_blocks = -(-tokens // block_n)
    first = col_lo // block_m
    span = (col_hi - 1) // block_m - first + 1
    key = torch.repeat_interleave(torch.arange(tokens), span)
    pair_start = torch.cumsum(span, 0) - span
    row_block = first[key] + torch.arange(key.numel()) - pair_start[key]
    m0 = row_block * block_m
    overlap = torch.minimum(col_hi[key], m0 + block_m) - torch.maximum(col_lo[key], m0)
    tile, inverse = torch.unique(row_block * key_blocks + key // block_n, sorted=True, return_inverse=True)
    pairs = torch.zeros(tile.numel(), dtype=torch.long).index_add_(0, inverse, overlap)
    full = (pairs == block_m * block_n).tolist()
    rows, keys = (tile // key_blocks).tolist(), (tile % key_blocks).tolist()
    pairs_of = dict(zip(zip(rows, keys), pairs.tolist()))
    by_row = sorted(zip(rows, keys, full), key=lambda t: (t[0], t[2], t[1]))
    by_key = sorted(zip(keys, rows, full), key=lambda t: (t[0], t[2], t[1]))
    return by_row, by_key, [pairs_of[r, k] for r, k, _ in by_row]


def assert_table_equals_reference(samples, think_bidirectional, cot_sees_query, block_m, block_n):
    bounds = intervals(samples, think_bidirectional, cot_sees_query)
    table = build_block_table(*bounds, block_m, block_n)
    by_row, by_key, pairs = reference_tiles(bounds[4], bounds[5], block_m, block_n)
    got_row = list(zip(*(x.tolist() for x in tiles(table, by_row=True))))
    got_key = list(zip(*(x.tolist() for x in tiles(table, by_row=False))))
    context = f"{samples} bidir={think_bidirectional} cot_sees_query={cot_sees_query} {block_m}x{block_n}"
    assert got_row == by_row, context
    assert got_key == by_key, context
    rows, keys = torch.tensor([t[:2] for t in by_row], dtype=torch.long).view(-1, 2).T
    assert tile_pairs(rows, keys, bounds[4], bounds[5], block_m, block_n).tolist() == pairs, context
    counts = tile_counts(table)
    assert counts["visited"] == len(by_row) and counts["full"] == sum(f for *_, f in by_row), context
    assert counts["visible_pairs"] == sum(pairs), context
    tokens = bounds[0].numel()
    assert table.row_bounds.shape == (-(-tokens // block_m), 8) and table.col_bounds.shape == (-(-tokens // block_n), 8)
    for b in (table.row_bounds, table.col_bounds):
        assert b.dtype == torch.int32 and (b.diff(dim=1) >= 0).all(), context
    # the dK/dV kernel walks a key block's b0-b1, b6-b7 (partial) and b1-b2 (full) only
    assert (table.col_bounds[:, 2:7] == table.col_bounds[:, 2:3]).all(), context
    return table


def random_samples(rng, tokens=None):
    """1-8 samples with odd lengths, EMB spans of 0, 1 or longer than a block; with ``tokens``, padded with one
    query-only sample to exactly that many tokens."""
    samples = []
    for _ in range(rng.randint(1, 8)):
        lengths = (rng.choice([0, rng.randint(0, 41)]), rng.choice([0, 1, 3, 16, 33]),
                   rng.choice([0, 1, 1, 1, 2, 17, 40]), rng.choice([0, 1, 5, 19, 51]))
        samples.append(lengths if sum(lengths) else (1, 0, 0, 0))
    if tokens is not None:
        used = sum(map(sum, samples))
        samples.append((tokens - used, 0, 0, 0) if tokens > used else (rng.randint(1, 15), 0, 0, 0))
    return samples


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("think_bidirectional, cot_sees_query", [(False, True), (True, True), (False, False),
                                                                  (True, False)])
def test_random_packings_equal_the_reference(seed, think_bidirectional, cot_sees_query):
    rng = random.Random(seed * 4 + 2 * think_bidirectional + cot_sees_query)
    for _ in range(20):
        samples = random_samples(rng)
        assert_table_equals_reference(samples, think_bidirectional, cot_sees_query, *rng.choice(BLOCKS))


@pytest.mark.parametrize("think_bidirectional, cot_sees_query", [(False, True), (True, False)])
@pytest.mark.parametrize("tokens", [256, 512, 1024])
def test_token_count_a_multiple_of_16(tokens, think_bidirectional, cot_sees_query):
    """T % 16 == 0 (and a multiple of every block size): no tile overhangs the last token, the last ones can be full."""
    rng = random.Random(tokens)
    for block_m, block_n in BLOCKS:
        samples = random_samples(rng, tokens)
        if sum(map(sum, samples)) % 16 == 0:
            assert_table_equals_reference(samples, think_bidirectional, cot_sees_query, block_m, block_n)
    for block_m, block_n in BLOCKS:
        assert_table_equals_reference([(tokens - 40, 16, 1, 23)], think_bidirectional, cot_sees_query,
                                      block_m, block_n)


@pytest.mark.parametrize("samples", [
    [(2900, 16, 1, 128)],  # one long training sample
    [(3001, 0, 0, 0)],  # plain causal, odd length
    [(5, 3, 1, 7), (2500, 16, 1, 300), (9, 0, 1, 0)],  # long sample between short ones
    [(1000, 33, 200, 700)],  # EMB span of 200: row blocks inside the COT skip its key blocks
])
@pytest.mark.parametrize("think_bidirectional, cot_sees_query", [(False, True), (True, True), (True, False)])
def test_one_long_sample(samples, think_bidirectional, cot_sees_query):
    for block_m, block_n in [(16, 16), (128, 64), (16, 64), (64, 32)]:
        assert_table_equals_reference(samples, think_bidirectional, cot_sees_query, block_m, block_n)


def test_matches_the_dense_mask_tile_by_tile():
    """Independently of the reference builder: visited = tiles with a visible pair, full = all pairs visible."""
    samples = [(3, 2, 40, 35), (2, 0, 20, 5), (17, 16, 1, 9), (1, 0, 0, 0)]
    seq, types = layout(samples)
    for think_bidirectional in (False, True):
        for cot_sees_query in (False, True):
            mask = dense_mask(seq, types, think_bidirectional=think_bidirectional, cot_sees_query=cot_sees_query)
            for block_m, block_n in BLOCKS[:4]:
                table = build_block_table(*intervals(samples, think_bidirectional, cot_sees_query), block_m, block_n)
                tokens = seq.numel()
                rows, keys = -(-tokens // block_m) * block_m, -(-tokens // block_n) * block_n
                padded = torch.zeros(rows, keys, dtype=torch.long)
                padded[:tokens, :tokens] = mask.long()
                pairs = padded.view(rows // block_m, block_m, keys // block_n, block_n).sum((1, 3))
                row, key, full = tiles(table)
                assert sorted(map(list, zip(row.tolist(), key.tolist()))) == pairs.nonzero().tolist()
                assert full.tolist() == (pairs[row, key] == block_m * block_n).tolist()


@pytest.mark.parametrize("block_m, block_n", [(16, 16), (16, 64), (128, 64)])
def test_128k_token_sample_is_o_of_t(block_m, block_n):
    """One 131,072-token causal sample: 8 int32 per block (a few hundred KB at most, where a tile list held up to
    33.6 M tiles), and the counts are the triangle's (n row blocks: n(n+1)/2 visited, n(n-1)/2 full, for
    square blocks; in general every key block up to the diagonal). Build time: benchmarks/block_table_build.py."""
    tokens = 131072
    table = build_block_table(*intervals([(tokens, 0, 0, 0)], False, True), block_m, block_n)
    size = sum(x.numel() * x.element_size() for x in (table.row_bounds, table.col_bounds))
    assert size == 8 * 4 * (tokens // block_m + tokens // block_n) < 1 << 20
    counts = tile_counts(table)
    rows = tokens // block_m
    visited = sum(-(-(r + 1) * block_m // block_n) for r in range(rows))
    full = sum(r * block_m // block_n for r in range(rows))  # key blocks wholly at or before the block's first row
    assert (counts["visited"], counts["full"]) == (visited, full)
    assert counts["visible_pairs"] == tokens * (tokens + 1) // 2


def test_empty_layout():
    table = build_block_table(*intervals([], False, True), 16, 16)
    assert table.row_bounds.shape == (0, 8) and table.col_bounds.shape == (0, 8)
    assert tile_counts(table)["visited"] == 0
