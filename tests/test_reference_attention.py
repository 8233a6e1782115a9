"""The reference attention over blocks of query rows (issue 18, item 5): the same result as the dense-mask
SDPA path, checked against a float64 softmax on the dense mask, without ever building an L x L mask."""
import numpy as np
import pytest
import torch
from conftest import random_image

from tte_flash import attention
from tte_flash.attention import TTELayout, _tte_attention_forward, chunked_attention
from tte_flash.mask import COT, EMB, QUERY, THINK, dense_mask


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """16-row blocks may be asked for (block_bytes=1): the inputs here are short."""
    monkeypatch.setattr(attention, "MIN_BLOCK_ROWS", 16)


def random_row(gen: torch.Generator, length: int, cot: bool, first_seq: int = 0):
    """One batch row of packed [query][think][emb][cot] samples (odd sizes, K=0 included), padded to ``length``
    with a sample of its own (as ``processing.collate`` pads)."""
    seq, types, sample = [], [], first_seq

    def draw(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=gen))
    while True:
        kinds = [QUERY] * draw(1, 9) + [THINK] * draw(0, 5) + [EMB] + [COT] * (draw(0, 6) if cot else 0)
        if len(seq) + len(kinds) > length:
            break
        seq += [sample] * len(kinds)
        types += kinds
        sample += 1
    seq += [sample] * (length - len(seq))
    types += [QUERY] * (length - len(types))
    return seq, types


def random_batch(seed: int, batch: int, length: int, cot: bool, restart_ids: bool, shuffled: bool = False):
    """(B, L) seq_ids / token_types; ``restart_ids``: every row counts its samples from 0 (rows share ids);
    ``shuffled``: token types in random order (not a packed layout: the attention falls back to the rule)."""
    gen = torch.Generator().manual_seed(seed)
    rows, next_id = [], 0
    for _ in range(batch):
        seq, types = random_row(gen, length, cot, 0 if restart_ids else next_id)
        next_id = seq[-1] + 1
        if shuffled:
            types = [types[i] for i in torch.randperm(length, generator=gen).tolist()]
        rows.append((seq, types))
    return (torch.tensor([s for s, _ in rows], dtype=torch.int32),
            torch.tensor([t for _, t in rows], dtype=torch.uint8))


def float64_reference(q, k, v, seq_ids, token_types, scale, **rule):
    """softmax(QK^T * scale, masked by the dense mask) V in float64, per batch row; (B, Hq, L, D)."""
    group = q.shape[1] // k.shape[1]
    kk, vv = (x.double().repeat_interleave(group, 1) for x in (k, v))
    scores = torch.einsum("bhid,bhjd->bhij", q.double(), kk) * scale
    allowed = dense_mask(seq_ids, token_types, **rule)[:, None]  # (B, 1, L, L)
    return torch.einsum("bhij,bhjd->bhid", scores.masked_fill(~allowed, float("-inf")).softmax(-1), vv)


@pytest.mark.parametrize("seed", range(7))
@pytest.mark.parametrize("think_bidirectional", [False, True])
@pytest.mark.parametrize("cot_sees_query", [True, False])
def test_blocks_match_float64_dense_reference(seed, think_bidirectional, cot_sees_query):
    """Odd lengths, packed samples with K=0 and K>0, COT tokens, padding, GQA groups of 1-3, rows that share
    sample ids, and (seed 6) a layout that is not a packed one: the blocked result equals a float64 softmax on
    the dense mask and the one-block (dense) path."""
    gen = torch.Generator().manual_seed(100 + seed)
    batch, length = 1 + seed % 3, int(torch.randint(37, 140, (1,), generator=gen))
    group, hkv, head_dim = 1 + seed % 3, 2, 8
    seq_ids, token_types = random_batch(seed, batch, length, cot=seed % 2 == 0, restart_ids=seed % 4 == 3,
                                        shuffled=seed == 6)
    q = torch.randn(batch, hkv * group, length, head_dim, generator=gen)
    k, v = torch.randn(batch, hkv, length, head_dim, generator=gen), torch.randn(batch, hkv, length, head_dim,
                                                                                  generator=gen)
    rule = dict(think_bidirectional=think_bidirectional, cot_sees_query=cot_sees_query)
    blocked = chunked_attention(q, k, v, seq_ids, token_types, scale=0.3, block_bytes=1, **rule)  # 16-row blocks
    dense = chunked_attention(q, k, v, seq_ids, token_types, scale=0.3, block_bytes=2**40, **rule)  # one block
    expected = float64_reference(q, k, v, seq_ids, token_types, 0.3, **rule)
    torch.testing.assert_close(blocked.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blocked, dense, atol=1e-6, rtol=1e-6)


