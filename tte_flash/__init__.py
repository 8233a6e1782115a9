"""TTE-Flash: reasoning-aware multimodal embeddings with latent think tokens."""
from .mask import COT, EMB, QUERY, THINK

__version__ = "0.1.0"
