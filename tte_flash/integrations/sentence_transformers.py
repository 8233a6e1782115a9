"""sentence-transformers support: ``TTEFlashST``, one input module that runs the whole model.

    model.save_pretrained("ckpt")          # also writes modules.json & co. (see st_files.py)
    st = SentenceTransformer("ckpt", trust_remote_code=True)
    st.encode_query(["a cat"])             # == model.encode_query(["a cat"])          (K = default 16)
    st.encode_query(["a cat"], think_tokens=4)
    st.encode_document([image])            # == model.encode_document([image])         (K = 0)
    st.encode(x, prompt_name="query")      # the query/document prompts select the role, too

Role: ``task`` ("query"/"document", set by ``encode_query``/``encode_document``) wins, then the
prompt markers of ``st_files.PROMPTS``; plain ``encode`` embeds as a document (K = 0), like
``TTEFlashModel.encode``. ``think_tokens=K`` overrides the role's K. A prompt string that is not a
marker becomes the instruction of every input. Embeddings are L2-normalised when
``config.normalize_embeddings`` is set, as in the native API.

Inputs are what ``TTEFlashModel.encode`` takes: str (text or an image/video path), PIL image, or a dict
with ``text``/``image``/``video``/``instruction``. Compatible with sentence-transformers 4.x-6.x.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from ..modeling import TTEFlashModel, _as_dict
from .st_files import DOCUMENT_PROMPT, MODALITIES, QUERY_PROMPT, ST_MODULE_CONFIG, write_sentence_transformers_files

try:
    from sentence_transformers.base.modules import InputModule  # sentence-transformers >= 6
except ImportError:
    try:
        from sentence_transformers.models import InputModule  # 4.x, 5.x
    except ImportError:  # sentence-transformers is not installed: the class below refuses to build
        InputModule = None

ROLES = ("query", "document")
LOAD_KWARGS = ("revision", "token", "local_files_only")


class TTEFlashST(InputModule or torch.nn.Module):
    """A sentence-transformers module: inputs -> TTE-Flash ``<emb>`` embeddings ("sentence_embedding")."""

    config_file_name = ST_MODULE_CONFIG
    config_keys: list[str] = []
    save_in_root = True
    forward_kwargs = {"task", "think_tokens"}

    def __init__(self, model: TTEFlashModel):
        if InputModule is None:
            raise ImportError("TTEFlashST needs sentence-transformers: pip install 'tte-flash[sentence-transformers]'")
        super().__init__()
        self.model = model
        self.tokenizer = model.processor.tokenizer

    @property
    def modalities(self) -> list:
        # "message" lets sentence-transformers pass mixed batches (text, images, fused dicts) through;
        # chat-message inputs themselves are not supported (the processor raises a clear error).
        return list(MODALITIES)

    def think_tokens_for(self, prompt: str | None, task: str | None, think_tokens: int | None) -> int:
        """K for a batch: an explicit ``think_tokens``, else by role (query: default K, document: 0)."""
        if think_tokens is not None:
            return think_tokens
        if task is not None and task not in ROLES:
            raise ValueError(f"unknown task {task!r}; TTE-Flash knows {ROLES}")
        role = task or {QUERY_PROMPT: "query", DOCUMENT_PROMPT: "document"}.get(prompt, "document")
        return self.model.config.default_think_tokens if role == "query" else 0

    def preprocess(self, inputs, prompt: str | None = None, task: str | None = None,
                   think_tokens: int | None = None, **kwargs) -> dict[str, Any]:
        k = self.think_tokens_for(prompt, task, think_tokens)
        self.model._check_think_tokens(k)
        items = list(inputs)
        if prompt and prompt not in (QUERY_PROMPT, DOCUMENT_PROMPT):
            items = [{**_as_dict(x), "instruction": prompt} for x in items]
        records = [self.model.processor(item, i) for i, item in enumerate(items)]
        return {"tte_batch": self.model._collate(records, k), "think_tokens": k}

    def forward(self, features: dict[str, Any], task: str | None = None, think_tokens: int | None = None,
                **kwargs) -> dict[str, Any]:
        embeddings = self.model.tte_forward(features["tte_batch"]).embeddings.float()  # (N, H)
        if self.model.config.normalize_embeddings:
            embeddings = F.normalize(embeddings, dim=-1)
        features["sentence_embedding"] = embeddings
        return features

    def get_embedding_dimension(self) -> int:
        return self.model.config.text_config.hidden_size

    get_sentence_embedding_dimension = get_embedding_dimension

    @property
    def max_seq_length(self) -> int | None:
        return None

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.model.save_pretrained(output_path)
        from .remote_code import write_remote_code  # idempotent with the save_pretrained hook
        write_remote_code(output_path, self.model.config)
        write_sentence_transformers_files(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder: str | None = None,
             revision: str | None = None, local_files_only: bool = False, model_kwargs: dict | None = None,
             **kwargs) -> "TTEFlashST":
        path = os.path.join(model_name_or_path, subfolder) if subfolder and os.path.isdir(model_name_or_path) \
            else model_name_or_path
        options = {name: value for name, value in (("revision", revision), ("token", token),
                                                   ("local_files_only", local_files_only),
                                                   ("cache_dir", cache_folder)) if value}
        model = TTEFlashModel.from_pretrained(path, **options, **(model_kwargs or {}))
        return cls(model)


def save_for_sentence_transformers(model: TTEFlashModel, save_directory: str | os.PathLike) -> list[str]:
    """Save ``model`` so ``SentenceTransformer(save_directory, trust_remote_code=True)`` loads it.

    Same as ``model.save_pretrained`` (which writes these files too once its hook is installed);
    returns the integration file names written.
    """
    from .remote_code import write_remote_code
    model.save_pretrained(save_directory)
    return write_remote_code(save_directory, model.config) + write_sentence_transformers_files(save_directory)


def to_sentence_transformer(model: TTEFlashModel, **kwargs):
    """An in-memory ``SentenceTransformer`` around ``model`` (no save/load round trip)."""
    from sentence_transformers import SentenceTransformer
    from .st_files import PROMPTS
    return SentenceTransformer(modules=[TTEFlashST(model)], prompts=dict(PROMPTS), similarity_fn_name="cosine",
                               device=kwargs.pop("device", str(model.device)), **kwargs)
