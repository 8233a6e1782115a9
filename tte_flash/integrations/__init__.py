"""Ecosystem integrations: remote code for ``trust_remote_code``, sentence-transformers, MTEB.

* :mod:`.remote_code` - flat module files + ``auto_map`` so ``AutoModel.from_pretrained(dir,
  trust_remote_code=True)`` works without the package installed;
* :mod:`.sentence_transformers` - ``TTEFlashST``, a sentence-transformers input module, and the
  ``modules.json`` / ``config_sentence_transformers.json`` a checkpoint needs for
  ``SentenceTransformer(dir, trust_remote_code=True)``;
* :mod:`.mteb` - ``TTEFlashMTEB``, an MTEB 2.x encoder for text, image, video and fused inputs, its
  ``ModelMeta`` and ``register`` (so ``mteb.get_model`` loads a checkpoint), and
  ``sentence_transformer_encoder`` (mteb over a ``SentenceTransformer`` of this model, images included).

:func:`write_integration_files` is the one call ``TTEFlashModel.save_pretrained`` makes. Only the
standard library is imported here; sentence-transformers and mteb are imported by their own modules.
See docs/integrations.md.
"""
from __future__ import annotations

import os


def write_integration_files(save_directory: str | os.PathLike, config=None) -> list[str]:
    """Write remote code, ``auto_map`` and the sentence-transformers files into a saved checkpoint.

    Call after the weights and ``config.json`` are written. Returns the file names written. Does
    nothing when this module runs as remote code (transformers re-saves remote classes itself).
    """
    if __name__ != "tte_flash.integrations":
        return []
    from .remote_code import write_remote_code
    from .st_files import write_sentence_transformers_files
    return write_remote_code(save_directory, config) + write_sentence_transformers_files(save_directory)
