"""Attention backends for the text model, behind one switch (DESIGN.md §6).

* ``reference``: PyTorch SDPA under the mask rule (:mod:`tte_flash.mask`), over blocks of query rows
  (:func:`chunked_attention`): each block builds only its own rows of the mask, from the rule's per-row
  key intervals, over the keys those rows can see, so memory grows as L x block, not L x L (a 32k-token
  input of the tiny preset: 0.68 GB peak against 5.56 GB, ``benchmarks/reference_memory.py``). An input
  small enough for one block takes the dense-mask path unchanged. Works on every device and layout
  (packed, padded, COT segments); the CPU path and the oracle.
* ``triton``: the fused kernel :func:`tte_flash.kernels.tte_attention`, mask computed in-kernel from
  O(T) intervals, tiles chosen from a block table built once per forward. Every dtype launches on CUDA
  (fp16/bf16 on tensor cores; fp32 and fp64 with small tiles and exact FMA dots, much slower).

The backend is chosen per call by :func:`resolve_backend`: an explicit choice on the model wins, then
the ``TTE_FLASH_ATTN`` environment variable, then ``triton`` on CUDA GPUs the kernels support (NVIDIA,
compute capability 8.0 and newer: :func:`tte_flash.kernels.unsupported_gpu`) and ``reference`` elsewhere,
with a warning on an older GPU (T4, V100), on ROCm, or where triton is not installed or older than 3.4.

The model reaches this module through transformers' ``AttentionInterface`` under the name ``"tte"``.
The TTE layout travels in place of the attention mask (a :class:`TTELayout` instead of a 4-D
tensor), so no L x L mask is ever built on the Triton path. Any other mask (``generate`` with a KV
cache, plain transformers calls) falls through to transformers' own SDPA attention.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .mask import check_layout, dense_mask, mask_intervals, visible

ATTN_NAME = "tte"
BACKENDS = ("reference", "triton")
# Reference path: the most bytes one block's fp32 scores (heads x rows x keys) may take; a block is as many
# query rows as fit, and at least MIN_BLOCK_ROWS. Inputs that fit in one block run one SDPA call on the whole
# dense mask.
REFERENCE_BLOCK_BYTES = 64 * 2**20
MIN_BLOCK_ROWS = 256  # CPU SDPA is several times slower per row on shorter blocks


@dataclass
class TTELayout:
    """Per-token metadata of a (packed or padded) batch; travels as the text model's attention mask.

    ``seq_ids`` and ``token_types`` have shape (B, L); ``seq_ids`` are non-decreasing when the batch
    is read row after row, so a padded batch can be flattened into one packed sequence.
    """
    seq_ids: torch.Tensor  # (B, L) int32
    token_types: torch.Tensor  # (B, L) uint8: 0 query, 1 think, 2 emb, 3 cot
    think_bidirectional: bool = False
    cot_sees_query: bool = True
    backend: str = "reference"
    # Explain only: when set, the reference path appends each layer's attention probabilities of the
    # rows in ``record_rows`` (flat indices into B*L) to this list, as (rows, Hq, B*L) tensors.
    record_attention: list | None = None
    record_rows: torch.Tensor | None = None
    _mask: torch.Tensor | None = None
    _kernel_layout: object | None = None

    def kernel_layout(self):
        """The Triton kernel's checked layout over the flattened (B*L) tokens: mask intervals, and block
        tables built on first use; made once per forward (the checks sync with the host) and shared by every
        layer and head."""
        if self._kernel_layout is None:
            from .kernels import prepare_layout
            self._kernel_layout = prepare_layout(self.seq_ids.reshape(-1), self.token_types.reshape(-1),
                                                 think_bidirectional=self.think_bidirectional,
                                                 cot_sees_query=self.cot_sees_query)
        return self._kernel_layout

    def dense_mask(self) -> torch.Tensor:
        """(B, 1, L, L) boolean mask for the reference path on inputs that fit one block of
        :func:`chunked_attention`, built once per forward (not per layer)."""
        if self._mask is None:
            self._mask = dense_mask(self.seq_ids, self.token_types, think_bidirectional=self.think_bidirectional,
                                    cot_sees_query=self.cot_sees_query)[:, None]
        return self._mask


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """The attention backend to use: ``requested`` > ``$TTE_FLASH_ATTN`` > device default. An explicit
    ``triton`` where it cannot run (triton missing or older than 3.4, a GPU older than compute capability 8.0, ROCm)
    is an error."""
    chosen = requested or os.environ.get("TTE_FLASH_ATTN")
    backend = chosen or ("triton" if device.type == "cuda" else "reference")
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        if chosen:
            raise ImportError("attention backend 'triton' needs the triton package (pip install triton; Linux only); "
                              "use attn_backend='reference' elsewhere")
        _warn_once("triton is not installed: using the reference attention (SDPA over blocks of query rows, slow) "
                   "on CUDA")
        backend = "reference"
    if backend == "triton" and device.type == "cuda":
        from .kernels import unsupported_gpu
        problem = unsupported_gpu(device)
        if problem and chosen:
            raise RuntimeError(f"attention backend 'triton': {problem}")
        if problem:
            _warn_once(f"using the reference attention (SDPA over blocks of query rows, slow): {problem}")
            backend = "reference"
    return backend


@functools.lru_cache(maxsize=None)
def _warn_once(message: str):
    warnings.warn(message, stacklevel=3)


def reference_attention(q, k, v, seq_ids, token_types, *, think_bidirectional=False, cot_sees_query=True,
                        scale=None):
    """Reference TTE attention on packed inputs, same contract as ``tte_flash.kernels.tte_attention``.

    q: (T, Hq, D); k, v: (T, Hkv, D); seq_ids, token_types: (T,). Returns (T, Hq, D).
    """
    out = chunked_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                            seq_ids[None], token_types[None], think_bidirectional=think_bidirectional,
                            cot_sees_query=cot_sees_query, scale=scale)  # (1, Hq, T, D)
    return out[0].transpose(0, 1)


def chunked_attention(query, key, value, seq_ids, token_types, *, think_bidirectional=False, cot_sees_query=True,
                      scale=None, dropout_p=0.0, block_bytes=None, dense=None):
    """SDPA under the TTE mask, one block of query rows at a time; (B, Hq, L, D) in and out.

    key, value: (B, Hkv, L, D); seq_ids, token_types: (B, L), one layout per batch row (rows never see each
    other). Each block of rows builds only its own rows of the mask, from the rule's per-row key intervals
    (:func:`tte_flash.mask.mask_intervals`), over the keys those rows can see, so the mask and the scores are
    (rows x keys), never L x L; keys outside that range are invisible to the block, so the result is the
    dense-mask result (up to float rounding). A batch row that is not a valid packed layout
    (:func:`tte_flash.mask.check_layout`) gets its mask rows from :func:`tte_flash.mask.visible` over all keys.
    An input that fits in one block (``block_bytes``, default :data:`REFERENCE_BLOCK_BYTES`) runs one SDPA call
    on the whole dense mask: ``dense()`` when given (a layout's, built once for every layer).
    """
    batch, heads, length, _ = query.shape
    rows = _rows_per_block(heads, length, REFERENCE_BLOCK_BYTES if block_bytes is None else block_bytes)
    options = dict(scale=scale, dropout_p=dropout_p, enable_gqa=heads != key.shape[1])
    rule = dict(think_bidirectional=think_bidirectional, cot_sees_query=cot_sees_query)
    if rows >= length:  # one block: the dense mask
        mask = dense() if dense is not None else dense_mask(seq_ids, token_types, **rule)[:, None]  # (B, 1, L, L)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, **options)
    outputs = []
    for b in range(batch):
        mask_rows = _mask_rows(seq_ids[b], token_types[b], rule)
        blocks = []
        for start in range(0, length, rows):
            mask, k_lo, k_hi = mask_rows(start, min(start + rows, length))  # (rows, k_hi - k_lo)
            blocks.append(F.scaled_dot_product_attention(
                query[b:b + 1, :, start:start + rows], key[b:b + 1, :, k_lo:k_hi], value[b:b + 1, :, k_lo:k_hi],
                attn_mask=mask, **options))  # (1, Hq, rows, D)
        outputs.append(torch.cat(blocks, dim=2))
    return torch.cat(outputs)


def _rows_per_block(heads: int, length: int, block_bytes: int) -> int:
    """Query rows per block: as many as keep heads x rows x length fp32 scores within ``block_bytes``, and at
    least :data:`MIN_BLOCK_ROWS` (CPU SDPA is slow on short blocks)."""
    return max(MIN_BLOCK_ROWS, block_bytes // max(1, heads * length * 4))


def _mask_rows(seq_ids, token_types, rule: dict):
    """For one (L,) layout, a function (start, stop) -> (mask (stop - start, k_hi - k_lo), k_lo, k_hi): rows
    ``start:stop`` of the mask over the keys ``k_lo:k_hi``, outside which those rows see nothing."""
    index = torch.arange(seq_ids.numel(), device=seq_ids.device)
    try:
        check_layout(seq_ids, token_types)
    except ValueError:  # not a packed layout: the rule itself, over every key
        seq, types = seq_ids.long(), token_types.long()

        def by_rule(start, stop):
            return visible(seq[start:stop, None], types[start:stop, None], index[start:stop, None], seq[None],
                           types[None], index[None], **rule), 0, seq.numel()
        return by_rule
    bounds = mask_intervals(seq_ids, token_types, **rule)

    def by_intervals(start, stop):
        k_lo, k_hi = int(bounds.row_lo[start:stop].min()), int(bounds.row_hi[start:stop].max())
        keys = index[None, k_lo:k_hi]
        mask = (keys >= bounds.row_lo[start:stop, None]) & (keys < bounds.row_hi[start:stop, None])
        gap_lo, gap_hi = bounds.gap_lo[start:stop, None], bounds.gap_hi[start:stop, None]
        if bool((gap_hi > gap_lo).any()):  # COT rows in the block: their EMB keys are hidden
            mask &= (keys < gap_lo) | (keys >= gap_hi)
        return mask, k_lo, k_hi
    return by_intervals


def _tte_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: (B, H, L, D) in, (B, L, H, D) out."""
    if not isinstance(attention_mask, TTELayout):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    layout = attention_mask
    if layout.backend == "triton":
        from .kernels import tte_attention_with_layout
        batch, heads, length, head_dim = query.shape

        def packed(x):  # (B, H, L, D) -> (B*L, H, D)
            return x.transpose(1, 2).reshape(batch * length, x.shape[1], head_dim)

        out = tte_attention_with_layout(packed(query), packed(key), packed(value), layout.kernel_layout(),
                                        scale=scaling)
        return out.view(batch, length, heads, head_dim), None
    if layout.record_attention is not None:
        layout.record_attention.append(_attention_probs(query, key, layout, scaling, layout.record_rows))
    out = chunked_attention(query, key, value, layout.seq_ids, layout.token_types,
                            think_bidirectional=layout.think_bidirectional, cot_sees_query=layout.cot_sees_query,
                            scale=scaling, dropout_p=dropout if module.training else 0.0,
                            dense=layout.dense_mask)  # (B, H, L, D)
    return out.transpose(1, 2), None


def _attention_probs(query, key, layout, scaling, rows):
    """Softmax probabilities of the flat query ``rows`` over all keys: (rows, Hq, B*L), zero across rows."""
    batch, heads, length, head_dim = query.shape
    key = key.repeat_interleave(heads // key.shape[1], dim=1)  # (B, Hq, L, D)
    b, i = rows // length, rows % length
    seq, types, index = layout.seq_ids.long(), layout.token_types.long(), torch.arange(length, device=rows.device)
    mask = visible(seq[b, i][:, None], types[b, i][:, None], i[:, None], seq[b], types[b], index[None, :],
                   think_bidirectional=layout.think_bidirectional, cot_sees_query=layout.cot_sees_query)  # (rows, L)
    scores = torch.einsum("rhd,rhld->rhl", query[b, :, i].float(), key[b].float()) * (scaling or head_dim**-0.5)
    probs = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)  # (rows, Hq, L)
    full = probs.new_zeros(len(rows), heads, batch * length)
    for r in range(len(rows)):
        full[r, :, b[r] * length:(b[r] + 1) * length] = probs[r]
    return full


AttentionInterface.register(ATTN_NAME, _tte_attention_forward)
# Masks for non-TTE calls under this name (generate with a KV cache) are ordinary SDPA masks.
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
