"""TTE-Flash: reasoning-aware multimodal embeddings with latent think tokens.

A Qwen2-VL backbone reads ``[query][K think tokens][<emb>]`` in one forward pass; the embedding is
``<emb>``'s hidden state. See README.md and DESIGN.md.
"""
from .attention import reference_attention
from .configuration import TTEFlashConfig
from .encoding import read_shards
from .mask import COT, EMB, QUERY, THINK, dense_mask, visible
from .modeling import TTEFlashModel, TTEOutput, available_presets
from .processing import TTEProcessor, collate

__version__ = "0.1.0"
__all__ = ["TTEFlashConfig", "TTEFlashModel", "TTEOutput", "TTEProcessor", "collate", "available_presets",
           "reference_attention", "dense_mask", "visible", "read_shards", "QUERY", "THINK", "EMB", "COT"]