def test_block_gradients_match_dense():
    """Training on the CPU runs the reference path: its gradients are the dense path's."""
    seq_ids, token_types = random_batch(7, 2, 75, cot=True, restart_ids=False)
    gen = torch.Generator().manual_seed(7)
    inputs = [torch.randn(2, h, 75, 8, generator=gen, dtype=torch.float64) for h in (6, 2, 2)]
    grads = []
    for block_bytes in (1, 2**40):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        out = chunked_attention(*leaves, seq_ids, token_types, think_bidirectional=True, block_bytes=block_bytes)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([x.grad for x in leaves])
    for blocked, dense in zip(*grads):
        torch.testing.assert_close(blocked, dense, atol=1e-10, rtol=1e-10)


def test_long_input_never_builds_a_square_mask(monkeypatch):
    """At L=3001 with 256-row blocks, no mask larger than 256 x L reaches SDPA, the dense mask is never built,
    and packed samples keep each block to its own samples' keys; the result matches the one-block path."""
    length, heads = 3001, 4
    seq_ids, token_types = random_batch(3, 1, length, cot=True, restart_ids=False)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, length, 8, generator=gen) for h in (heads, 2, 2))
    dense = chunked_attention(q, k, v, seq_ids, token_types, think_bidirectional=True, block_bytes=2**40)
    masks = []
    real_sdpa = attention.F.scaled_dot_product_attention

    def recording_sdpa(*args, attn_mask=None, **kwargs):
        masks.append(tuple(attn_mask.shape))
        return real_sdpa(*args, attn_mask=attn_mask, **kwargs)

    def no_dense_mask(*args, **kwargs):
        raise AssertionError("the dense L x L mask was built")
    monkeypatch.setattr(attention, "MIN_BLOCK_ROWS", 256)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording_sdpa)
    monkeypatch.setattr(attention, "dense_mask", no_dense_mask)
    blocked = chunked_attention(q, k, v, seq_ids, token_types, think_bidirectional=True, block_bytes=1)
    assert len(masks) == -(-length // 256) and all(rows <= 256 and keys < 256 + 60 for rows, keys in masks)
    torch.testing.assert_close(blocked, dense, atol=1e-6, rtol=1e-6)


def test_attention_forward_uses_blocks_and_keeps_recording(monkeypatch):
    """transformers' entry point: blocks when the input does not fit one, the same output and the same
    recorded probabilities (explain) as the dense path."""
    seq_ids, token_types = random_batch(11, 2, 90, cot=True, restart_ids=False)
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, h, 90, 8, generator=gen) for h in (4, 2, 2))
    rows = torch.tensor([5, 89, 90 + 40])
    results = []
    for block_bytes in (2**40, 1):
        monkeypatch.setattr(attention, "REFERENCE_BLOCK_BYTES", block_bytes)
        recorded = []
        layout = TTELayout(seq_ids, token_types, think_bidirectional=True, record_attention=recorded,
                           record_rows=rows)
        out, _ = _tte_attention_forward(torch.nn.Module(), q, k, v, layout, scaling=8 ** -0.5)
        results.append((out, recorded[0], layout._mask))
    (dense_out, dense_probs, dense_mask_built), (blocked_out, blocked_probs, blocked_mask_built) = results
    assert dense_mask_built is not None and blocked_mask_built is None
    torch.testing.assert_close(blocked_out, dense_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(blocked_probs, dense_probs)


@pytest.mark.parametrize("think_bidirectional", [False, True])
def test_model_embeddings_equal_with_blocks(fresh_tiny, rng, monkeypatch, think_bidirectional):
    """A tiny model's embeddings of packed text+image inputs at K=0 and K=5 do not change when the
    reference attention runs in 16-row blocks."""
    model = fresh_tiny(think_bidirectional=think_bidirectional)
    items = [{"text": "the red cell is left of the blue one", "image": random_image(rng)},
             {"text": "short"}, {"text": "a third, longer query about the grid " * 3}]
    outputs = []
    for block_bytes in (2**40, 1):
        monkeypatch.setattr(attention, "REFERENCE_BLOCK_BYTES", block_bytes)
        outputs.append([model.encode_query(items, think_tokens=k, normalize_embeddings=False) for k in (0, 5)])
    for dense, blocked in zip(*outputs):
        np.testing.assert_allclose(blocked, dense, atol=1e-5, rtol=1e-5)
