"""The kernels' block table (``tte_flash.kernels.block_table``) as ranges equals the tile lists of the
earlier construction (kept below as the reference: one entry per (key, row block) pair a key's rows
touch, O(sum of sample lengths squared)), tile by tile, with the same full/partial split and pair counts,
on random packed layouts; each tile's kind (the mask tests a kernel applies to it) gives exactly the dense
mask on it; and the table stays O(T) for one long sample.

No kernel launch here: the table is pure torch arithmetic (the kernel's use of it is tested against the
float64 oracle in ``test_kernel.py``).
"""
import random

import pytest
import torch

from tte_flash.kernels.block_table import (COL_BOUNDS, CUT_ANY, CUT_HI, CUT_LO, CUT_LO_HI, FULL, KIND_NAMES,
                                          ROW_BOUNDS, build_block_table, kind_counts, tile_counts, tile_kinds,
                                          tile_pairs, tiles)
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
    Returns (row side, key side, pairs): [(group, member, full)] per side (full: every pair of the tile's real
    rows and keys visible, its member block inside T), each group's partial members
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
    rows, keys = tile // key_blocks, tile % key_blocks
    # full: every pair of its real rows and keys visible (padding past T is never stored, so never masked), and
    # the blocks a program loads per tile (key blocks for a row block, row blocks for a key block) inside T
    all_real = pairs == torch.clamp(tokens - rows * block_m, max=block_m) * torch.clamp(tokens - keys * block_n,
                                                                                          max=block_n)
    full_by_row = (all_real & ((keys + 1) * block_n <= tokens)).tolist()
    full_by_key = (all_real & ((rows + 1) * block_m <= tokens)).tolist()
    rows, keys = rows.tolist(), keys.tolist()
    pairs_of = dict(zip(zip(rows, keys), pairs.tolist()))
    by_row = sorted(zip(rows, keys, full_by_row), key=lambda t: (t[0], t[2], t[1]))
    by_key = sorted(zip(keys, rows, full_by_key), key=lambda t: (t[0], t[2], t[1]))
    return by_row, by_key, [pairs_of[r, k] for r, k, _ in by_row]


