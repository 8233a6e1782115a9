"""Triton kernels, installed as ``tte_flash.kernels`` (DESIGN.md §2, §6).

This folder is never the top-level module ``kernels``: that name belongs to Hugging Face's ``kernels``
package, which transformers (5.25 and later) depends on and imports. Python started in the repository
root (``python -m pytest``, ``python -m tte_flash.evaluate``, a benchmark that puts the root on
``sys.path``) finds this folder first under that name; it then loads the real package from the rest of
``sys.path`` in its place, so every importer of ``kernels`` gets Hugging Face's package, never this one.

Where Hugging Face's package is not installed (transformers before 5.25 does not require it), ``import kernels``
gives an empty stand-in that reads as "not installed" to the probes libraries use: no ``__file__`` and no
``__version__`` (what transformers 5.17 takes for a namespace package shadowing nothing, after
``importlib.util.find_spec('kernels')`` found this folder and it imported the name to read a version), no
submodules, and every attribute raises an ``AttributeError`` that says the package is missing. Raising
``ModuleNotFoundError`` here instead broke ``import transformers`` there: its probe imports the name unguarded.
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
            return False
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module  # the import statement returns what sys.modules holds after this file ran
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("kernels", None)
            raise
        return True

    if not _load_hugging_face_kernels():  # the stand-in (docstring): this module, emptied
        _MISSING = ("Hugging Face's kernels package is not installed (pip install kernels); the repository's "
                    "kernels/ folder is the subpackage tte_flash.kernels, not a top-level module")

        def __getattr__(name):
            raise AttributeError(f"module 'kernels' has no attribute {name!r}: {_MISSING}")

        __path__ = []  # no submodule: this folder's files are tte_flash.kernels
        for _name in ("__file__", "__cached__", "importlib", "os", "sys", "_load_hugging_face_kernels", "_name"):
            globals().pop(_name, None)
else:
    from .tte_attention import KernelLayout, prepare_layout, tte_attention, tte_attention_with_layout, unsupported_gpu

    __all__ = ["KernelLayout", "prepare_layout", "tte_attention", "tte_attention_with_layout", "unsupported_gpu"]
