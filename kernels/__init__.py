"""Triton kernels, installed as ``tte_flash.kernels`` (DESIGN.md §2, §6)."""
from .tte_attention import KernelLayout, prepare_layout, tte_attention, tte_attention_with_layout

__all__ = ["KernelLayout", "prepare_layout", "tte_attention", "tte_attention_with_layout"]
