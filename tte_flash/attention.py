"""Attention backends for the text model, behind one switch (DESIGN.md §6).

* ``reference``: PyTorch SDPA on a dense boolean mask built by :func:`tte_flash.mask.dense_mask`.
  Works on every device and layout (packed, padded, COT segments); the CPU path and the oracle.
* ``triton``: the fused kernel :func:`tte_flash.kernels.tte_attention`, mask computed in-kernel from
  O(T) intervals, tiles chosen from a block table built once per forward. Every dtype launches on CUDA
  (fp16/bf16 on tensor cores; fp32 and fp64 with small tiles and exact FMA dots, much slower).

The backend is chosen per call by :func:`resolve_backend`: an explicit choice on the model wins, then
the ``TTE_FLASH_ATTN`` environment variable, then ``triton`` on CUDA and ``reference`` elsewhere.

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

from .mask import dense_mask

ATTN_NAME = "tte"
BACKENDS = ("reference", "triton")


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
        """(B, 1, L, L) boolean mask for the reference path, built once per forward (not per layer)."""
        if self._mask is None:
            self._mask = dense_mask(self.seq_ids, self.token_types, think_bidirectional=self.think_bidirectional,
                                    cot_sees_query=self.cot_sees_query)[:, None]
        return self._mask


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """The attention backend to use: ``requested`` > ``$TTE_FLASH_ATTN`` > device default."""
    chosen = requested or os.environ.get("TTE_FLASH_ATTN")
    backend = chosen or ("triton" if device.type == "cuda" else "reference")
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        if chosen:
            raise ImportError("attention backend 'triton' needs the triton package (pip install triton; Linux only); "
                              "use attn_backend='reference' elsewhere")
        _warn_once("triton is not installed: using the reference attention (dense mask, O(L^2) memory) on CUDA")
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
    mask = dense_mask(seq_ids, token_types, think_bidirectional=think_bidirectional,
                      cot_sees_query=cot_sees_query)  # (T, T)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])  # (Hq, T, D)
    return out.transpose(0, 1)


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
    mask = layout.dense_mask()  # (B, 1, L, L)
    if layout.record_attention is not None:
        layout.record_attention.append(_attention_probs(query, key, mask, scaling, layout.record_rows))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                         dropout_p=dropout if module.training else 0.0,
                                         enable_gqa=query.shape[1] != key.shape[1])  # (B, H, L, D)
    return out.transpose(1, 2), None


def _attention_probs(query, key, mask, scaling, rows):
    """Softmax probabilities of the flat query ``rows`` over all keys: (rows, Hq, B*L), zero across rows."""
    batch, heads, length, head_dim = query.shape
    key = key.repeat_interleave(heads // key.shape[1], dim=1)  # (B, Hq, L, D)
    b, i = rows // length, rows % length
    scores = torch.einsum("rhd,rhld->rhl", query[b, :, i].float(), key[b].float()) * (scaling or head_dim**-0.5)
    probs = scores.masked_fill(~mask[b, 0, i][:, None, :], float("-inf")).softmax(-1)  # (rows, Hq, L)
    full = probs.new_zeros(len(rows), heads, batch * length)
    for r in range(len(rows)):
        full[r, :, b[r] * length:(b[r] + 1) * length] = probs[r]
    return full


AttentionInterface.register(ATTN_NAME, _tte_attention_forward)
# Masks for non-TTE calls under this name (generate with a KV cache) are ordinary SDPA masks.
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