def assert_table_equals_reference(samples, think_bidirectional, cot_sees_query, block_m, block_n):
    bounds = intervals(samples, think_bidirectional, cot_sees_query)
    table = build_block_table(*bounds, block_m, block_n)
    by_row, by_key, pairs = reference_tiles(bounds[4], bounds[5], block_m, block_n)
    # the same tiles, each once; compared in the reference's order (per group partial then full, ascending)
    got_row = sorted(zip(*(x.tolist() for x in tiles(table, by_row=True))), key=lambda t: (t[0], t[2], t[1]))
    got_key = sorted(zip(*(x.tolist() for x in tiles(table, by_row=False))), key=lambda t: (t[0], t[2], t[1]))
    context = f"{samples} bidir={think_bidirectional} cot_sees_query={cot_sees_query} {block_m}x{block_n}"
    assert got_row == by_row, context
    assert got_key == by_key, context
    rows, keys = torch.tensor([t[:2] for t in by_row], dtype=torch.long).view(-1, 2).T
    assert tile_pairs(rows, keys, bounds[4], bounds[5], block_m, block_n).tolist() == pairs, context
    counts = tile_counts(table)
    assert counts["visited"] == len(by_row) and counts["full"] == sum(f for *_, f in by_row), context
    assert counts["visible_pairs"] == sum(pairs), context
    tokens = bounds[0].numel()
    assert table.row_bounds.shape == (-(-tokens // block_m), ROW_BOUNDS)
    assert table.col_bounds.shape == (-(-tokens // block_n), COL_BOUNDS)
    for b in (table.row_bounds, table.col_bounds):  # (start, end) pairs, an empty range written (0, 0)
        start, end = b.long().view(b.shape[0], -1, 2).unbind(-1)
        assert b.dtype == torch.int32 and ((end > start) | ((start == 0) & (end == 0))).all(), context
    if tokens <= 600:  # tile by tile in Python: the long layouts are checked for their structure only
        assert_kinds_give_the_dense_mask(samples, think_bidirectional, cot_sees_query, table)
    return table


def kind_mask(kind, lo, hi, gap_lo=None, gap_hi=None):
    """The tests a kernel applies to a tile of ``kind``: (rows, keys) bool from the rows' [lo, hi) bounds relative
    to the tile's keys (or, on the key side, the keys' bounds relative to its rows), as the kernels write them."""
    offsets = torch.arange(lo.shape[1])[None, :]
    see = torch.ones(lo.shape, dtype=torch.bool)
    if kind in (CUT_LO, CUT_LO_HI, CUT_ANY):
        see &= offsets >= lo
    if kind in (CUT_HI, CUT_LO_HI, CUT_ANY):
        see &= offsets < hi
    if kind == CUT_ANY:
        see &= (offsets < gap_lo) | (offsets >= gap_hi)
    return see


def assert_kinds_give_the_dense_mask(samples, think_bidirectional, cot_sees_query, table):
    """Every visited tile, both sides: its kind's tests alone give the dense mask on its real rows and keys; a kind
    without the HI test never holds a token past T (its loads are unmasked)."""
    seq, types = layout(samples)
    tokens, block_m, block_n = seq.numel(), table.block_m, table.block_n
    mask = dense_mask(seq, types, think_bidirectional=think_bidirectional, cot_sees_query=cot_sees_query)
    row_lo, row_hi, gap_lo, gap_hi, col_lo, col_hi = (x.long() for x in intervals(samples, think_bidirectional,
                                                                                   cot_sees_query))
    context = f"{samples} bidir={think_bidirectional} cot_sees_query={cot_sees_query} {block_m}x{block_n}"
    for row_block, key_block, kind in zip(*(x.tolist() for x in tile_kinds(table, by_row=True))):
        rows = torch.arange(row_block * block_m, min(row_block * block_m + block_m, tokens))  # real rows only
        n0 = key_block * block_n
        keys = torch.arange(n0, min(n0 + block_n, tokens))
        assert kind in (CUT_HI, CUT_LO_HI, CUT_ANY) or n0 + block_n <= tokens, (context, row_block, key_block, kind)
        got = kind_mask(kind, *(x[rows, None].expand(-1, block_n) - n0 for x in (row_lo, row_hi, gap_lo, gap_hi)))
        assert torch.equal(got[:, :keys.numel()], mask[rows][:, keys]), (context, row_block, key_block, kind)
    for key_block, row_block, kind in zip(*(x.tolist() for x in tile_kinds(table, by_row=False))):
        keys = torch.arange(key_block * block_n, min(key_block * block_n + block_n, tokens))
        m0 = row_block * block_m
        rows = torch.arange(m0, min(m0 + block_m, tokens))
        assert kind in (CUT_HI, CUT_LO_HI) or m0 + block_m <= tokens, (context, row_block, key_block, kind)
        got = kind_mask(kind, *(x[keys, None].expand(-1, block_m) - m0 for x in (col_lo, col_hi)))  # (keys, rows)
        assert torch.equal(got[:, :rows.numel()], mask[rows][:, keys].T), (context, row_block, key_block, kind)


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
                real = (tokens - row * block_m).clamp(max=block_m) * (tokens - key * block_n).clamp(max=block_n)
                inside = (key + 1) * block_n <= tokens  # a full tile's keys are loaded unmasked
                assert full.tolist() == ((pairs[row, key] == real) & inside).tolist()


@pytest.mark.parametrize("block_m, block_n", [(16, 16), (16, 64), (128, 64)])
def test_128k_token_sample_is_o_of_t(block_m, block_n):
    """One 131,072-token causal sample: 8 int32 per block (a few hundred KB at most, where a tile list held up to
    33.6 M tiles), and the counts are the triangle's (n row blocks: n(n+1)/2 visited, n(n-1)/2 full, for
    square blocks; in general every key block up to the diagonal). Build time: benchmarks/block_table_build.py."""
    tokens = 131072
    table = build_block_table(*intervals([(tokens, 0, 0, 0)], False, True), block_m, block_n)
    size = sum(x.numel() * x.element_size() for x in (table.row_bounds, table.col_bounds))
    assert size == 4 * (ROW_BOUNDS * tokens // block_m + COL_BOUNDS * tokens // block_n) < 1 << 20
    counts = tile_counts(table)
    # one causal sample: only the diagonal cuts a tile, so every partial tile tests j < row_hi only
    assert counts["cut_hi"] == counts["partial"] > 0 and counts["cut_lo"] == counts["cut_lo_hi"] == 0
    rows = tokens // block_m
    visited = sum(-(-(r + 1) * block_m // block_n) for r in range(rows))
    full = sum(r * block_m // block_n for r in range(rows))  # key blocks wholly at or before the block's first row
    assert (counts["visited"], counts["full"]) == (visited, full)
    assert counts["visible_pairs"] == tokens * (tokens + 1) // 2


def test_empty_layout():
    table = build_block_table(*intervals([], False, True), 16, 16)
    assert table.row_bounds.shape == (0, ROW_BOUNDS) and table.col_bounds.shape == (0, COL_BOUNDS)
    assert tile_counts(table)["visited"] == 0


@pytest.mark.parametrize("samples, think_bidirectional, cot_sees_query, block_m, block_n, kinds", [
    # packed causal samples of odd lengths: the diagonal (HI), sample starts (LO), both where a row block spans two
    ([(37, 0, 0, 0), (90, 0, 0, 0), (41, 0, 0, 0)], False, True, 32, 16, {FULL, CUT_LO, CUT_HI, CUT_LO_HI}),
    # COT rows far from their EMB key: the gap alone (CUT_ANY) in the EMB key block
    ([(40, 8, 1, 70)], False, True, 16, 16, {FULL, CUT_HI, CUT_ANY}),
    # COT rows that do not see the query: their row_lo is the THINK start (LO inside one sample)
    ([(40, 8, 1, 70)], False, False, 16, 16, {FULL, CUT_LO, CUT_HI, CUT_ANY}),
    # bidirectional THINK: a THINK row's row_hi is the THINK end (HI past the diagonal)
    ([(17, 33, 1, 0)], True, True, 16, 16, {FULL, CUT_HI}),
])
def test_each_kind_arises_and_is_exact(samples, think_bidirectional, cot_sees_query, block_m, block_n, kinds):
    """Layouts chosen to produce each tile kind: they appear (row side), and each gives the dense mask exactly."""
    table = assert_table_equals_reference(samples, think_bidirectional, cot_sees_query, block_m, block_n)
    counts = tile_counts(table)
    assert {kind for kind, name in KIND_NAMES.items() if counts.get(name, counts["full"] if kind == FULL else 0)} \
        == kinds, counts


def test_tile_mix_weights_each_kind_by_its_tiles(tmp_path):
    """``benchmarks/block_table_build.py --tile-mix``: the tile-weighted partial/full SASS ratio of a compile_check
    report equals the one counted tile by tile (:func:`tile_kinds`); a kind the SASS parser could not place (no count)
    makes the ratio unknown, named in the row, instead of a crash."""
    import json

    from conftest import load_script
    bench = load_script("benchmarks/block_table_build.py", "block_table_build_under_test")
    cost = {"cut_lo": 11.0, "cut_hi": 13.0, "cut_lo_hi": 17.0, "cut_any": 19.0}
    launch = dict(triton="x", kernel="_fwd_kernel", head_dim=64, config="64x32 w4 s2", sass_full=10.0)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"rows": [dict(launch, sass_kinds=cost),
                                           dict(launch, sass_kinds={k: v for k, v in cost.items() if k != "cut_hi"})]}))
    rows = bench.tile_mix(report, ["packed"], 4096)
    _, _, kind = tile_kinds(build_block_table(*bench.layout_intervals(bench.LAYOUTS["packed"](4096)), 64, 32))
    partial = [KIND_NAMES[int(k)] for k in kind if int(k) != FULL]
    assert {"cut_hi", "cut_any"} <= set(partial)  # the packed training layout has the diagonal and COT gaps
    expected = sum(cost[name] for name in partial) / len(partial) / 10.0
    assert rows[0]["partial_over_full_weighted"] == pytest.approx(expected, abs=1e-3)
    assert rows[0]["uncounted_kinds"] == []
    assert rows[1]["partial_over_full_weighted"] is None and rows[1]["uncounted_kinds"] == ["cut_hi"]


@pytest.mark.parametrize("block_m, block_n", [(16, 16), (64, 32), (32, 128)])
def test_programs_take_blocks_longest_first(block_m, block_n):
    """row_order / col_order: each a permutation of its side's blocks, by visited tiles (counted tile by tile with
    :func:`tile_kinds`) most first, ties in block order; one causal sample runs its last row block and its first key
    block first; random packings too."""
    rng = random.Random(7)
    packed = [(rng.randint(1, 90), rng.choice([0, 4]), 1, rng.randint(0, 60)) for _ in range(9)]
    for samples, flags in (([(1000, 0, 0, 0)], (False, True)), (packed, (True, False)), (packed, (False, True))):
        table = build_block_table(*intervals(samples, *flags), block_m, block_n)
        for by_row, order in ((True, table.row_order), (False, table.col_order)):
            group, _, _ = tile_kinds(table, by_row)
            blocks = (table.row_bounds if by_row else table.col_bounds).shape[0]
            per_block = torch.bincount(group, minlength=blocks)
            assert order.dtype == torch.int32 and sorted(order.tolist()) == list(range(blocks))
            expected = sorted(range(blocks), key=lambda b: (-int(per_block[b]), b))
            assert order.tolist() == expected
            assert per_block.tolist() == kind_counts(table, by_row).sum(1).tolist()
        if len(samples) == 1:  # the causal triangle: the last row block and the first key block hold the most
            rows = kind_counts(table, True).sum(1)
            assert rows[table.row_order[0]] == rows[-1] == rows.max() and table.col_order[0] == 0


def test_schedule_model_dispatches_in_order_to_the_earliest_free_slot():
    """``block_table_build.py --schedule``'s list scheduler on a hand-computed case: four short programs and a long one
    on two slots finish at 6 in that order (the long one starts last) and at 4 longest first; and the model's numbers
    on the 16k layouts stay the ones the README quotes."""
    from conftest import load_script
    bench = load_script("benchmarks/block_table_build.py", "block_table_build_schedule")
    assert bench.makespan([1, 1, 1, 1, 4], 2) == 6 and bench.makespan([4, 1, 1, 1, 1], 2) == 4
    rows = {(r["layout"], r["kernel"]): r for r in bench.schedule(["packed", "one-sample"], 16384, 132, 1.0)}
    # the numbers benchmarks/README.md quotes (results/schedule-model-16k-2026-12-05.json)
    assert (rows["packed", "dkdv"]["makespan_block_order"], rows["packed", "dkdv"]["makespan_longest_first"]) == (
        338.0, 218.0)
    assert rows["one-sample", "dkdv"]["predicted_gain"] == 1.0  # already at the bound: one program per SM-wave
    assert rows["one-sample", "fwd"]["predicted_gain"] == pytest.approx(1663 / 1525)
