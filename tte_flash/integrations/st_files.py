"""The sentence-transformers files of a checkpoint (JSON only; sentence-transformers is not imported).

``modules.json`` names one module, ``TTEFlashST``, from the flat remote-code file written beside the
weights, so ``SentenceTransformer(dir, trust_remote_code=True)`` works with or without ``tte_flash``
installed. The prompts ``query``/``document`` are markers, not text: sentence-transformers hands the
module only the prompt string, and the module reads these two as "encode as query" (think tokens,
``config.default_think_tokens``) and "encode as document" (no think tokens). Any other prompt string
is used as the instruction.

``sentence_bert_config.json`` lists the input modalities (``modality_config``, the layout of
sentence-transformers' own multimodal modules): the module ignores it, and mteb reads it to declare a
Hub model's modalities (``ModelMeta.from_hub``), so image and video tasks are not refused.
"""
from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

QUERY_PROMPT = "<|tte_query|>"
DOCUMENT_PROMPT = "<|tte_document|>"
PROMPTS = {"query": QUERY_PROMPT, "document": DOCUMENT_PROMPT}
ST_MODULE_FILE = "tte_flash_integrations_sentence_transformers"  # flat name written by remote_code
ST_MODULE_CLASS = "TTEFlashST"
ST_MODULE_CONFIG = "sentence_bert_config.json"
MODALITIES = ("text", "image", "video", "message")  # as TTEFlashST.modalities ("message": chat messages)


def write_sentence_transformers_files(save_directory: str | os.PathLike,
                                      max_seq_length: int | None = None) -> list[str]:
    """Write ``modules.json``, ``config_sentence_transformers.json`` and ``sentence_bert_config.json``
    (with ``max_seq_length`` when one is given: ``TTEFlashST.max_seq_length`` set by the user)."""
    save_directory = Path(save_directory)
    files = {
        "modules.json": [{"idx": 0, "name": "0", "path": "", "type": f"{ST_MODULE_FILE}.{ST_MODULE_CLASS}"}],
        "config_sentence_transformers.json": {
            "__version__": {name: version for name, package in (
                ("sentence_transformers", "sentence-transformers"), ("transformers", "transformers"),
                ("pytorch", "torch")) if (version := _version(package))},
            "model_type": "SentenceTransformer",
            "prompts": PROMPTS,
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
        ST_MODULE_CONFIG: {"modality_config": {
            modality: {"method": "forward", "method_output_name": "sentence_embedding"} for modality in MODALITIES}},
    }
    if max_seq_length is not None:
        files[ST_MODULE_CONFIG]["max_seq_length"] = max_seq_length
    for name, content in files.items():
        (save_directory / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return list(files)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
