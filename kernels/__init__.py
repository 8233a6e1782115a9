"""Triton kernels, installed as ``tte_flash.kernels`` (DESIGN.md §2, §6)."""
from .tte_attention import tte_attention

__all__ = ["tte_attention"]
