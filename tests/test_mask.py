"""The mask rule against a brute-force per-element statement of DESIGN.md §3."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tte_flash.attention import reference_attention
from tte_flash.mask import COT, EMB, QUERY, THINK, check_layout, dense_mask, mask_intervals


def brute_force_visible(seq, types, i, j, think_bidirectional, cot_sees_query):
    if seq[i] != seq[j]:
        return False
    if j > i and not (think_bidirectional and types[i] == THINK and types[j] == THINK):
        return False
    if types[i] == COT and types[j] == EMB:
        return False
    if types[i] == COT and types[j] == QUERY and not cot_sees_query:
        return False
    return True


samples = st.lists(st.tuples(st.integers(1, 7), st.integers(0, 5), st.booleans(), st.integers(0, 6)),
                   min_size=1, max_size=6)


def packed_layout(spec):
    """spec: per sample (query_len, think_len, has_emb, cot_len) -> seq_ids, token_types."""
    seq, types = [], []
    for s, (nq, nk, has_emb, nc) in enumerate(spec):
        kinds = [QUERY] * nq + [THINK] * nk + [EMB] * has_emb + [COT] * nc
        seq += [s] * len(kinds)
        types += kinds
    return torch.tensor(seq, dtype=torch.int32), torch.tensor(types, dtype=torch.uint8)


@settings(max_examples=60, deadline=None)
@given(spec=samples, think_bidirectional=st.booleans(), cot_sees_query=st.booleans())
def test_dense_mask_matches_brute_force(spec, think_bidirectional, cot_sees_query):
    seq, types = packed_layout(spec)
    mask = dense_mask(seq, types, think_bidirectional=think_bidirectional, cot_sees_query=cot_sees_query)
    s, t = seq.tolist(), types.tolist()
    expected = torch.tensor([[brute_force_visible(s, t, i, j, think_bidirectional, cot_sees_query)
                              for j in range(len(s))] for i in range(len(s))])
    assert torch.equal(mask, expected)
    assert mask.diagonal().all(), "every row must see itself"


@settings(max_examples=60, deadline=None)
@given(spec=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 5), st.integers(0, 2), st.integers(0, 6)),
                     min_size=1, max_size=6).filter(lambda spec: all(map(sum, spec))),
       think_bidirectional=st.booleans(), cot_sees_query=st.booleans())
def test_mask_intervals_are_exact_and_tight(spec, think_bidirectional, cot_sees_query):
    """The interval form equals the brute-force rule pair by pair (empty QUERY/THINK spans and several EMB
    tokens included), and every interval's first and last element is visible."""
    types = torch.tensor([kind for q, t, e, c in spec for kind in [QUERY] * q + [THINK] * t + [EMB] * e + [COT] * c],
                         dtype=torch.uint8)
    seq = torch.tensor([s for s, lengths in enumerate(spec) for _ in range(sum(lengths))], dtype=torch.int32)
    s, t = seq.tolist(), types.tolist()
    n = len(s)
    expected = torch.tensor([[brute_force_visible(s, t, i, j, think_bidirectional, cot_sees_query)
                              for j in range(n)] for i in range(n)])
    bounds = mask_intervals(seq, types, think_bidirectional=think_bidirectional, cot_sees_query=cot_sees_query)
    row, key = torch.arange(n)[:, None], torch.arange(n)[None, :]
    by_row = ((key >= bounds.row_lo[:, None]) & (key < bounds.row_hi[:, None])
              & ~((key >= bounds.gap_lo[:, None]) & (key < bounds.gap_hi[:, None])))
    by_column = (row >= bounds.col_lo[None, :]) & (row < bounds.col_hi[None, :])
    assert torch.equal(by_row, expected) and torch.equal(by_column, expected)
    index = torch.arange(n)
    assert expected[index, bounds.row_lo].all() and expected[index, bounds.row_hi - 1].all()
    assert expected[bounds.col_lo, index].all() and expected[bounds.col_hi - 1, index].all()


@settings(max_examples=25, deadline=None)
@given(spec=samples, think_bidirectional=st.booleans(), cot_sees_query=st.booleans(),
       group=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**16))
def test_reference_attention_matches_float64_softmax(spec, think_bidirectional, cot_sees_query, group, seed):
    seq, types = packed_layout(spec)
    gen = torch.Generator().manual_seed(seed)
    n, hkv, d = seq.numel(), 2, 8
    q = torch.randn(n, hkv * group, d, generator=gen)
    k, v = torch.randn(n, hkv, d, generator=gen), torch.randn(n, hkv, d, generator=gen)
    out = reference_attention(q, k, v, seq, types, think_bidirectional=think_bidirectional,
                              cot_sees_query=cot_sees_query)
    s, t = seq.tolist(), types.tolist()
    allowed = torch.tensor([[brute_force_visible(s, t, i, j, think_bidirectional, cot_sees_query)
                             for j in range(n)] for i in range(n)])
    kk, vv = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("ihd,jhd->hij", q.double(), kk) / d ** 0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    expected = torch.einsum("hij,jhd->ihd", probs, vv)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seq, types, message", [
    ([0, 1, 0], [0, 0, 0], "non-decreasing"),
    ([0, 0, 0], [0, 2, 1], "within a sample"),
    ([0, 0], [0, 4], "token_types must be in"),
])
def test_check_layout_rejects_bad_layouts(seq, types, message):
    with pytest.raises(ValueError, match=message):
        check_layout(torch.tensor(seq), torch.tensor(types))
