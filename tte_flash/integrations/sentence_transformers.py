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
marker becomes the instruction of every input.

As sentence-transformers users expect:

* ``normalize_embeddings``: the module returns the raw ``<emb>`` vectors and sentence-transformers
  normalises them when asked (``normalize_embeddings=True``; its default is False). The native API
  normalises by default (``config.normalize_embeddings``): ``st.encode_query(x, normalize_embeddings=True)``
  equals ``model.encode_query(x)``. Cosine scores (``st.similarity``) are the same either way.
* ``max_seq_length`` (get and set; ``None`` restores the default): the most tokens of an input
  (instruction, image/video and text tokens), text cut from the end, as sentence-transformers truncates;
  the ``K`` think tokens and ``<emb>`` come after it. The default is the processor's limit
  (``config.max_query_tokens``). A value set is saved with the model (``sentence_bert_config.json``).
  An image or video longer than the limit is an error (vision blocks are never cut).
* ``output_value``: ``"sentence_embedding"`` (default) or ``None``; ``"token_embeddings"`` is a
  ``ValueError`` (one ``<emb>`` vector per input; there are no per-token embeddings).
* NaN or inf in an embedding is an error naming the batch rows (``tte_flash.ranking.check_finite``).

Inputs are what ``TTEFlashModel.encode`` takes: str (text or an image/video path), PIL image, or a dict
with ``text``/``image``/``video``/``instruction``; and chat messages (the ``"message"`` modality, which
also lets sentence-transformers pass mixed batches): a ``{"role", "content"}`` dict or a list of them,
``content`` a str or a list of ``{"type": "text"|"image"|"video", ...}`` parts; system messages become
the instruction, the other messages' text is joined by newlines, at most one image and one video (laid
out before the text). Needs sentence-transformers >= 5 (``encode_query``/``encode_document``).
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from ..modeling import TTEFlashModel, _as_dict
from ..ranking import check_finite
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
TRUNCATION_WARNING = "inputs longer than max_query_tokens"  # tte_flash.processing's; silent under max_seq_length


class Features(dict):
    """``forward``'s output. A key it does not have is a clear error: sentence-transformers reads
    ``output_value`` from it (``"token_embeddings"`` would otherwise be a bare KeyError)."""

    def __missing__(self, key):
        if key in ("token_embeddings", "attention_mask"):
            raise ValueError(f"TTE-Flash has no {key!r}: it embeds each input as one vector (the <emb> token's "
                             "hidden state after the think tokens); use output_value='sentence_embedding' (the "
                             "default) or output_value=None")
        raise KeyError(key)


def message_input(item, index: int = 0):
    """A chat message (``{"role", "content"}``) or a list of them as a TTE-Flash input dict; other inputs as
    they are. System messages give the instruction; text parts are joined by newlines; one image and one
    video at most."""
    messages = [item] if isinstance(item, dict) else item
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
        return item
    texts, system, out = [], [], {}
    for message in messages:
        parts = message["content"]
        parts = [{"type": "text", "text": parts}] if isinstance(parts, str) else parts
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                (system if message["role"] == "system" else texts).append(part.get("text") or "")
            elif kind in ("image", "video"):
                value = part.get(kind, part.get("url", part.get("path")))
                if kind in out:
                    raise ValueError(f"input {index}: more than one {kind} in the message; TTE-Flash embeds at most "
                                     "one image and one video per input")
                if value is None:
                    raise ValueError(f"input {index}: a {kind} part without its {kind!r} value")
                out[kind] = value
            else:
                raise ValueError(f"input {index}: message content part {part!r} is not text, image or video")
    text = "\n".join(t for t in texts if t)
    if text:
        out["text"] = text
    if any(system):
        out["instruction"] = "\n".join(t for t in system if t)
    return out


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
        self._max_seq_length = None

    @property
    def modalities(self) -> list:
        # "message": chat messages (see message_input); it also lets sentence-transformers pass mixed batches
        return list(MODALITIES)

    @property
    def max_seq_length(self) -> int:
        """The most tokens of an input before its think tokens and ``<emb>`` (text cut from the end)."""
        default = self.model.processor.max_query_tokens
        return default if self._max_seq_length is None else min(self._max_seq_length, default)

    @max_seq_length.setter
    def max_seq_length(self, value: int | None) -> None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"max_seq_length must be a positive int or None, got {value!r}")
        self._max_seq_length = value

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
        items = [message_input(x, i) for i, x in enumerate(inputs)]
        if prompt and prompt not in (QUERY_PROMPT, DOCUMENT_PROMPT):
            items = [{**_as_dict(x), "instruction": prompt} for x in items]
        with warnings.catch_warnings():
            if self._max_seq_length is not None:  # truncation asked for: silent, as in sentence-transformers
                warnings.filterwarnings("ignore", message=TRUNCATION_WARNING)
            records = [self.model.processor(item, i, self.max_seq_length) for i, item in enumerate(items)]
        return {"tte_batch": self.model._collate(records, k), "think_tokens": k}

    def forward(self, features: dict[str, Any], task: str | None = None, think_tokens: int | None = None,
                **kwargs) -> dict[str, Any]:
        # raw <emb> vectors: sentence-transformers normalises them when asked (normalize_embeddings=True)
        embeddings = self.model.tte_forward(features["tte_batch"]).embeddings.float()  # (N, H)
        check_finite(embeddings, f"sentence-transformers embeddings (think_tokens={features.get('think_tokens')})",
                     label="batch row")
        return Features(features, sentence_embedding=embeddings)

    def get_embedding_dimension(self) -> int:
        return self.model.config.text_config.hidden_size

    get_sentence_embedding_dimension = get_embedding_dimension

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.model.save_pretrained(output_path)
        from .remote_code import write_remote_code  # idempotent with the save_pretrained hook
        write_remote_code(output_path, self.model.config)
        write_sentence_transformers_files(output_path, max_seq_length=self._max_seq_length)

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
        module = cls(model)
        load_config = getattr(cls, "load_config", None)  # sentence-transformers >= 5
        config = load_config(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                             revision=revision, local_files_only=local_files_only) if load_config else {}
        module.max_seq_length = config.get("max_seq_length")  # saved when one was set
        return module


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
