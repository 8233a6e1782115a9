"""Embedding with a :class:`~tte_flash.modeling.TTEFlashModel` (mixed into the model class): a
sentence-transformers-like API.

* :meth:`EmbeddingMixin.encode_query` / :meth:`EmbeddingMixin.encode_document` / :meth:`EmbeddingMixin.encode`
  - inputs streamed and batched by a token budget (``tte_flash.encoding``), outputs in input order;
* :meth:`EmbeddingMixin.encode_to_shards` - embeddings of a large corpus into ``.npy`` shards, resumable;
* :meth:`EmbeddingMixin.similarity` - cosine similarity;
* ``think_tokens="auto"`` - a per-task table or a predictor picks K (``tte_flash.budget``).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attention import resolve_backend
from .encoding import DEFAULT_MAX_BATCH_TOKENS, encode_to_shards, iter_inputs, show_progress, stream_embeddings
from .processing import SINGLE_INPUT_TYPES, append_text, collate
from .ranking import check_finite

MODES = ("latent", "explicit-cot")


class EmbeddingMixin:
    """The encoding API; it runs the model's ``tte_forward`` on collated batches."""

    def encode_query(self, inputs, *, think_tokens: int | str | None = None, task: str | None = None, **kwargs):
        """Embed queries with ``think_tokens`` latent think tokens (default ``config.default_think_tokens``).

        ``think_tokens="auto"`` picks K per input: from ``config.think_budget_table[task]`` when the
        task is in it, else from the K=0-state predictor (``tte_flash.budget``).
        ``mode="explicit-cot"`` generates a reasoning trace (``max_cot_tokens``) with the LM head first
        and embeds query + trace (think tokens default to 0 there). See :meth:`encode` for the rest.
        """
        if think_tokens is None:
            think_tokens = 0 if kwargs.get("mode") == "explicit-cot" else self.config.default_think_tokens
        if think_tokens == "auto":
            return self._encode_auto(inputs, task, **kwargs)
        return self.encode(inputs, think_tokens=think_tokens, **kwargs)

    def _encode_auto(self, inputs, task, **kwargs):
        from .budget import predict_budgets
        table, predictor = self.config.think_budget_table or {}, self.config.think_budget_predictor
        if task is not None and task in table:
            return self.encode(inputs, think_tokens=int(table[task]), **kwargs)
        if predictor is None:
            raise ValueError("think_tokens='auto' needs a budget table entry for this task "
                             f"(task={task!r}, table has {sorted(table)}) or a budget predictor: "
                             "see tte_flash.budget and model.set_think_budget_policy")
        single = isinstance(inputs, SINGLE_INPUT_TYPES)
        items = [inputs] if single else list(iter_inputs(inputs))
        opts = {k: v for k, v in kwargs.items() if k not in ("convert_to_numpy", "convert_to_tensor")}
        k0 = self.encode(items, think_tokens=0, convert_to_tensor=True, **{**opts, "normalize_embeddings": False,
                                                                           "truncate_dim": None})
        budgets = predict_budgets(predictor, k0)
        out = None
        for k in sorted(set(budgets)):
            idx = [i for i, b in enumerate(budgets) if b == k]
            if k == 0:  # the K=0 pass already embedded these: reuse it, truncated and normalised as encode() does
                part, norm = k0[idx][:, :opts.get("truncate_dim")], opts.get("normalize_embeddings")
                if self.config.normalize_embeddings if norm is None else norm:
                    part = F.normalize(part, dim=-1)
            else:
                part = self.encode([items[i] for i in idx], think_tokens=k, convert_to_tensor=True, **opts)
            out = part.new_empty(len(items), part.shape[1]) if out is None else out
            out[idx] = part
        out = out[0] if single else out
        return out if kwargs.get("convert_to_tensor") or kwargs.get("convert_to_numpy") is False else out.numpy()

    def set_think_budget_policy(self, table: dict | None = None, predictor: dict | None = None):
        """Store a per-task budget table and/or a K=0-state predictor (saved with the checkpoint)."""
        for budgets in ([*(table or {}).values()] + list((predictor or {}).get("budgets", []))):
            self._check_think_tokens(int(budgets))
        if table is not None:
            self.config.think_budget_table = {str(k): int(v) for k, v in table.items()}
        if predictor is not None:
            self.config.think_budget_predictor = predictor

    def encode_document(self, inputs, *, think_tokens: int = 0, **kwargs):
        """Embed documents/targets (no think tokens by default). See :meth:`encode`."""
        return self.encode(inputs, think_tokens=think_tokens, **kwargs)

    @torch.inference_mode()
    def encode(self, inputs, *, think_tokens: int = 0, batch_size: int = 32,
               max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS, max_length: int | None = None,
               normalize_embeddings: bool | None = None, truncate_dim: int | None = None,
               convert_to_numpy: bool = True, convert_to_tensor: bool = False, show_progress_bar: bool | None = None,
               device=None, packed: bool | None = None, mode: str = "latent", max_cot_tokens: int = 128,
               instruction: str | None = None, reasoner=None):
        """Embed inputs: one input (a str, PIL image, path, dict with ``text``/``image``/``video``/``instruction``),
        or a list, any iterable (read lazily) or a ``datasets.Dataset`` of them.

        Inputs are streamed: read a window at a time, sorted by length, cut into batches of at most
        ``batch_size`` inputs and ``max_batch_tokens`` tokens (None: no token limit), each batch preprocessed
        just before its forward pass; outputs come back in input order and batching never changes an
        embedding. ``max_length``: the most tokens an input may have, ``[think][<emb>]`` included; longer
        inputs lose text from the end, with a warning (default: ``config.max_query_tokens`` for the query
        part). ``packed=None`` packs (padding-free) on the Triton backend and pads on the reference backend,
        whose dense mask is quadratic in the row length. Returns float32 numpy (default) or a torch tensor
        (``convert_to_tensor=True``), 1-D for a single input and (n, dim) otherwise.
        ``mode="explicit-cot"``: the trace is generated by ``reasoner`` (another model, e.g. the backbone
        this embedder was trained from, as in "Think Then Embed") or, by default, by this model.
        """
        self._check_think_tokens(think_tokens)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        for name, value in (("batch_size", batch_size), ("max_batch_tokens", max_batch_tokens),
                            ("max_length", max_length), ("truncate_dim", truncate_dim)):
            if (value is not None or name == "batch_size") and \
                    (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive int{'' if name == 'batch_size' else ' or None'}, "
                                 f"got {value!r}")
        self._check_truncate_dim(truncate_dim)
        if instruction is not None and not isinstance(instruction, str):
            raise ValueError(f"instruction must be a str or None, got {type(instruction).__name__}: "
                             f"{instruction!r:.80}")
        query_limit = self._query_limit(think_tokens, max_length)
        single = isinstance(inputs, SINGLE_INPUT_TYPES)
        items = [inputs] if single else iter_inputs(inputs)
        if device is not None:
            self.to(device)
        if packed is None:
            packed = resolve_backend(self.config.attn_backend, self.device) == "triton"
        self.eval()
        appended = think_tokens + 1 + (max_cot_tokens if mode == "explicit-cot" else 0)  # [trace][think][<emb>]

        def estimate(item, index):
            return self.processor.estimate_length(item, index, query_limit) + appended

        def encode_batch(batch):
            return self._encode_batch(batch, think_tokens, packed, query_limit, mode, max_cot_tokens, reasoner)
        total = 1 if single else (len(inputs) if hasattr(inputs, "__len__") else None)
        n_batches = 2 if total is None else -(-total // batch_size)
        with tqdm(total=total, desc="Encoding", unit="input",
                  disable=not show_progress(show_progress_bar, n_batches)) as bar:
            chunks = list(stream_embeddings(items, estimate=estimate, encode_batch=encode_batch, batch_size=batch_size,
                                            max_batch_tokens=max_batch_tokens, packed=packed, instruction=instruction,
                                            progress=bar))
        hidden = self.config.text_config.hidden_size
        out = torch.cat(chunks) if chunks else torch.empty(0, hidden)
        if truncate_dim is not None:
            out = out[:, :truncate_dim]
        if self.config.normalize_embeddings if normalize_embeddings is None else normalize_embeddings:
            out = F.normalize(out, dim=-1)
        out = out[0] if single else out
        return out if convert_to_tensor or not convert_to_numpy else out.numpy()

    def encode_to_shards(self, inputs, output, *, role: str = "query", shard_size: int = 10_000,
                         part: tuple[int, int] = (0, 1), overwrite: bool = False, model_name: str | None = None,
                         **kwargs) -> dict:
        """Embed a corpus (list, iterable, ``datasets.Dataset``) into ``.npy`` shards under ``output`` with
        resume; read them back with ``tte_flash.encoding.read_shards``. See ``tte_flash.encoding``."""
        self._check_truncate_dim(kwargs.get("truncate_dim"))  # before any shard is written
        return encode_to_shards(self, inputs, output, role=role, shard_size=shard_size, part=part,
                                overwrite=overwrite, model_name=model_name, **kwargs)

    def _query_limit(self, think_tokens: int, max_length: int | None) -> int:
        """Most tokens of an input before [think][<emb>]: config.max_query_tokens, lowered by max_length."""
        limit = self.processor.max_query_tokens
        if max_length is None:
            return limit
        if max_length < think_tokens + 2:
            raise ValueError(f"max_length={max_length} leaves no room for the input: {think_tokens} think tokens "
                             f"and <emb> take {think_tokens + 1}")
        return min(limit, max_length - think_tokens - 1)

    def _encode_batch(self, batch, think_tokens, packed, query_limit, mode, max_cot_tokens, reasoner) -> torch.Tensor:
        """Preprocess and embed one batch of ``(index, input)``: (n, hidden) float32 on the CPU."""
        records = [self.processor(item, index, query_limit) for index, item in batch]
        if mode == "explicit-cot":
            if reasoner is not None:
                texts = reasoner.generate_traces([item for _, item in batch], max_new_tokens=max_cot_tokens,
                                                 batch_size=len(batch), show_progress_bar=False)
                traces = [self.processor.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
            else:
                traces = self._generate_trace_ids(records, max_cot_tokens, len(batch), False)
            room = [query_limit - r.input_ids.numel() for r in records]
            if any(len(t) > r for t, r in zip(traces, room)):
                warnings.warn(f"query + trace longer than {query_limit} tokens: the trace is cut", stacklevel=2)
            records = [append_text(r, t[:max(n, 0)]) for r, t, n in zip(records, traces, room)]
        embeddings = self.tte_forward(self._collate(records, think_tokens, packed=packed)).embeddings.float().cpu()
        # a NaN/inf embedding is an error naming the inputs, never a vector that ranks (one isfinite per batch)
        return check_finite(embeddings, f"embeddings of a batch (think_tokens={think_tokens}, mode={mode})",
                            names=[index for index, _ in batch], label="input")

    @staticmethod
    def similarity(queries, documents) -> torch.Tensor:
        """Cosine similarity, float32 ``[n_queries, n_docs]`` (tensors or numpy arrays, 1-D or 2-D).
        A NaN or inf in an embedding raises ``tte_flash.ranking.NonFiniteScoresError`` naming its row."""
        q, d = (torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
                for x in (queries, documents))
        q, d = q.reshape(-1, q.shape[-1]), d.reshape(-1, d.shape[-1])
        if q.shape[-1] != d.shape[-1]:
            raise ValueError(f"embedding sizes differ: queries {q.shape[-1]}, documents {d.shape[-1]}")
        check_finite(q, "similarity: the query embeddings", label="query")
        check_finite(d, "similarity: the document embeddings", label="document")
        return F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T

    def _check_truncate_dim(self, truncate_dim):
        width = self.config.text_config.hidden_size
        if isinstance(truncate_dim, int) and not isinstance(truncate_dim, bool) and truncate_dim > width:
            raise ValueError(f"truncate_dim={truncate_dim} is larger than the embedding width {width}: pass at most "
                             f"{width} (or None for the full width)")

    def _check_think_tokens(self, think_tokens):
        if not isinstance(think_tokens, int) or isinstance(think_tokens, bool):
            raise ValueError(f"think_tokens must be an int, got {think_tokens!r}")
        if not 0 <= think_tokens <= self.config.max_think_tokens:
            raise ValueError(f"think_tokens={think_tokens} is out of range: this checkpoint supports 0 to "
                             f"max_think_tokens={self.config.max_think_tokens}")

    def _collate(self, records, think_tokens, cot_ids=None, packed=True):
        return collate(records, self.processor.think_token_ids, self.processor.emb_token_id,
                       think_tokens=think_tokens, cot_ids=cot_ids, packed=packed,
                       pad_id=self.processor.tokenizer.pad_token_id)
