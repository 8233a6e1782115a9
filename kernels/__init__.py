"""Triton kernels, installed as ``tte_flash.kernels`` (DESIGN.md §2, §6).

This folder is never the top-level module ``kernels``: that name belongs to Hugging Face's ``kernels``
package, which transformers (5.25 and later) depends on and imports. Python started in the repository
root (``python -m pytest``, ``python -m tte_flash.evaluate``, a benchmark that puts the root on
``sys.path``) finds this folder first under that name; it then loads the real package from the rest of
``sys.path`` in its place, or raises ``ModuleNotFoundError`` when none is installed, so every importer
of ``kernels`` gets Hugging Face's package or nothing, never this one.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _load_hugging_face_kernels():
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder that holds this one
        path = [entry for entry in sys.path if os.path.abspath(entry or os.getcwd()) != here]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        if spec is None or spec.loader is None:
            del sys.modules["kernels"]
            raise ModuleNotFoundError(
                "No module named 'kernels' (Hugging Face's package is not installed; the repository's kernels/ "
                "folder is the subpackage tte_flash.kernels, not a top-level module)", name="kernels")
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module  # the import statement returns what sys.modules holds after this file ran
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("kernels", None)
            raise

    _load_hugging_face_kernels()
else:
    from .tte_attention import KernelLayout, prepare_layout, tte_attention, tte_attention_with_layout

    __all__ = ["KernelLayout", "prepare_layout", "tte_attention", "tte_attention_with_layout"]
