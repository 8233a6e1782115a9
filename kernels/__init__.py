"""Triton kernels, installed as ``tte_flash.kernels`` (DESIGN.md §2, §6)."""
if __name__ == "kernels":
    # Imported as a top-level ``kernels``: Python started in the repository root has this folder on
    # sys.path, and transformers probes for Hugging Face's ``kernels`` package under that name at import
    # time. Stay inert (no version, nothing imported) so the probe finds no usable package and moves on.
    __all__ = []
else:
    from .tte_attention import KernelLayout, prepare_layout, tte_attention, tte_attention_with_layout

    __all__ = ["KernelLayout", "prepare_layout", "tte_attention", "tte_attention_with_layout"]
