"""``TTEFlashModel``: Qwen2-VL with latent think tokens, as an embedding model.

The model *is* a ``Qwen2VLForConditionalGeneration`` (same modules, same weight names), so with
``think_bidirectional=False`` a saved checkpoint loads in plain transformers and reproduces the
embedding from ``[query][think][<emb>]`` with last-token pooling. What this class adds:

* :meth:`tte_forward` - one pass over packed ``[query][think][emb][cot]`` samples under the TTE mask
  (DESIGN.md §3), returning the ``<emb>`` states and the COT NLL; training code only calls this;
* :meth:`encode_query` / :meth:`encode_document` / :meth:`similarity` - a sentence-transformers-like API;
* :meth:`generate_cot` - decode the reasoning the think tokens carry (the CoT branch);
* ``mode="explicit-cot"`` - the "Think Then Embed" baseline: generate a trace, embed query + trace;
* :meth:`from_preset`, :meth:`from_backbone`, :meth:`from_pretrained`, :meth:`save_pretrained`.

The text model's attention is this package's (``tte_flash.attention``); the vision tower keeps its own.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, PreTrainedConfig, Qwen2VLForConditionalGeneration

from .attention import ATTN_NAME, TTELayout, resolve_backend
from .configuration import TTEFlashConfig
from .losses import linear_cross_entropy
from .processing import SINGLE_INPUT_TYPES, TEXT, QueryRecord, TTEProcessor, collate, make_image_processor
from .tokenization import add_tte_tokens, build_byte_tokenizer

PRESET_DIR = Path(__file__).parent / "presets"
MODES = ("latent", "explicit-cot")


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


@dataclass
class TTEOutput:
    embeddings: torch.Tensor  # (N, H) hidden state at each sample's <emb>, not normalised
    cot_loss: torch.Tensor | None = None  # mean NLL over COT tokens (None without COT)
    cot_logits: torch.Tensor | None = None  # (M, V) logits predicting each COT token
    cot_accuracy: torch.Tensor | None = None  # greedy token accuracy over COT tokens
    cot_nll_sum: torch.Tensor | None = None  # summed NLL over COT tokens (what the training objective uses)
    cot_correct: torch.Tensor | None = None  # greedy hits over COT tokens


class TTEFlashModel(Qwen2VLForConditionalGeneration):
    config_class = TTEFlashConfig

    def __init__(self, config: TTEFlashConfig):
        config.check_tte_fields()
        super().__init__(config)
        self._use_tte_attention()
        self.processor: TTEProcessor | None = None

    def _use_tte_attention(self):
        """Route the text model's attention through ``tte_flash.attention``; the vision tower keeps its own."""
        for cfg in {id(c): c for c in (self.config.text_config, self.model.language_model.config)}.values():
            cfg._attn_implementation = ATTN_NAME

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_preset(cls, name: str = "tiny", **overrides) -> "TTEFlashModel":
        """A named model, offline: ``tiny-instruct`` is pretrained (the CPU world's backbone, loaded through
        :meth:`from_backbone` like Qwen2-VL-2B-Instruct); ``tiny``, ``small`` and ``qwen2-vl-2b`` are
        randomly initialised architectures.

        ``overrides`` set TTEFlashConfig fields (e.g. ``max_think_tokens=64``, ``think_bidirectional=True``).
        """
        path = PRESET_DIR / f"{name}.json"
        if not path.is_file():
            raise ValueError(f"unknown preset {name!r}; available: {available_presets()}")
        spec = json.loads(path.read_text())
        spec.pop("_comment", None)
        backbone = spec.pop("backbone", None)
        if backbone is not None:  # a pretrained preset: a Qwen2-VL directory shipped in the package
            if not (PRESET_DIR / backbone / "model.safetensors").is_file():
                raise FileNotFoundError(f"preset {name!r}: its weights are missing from {PRESET_DIR / backbone} "
                                        "(rebuild them with training/pretrain.py, see training/README.md)")
            return cls.from_backbone(PRESET_DIR / backbone, **{**spec, **overrides})
        spec.update(overrides)
        return cls.from_spec(spec, build_byte_tokenizer())

    @classmethod
    def from_spec(cls, spec: dict, tokenizer) -> "TTEFlashModel":
        """A randomly initialised model from a preset-style dict (``text_config``, ``vision_config`` and
        TTEFlashConfig fields) and a tokenizer, to which the think tokens and ``<emb>`` are added."""
        spec = dict(spec)
        think_ids, emb_id = add_tte_tokens(tokenizer, spec.get("max_think_tokens", 32))
        spec.setdefault("default_think_tokens", min(16, spec.get("max_think_tokens", 32)))
        text = dict(spec.pop("text_config"))
        text.setdefault("vocab_size", 64 * -(-len(tokenizer) // 64))
        text.update(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        token_ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
        config = TTEFlashConfig(text_config=text, **token_ids, think_token_ids=think_ids, emb_token_id=emb_id, **spec)
        model = cls(config)
        model.processor = TTEProcessor(tokenizer, model._image_processor(), config)
        return model

    @classmethod
    def from_backbone(cls, path: str | os.PathLike, max_think_tokens: int = 32, **kwargs) -> "TTEFlashModel":
        """Turn a Qwen2-VL checkpoint (directory or Hub id) into a TTE-Flash model.

        Adds ``max_think_tokens`` think tokens and ``<emb>`` to its tokenizer, with embedding rows
        initialised near the mean of the existing rows. ``kwargs``: TTEFlashConfig fields
        (``think_bidirectional``, ``embedding_layer``, ...) and ``from_pretrained`` loading options
        (``torch_dtype``, ``device_map``, ...).
        """
        path = os.fspath(path)
        config_dict = _read_config_dict(path)
        if config_dict.get("model_type") != "qwen2_vl":
            raise ValueError(f"{path} is a {config_dict.get('model_type')!r} checkpoint; from_backbone needs a "
                             "Qwen2-VL ('qwen2_vl') checkpoint")
        tte_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in TTEFlashConfig.__dataclass_fields__}
        tokenizer = AutoTokenizer.from_pretrained(path)
        original_vocab = len(tokenizer)
        think_ids, emb_id = add_tte_tokens(tokenizer, max_think_tokens)
        config_dict = {k: v for k, v in config_dict.items() if k not in ("model_type", "architectures")}
        tte_fields.setdefault("default_think_tokens", min(16, max_think_tokens))
        tte_fields.setdefault("backbone_name_or_path", path)
        config = TTEFlashConfig(**{**config_dict, **tte_fields, "max_think_tokens": max_think_tokens,
                                   "think_token_ids": think_ids, "emb_token_id": emb_id})
        model = super().from_pretrained(path, config=config, **kwargs)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            model.config.text_config.vocab_size = len(tokenizer)
        model._init_new_token_rows(think_ids + [emb_id], original_vocab)
        model._use_tte_attention()
        model.processor = TTEProcessor(tokenizer, model._image_processor(), model.config)
        return model

    @torch.no_grad()
    def _init_new_token_rows(self, token_ids: list[int], n_existing: int):
        generator = torch.Generator().manual_seed(0)
        for matrix in {id(m): m for m in (self.get_input_embeddings().weight, self.get_output_embeddings().weight)}.values():
            existing = matrix[:n_existing].float()
            noise = torch.randn(len(token_ids), matrix.shape[1], generator=generator) * existing.std() * 0.1
            matrix[token_ids] = (existing.mean(0) + noise.to(matrix.device)).to(matrix.dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "TTEFlashModel":
        """Load a saved TTE-Flash checkpoint (directory or Hub id) with its tokenizer."""
        path = os.fspath(pretrained_model_name_or_path)
        hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        config_dict = _read_config_dict(path, **hub_kwargs)
        if config_dict.get("model_type") != TTEFlashConfig.model_type:
            hint = " (use TTEFlashModel.from_backbone for a Qwen2-VL backbone)" \
                if config_dict.get("model_type") == "qwen2_vl" else ""
            raise ValueError(f"{path} is a {config_dict.get('model_type')!r} checkpoint, not a TTE-Flash "
                             f"('tte_flash') checkpoint{hint}")
        model = super().from_pretrained(path, *args, **kwargs)
        model._use_tte_attention()
        tokenizer = AutoTokenizer.from_pretrained(path, config=model.config, **hub_kwargs)
        model.processor = TTEProcessor(tokenizer, model._image_processor(), model.config)
        return model

    def save_pretrained(self, save_directory, *args, model_card: bool = True, **kwargs):
        """Save weights (safetensors), config, tokenizer, image processor and a model card (README.md,
        from the config and any result files in the directory; see ``tte_flash.card``)."""
        # Weights are saved in Qwen2-VL's original key layout, like transformers does for Qwen2-VL,
        # except for Trainer checkpoints (see tte_flash.training), whose resume loads keys as they are.
        kwargs.setdefault("save_original_format", getattr(self, "_save_original_format", True))
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.processor is not None:
            self.processor.tokenizer.save_pretrained(save_directory)
            self.processor.image_processor.save_pretrained(save_directory)
        if kwargs.get("is_main_process", True):
            from .integrations import write_integration_files  # remote code, sentence-transformers files
            write_integration_files(save_directory, self.config)
            if model_card:
                from .card import write_model_card
                write_model_card(save_directory, self.config)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload TTE-Flash model", results_dir=None, **kwargs):
        """Save (weights, processor, model card) and upload to the Hub. transformers' own push_to_hub
        would replace the generated card with a generic one, hence this override.
        ``results_dir``: a run directory whose result files (``tte_flash.card.RESULT_FILES``) go into the card."""
        import shutil
        import tempfile

        from huggingface_hub import HfApi

        from .card import RESULT_FILES, write_model_card
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            for name in RESULT_FILES.values():
                if results_dir is not None and (Path(results_dir) / name).is_file():
                    shutil.copy(Path(results_dir) / name, Path(tmp) / name)
            self.save_pretrained(tmp, model_card=False)
            write_model_card(tmp, self.config, model_id=repo_id, force=True)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message, **kwargs)

    def _image_processor(self):
        return make_image_processor(self.config.image_min_pixels, self.config.image_max_pixels)

    # ------------------------------------------------------------------ forward

    def forward(self, *args, tte_batch=None, **kwargs):
        """Qwen2-VL's forward, or :meth:`tte_forward` when ``tte_batch`` is given.

        Training calls ``model(tte_batch=...)`` so that DDP/FSDP/DeepSpeed wrappers see a forward call.
        """
        if tte_batch is not None:
            return self.tte_forward(tte_batch)
        return super().forward(*args, **kwargs)


    def tte_forward(self, batch, *, return_cot_logits: bool = False) -> TTEOutput:
        """One pass over a collated batch (``tte_flash.processing.collate``) under the TTE mask.

        Returns the ``<emb>`` hidden states of every sample (from ``config.embedding_layer``) and,
        when the batch has COT tokens, their mean NLL predicted by the LM head (COT_1 from THINK_K).
        """
        layer = self.config.embedding_layer
        out = self._text_forward(batch, output_hidden_states=layer != -1)
        final = out.last_hidden_state.flatten(0, 1)  # (B*L, H)
        emb_states = final if layer == -1 else self.model.language_model.norm(out.hidden_states[layer].flatten(0, 1))
        result = TTEOutput(embeddings=emb_states[batch.emb_index])
        if batch.cot_targets.numel():
            hidden = final[batch.cot_pred_index]  # (M, H): the states that predict each COT token
            if getattr(self.lm_head, "bias", None) is not None:
                raise ValueError("the COT loss expects an LM head without bias (Qwen2-VL has none)")
            # never the full (M, V) fp32 logits: chunked, recomputed in backward (tte_flash.losses)
            result.cot_nll_sum, result.cot_correct = linear_cross_entropy(hidden, self.lm_head.weight,
                                                                          batch.cot_targets)
            result.cot_loss = result.cot_nll_sum / batch.cot_targets.numel()
            result.cot_accuracy = result.cot_correct.float() / batch.cot_targets.numel()
            result.cot_logits = self.lm_head(hidden).float() if return_cot_logits else None
        return result

    def _embed_with_vision(self, batch) -> torch.Tensor:
        embeds = self.get_input_embeddings()(batch.input_ids)
        for pixels, grid, token_id, fn in (
                (batch.pixel_values, batch.image_grid_thw, self.config.image_token_id, self.model.get_image_features),
                (batch.pixel_values_videos, batch.video_grid_thw, self.config.video_token_id,
                 self.model.get_video_features)):
            if pixels is None:
                continue
            features = fn(pixels, grid)
            features = getattr(features, "pooler_output", features)
            if isinstance(features, (list, tuple)):
                features = torch.cat(features)
            slots = (batch.input_ids == token_id).unsqueeze(-1)
            if int(slots.sum()) != features.shape[0]:
                raise ValueError(f"{int(slots.sum())} vision placeholder tokens but {features.shape[0]} features")
            embeds = embeds.masked_scatter(slots, features.to(embeds.dtype))
        return embeds

    # ------------------------------------------------------------------ encoding API

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
        items = [inputs] if single else list(inputs)
        opts = {k: v for k, v in kwargs.items() if k not in ("convert_to_numpy", "convert_to_tensor")}
        k0 = self.encode(items, think_tokens=0, convert_to_tensor=True, **{**opts, "normalize_embeddings": False,
                                                                           "truncate_dim": None})
        budgets = predict_budgets(predictor, k0)
        out = None
        for k in sorted(set(budgets)):
            idx = [i for i, b in enumerate(budgets) if b == k]
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
    def encode(self, inputs, *, think_tokens: int = 0, batch_size: int = 32, normalize_embeddings: bool | None = None,
               truncate_dim: int | None = None, convert_to_numpy: bool = True, convert_to_tensor: bool = False,
               show_progress_bar: bool | None = None, device=None, packed: bool | None = None, mode: str = "latent",
               max_cot_tokens: int = 128, instruction: str | None = None, reasoner: "TTEFlashModel | None" = None):
        """Embed inputs: a str, PIL image, path, dict (``text``/``image``/``video``/``instruction``) or a list.

        Batches are sorted by length for speed and returned in input order; batching (packed or
        padded) never changes an embedding. ``packed=None`` packs (padding-free) on the Triton
        backend and pads on the reference backend, whose dense mask is quadratic in the row length. Returns float32 numpy (default) or a torch tensor
        (``convert_to_tensor=True``), 1-D for a single input and (n, dim) for a list.
        ``mode="explicit-cot"``: the trace is generated by ``reasoner`` (another model, e.g. the backbone
        this embedder was trained from, as in "Think Then Embed") or, by default, by this model.
        """
        self._check_think_tokens(think_tokens)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        single = isinstance(inputs, SINGLE_INPUT_TYPES)
        items = [inputs] if single else list(inputs)
        if instruction is not None:
            items = [{**_as_dict(x), "instruction": instruction} for x in items]
        if device is not None:
            self.to(device)
        if packed is None:
            packed = resolve_backend(self.config.attn_backend, self.device) == "triton"
        self.eval()
        records = [self.processor(item, i) for i, item in enumerate(items)]
        if mode == "explicit-cot" and reasoner is not None:
            texts = reasoner.generate_traces(items, max_new_tokens=max_cot_tokens, batch_size=batch_size,
                                             show_progress_bar=show_progress_bar)
            tokenizer = self.processor.tokenizer
            records = [_append_text(r, tokenizer(t, add_special_tokens=False).input_ids) for r, t in zip(records, texts)]
        elif mode == "explicit-cot":
            traces = self._generate_trace_ids(records, max_cot_tokens, batch_size, show_progress_bar)
            records = [_append_text(r, t) for r, t in zip(records, traces)]
        order = sorted(range(len(records)), key=lambda i: -records[i].input_ids.numel())
        out = torch.empty(len(records), self.config.text_config.hidden_size, dtype=torch.float32)
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="Encoding", disable=not _progress(show_progress_bar, len(starts))):
            idx = order[start:start + batch_size]
            batch = self._collate([records[i] for i in idx], think_tokens, packed=packed)
            out[idx] = self.tte_forward(batch).embeddings.float().cpu()
        if truncate_dim is not None:
            out = out[:, :truncate_dim]
        if self.config.normalize_embeddings if normalize_embeddings is None else normalize_embeddings:
            out = F.normalize(out, dim=-1)
        out = out[0] if single else out
        return out if convert_to_tensor or not convert_to_numpy else out.numpy()

    @staticmethod
    def similarity(queries, documents) -> torch.Tensor:
        """Cosine similarity, float32 ``[n_queries, n_docs]`` (tensors or numpy arrays, 1-D or 2-D)."""
        q, d = (torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
                for x in (queries, documents))
        q, d = q.reshape(-1, q.shape[-1]), d.reshape(-1, d.shape[-1])
        if q.shape[-1] != d.shape[-1]:
            raise ValueError(f"embedding sizes differ: queries {q.shape[-1]}, documents {d.shape[-1]}")
        return F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T

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

    # ------------------------------------------------------------------ reasoning

    @torch.inference_mode()
    def generate_cot(self, inputs, *, think_tokens: int | None = None, max_new_tokens: int = 128,
                     batch_size: int = 8, show_progress_bar: bool | None = None) -> list[str] | str:
        """Greedily decode the chain of thought the think tokens carry (the CoT branch of DESIGN §3).

        Each step runs the TTE forward on ``[query][think][cot so far]`` under the training mask, so
        ``think_bidirectional`` and ``cot_sees_query`` are honoured exactly. No KV cache: this reads
        what the think tokens hold; it is not a serving path.
        """
        think_tokens = self.config.default_think_tokens if think_tokens is None else think_tokens
        self._check_think_tokens(think_tokens)
        single = isinstance(inputs, SINGLE_INPUT_TYPES)
        items = [inputs] if single else list(inputs)
        self.eval()
        records = [self.processor(item, i) for i, item in enumerate(items)]
        texts = []
        starts = range(0, len(records), batch_size)
        for start in tqdm(starts, desc="Decoding CoT", disable=not _progress(show_progress_bar, len(starts))):
            ids = self._decode_from_think(records[start:start + batch_size], think_tokens, max_new_tokens)
            texts += [self.processor.tokenizer.decode(t, skip_special_tokens=True) for t in ids]
        return texts[0] if single else texts

    @torch.inference_mode()
    def generate_traces(self, inputs, *, max_new_tokens: int = 128, batch_size: int = 32,
                        show_progress_bar: bool | None = None) -> list[str] | str:
        """Explicit reasoning: greedy generation from each query with no think tokens (KV cache), as text.
        This is the "Think" of the explicit "Think Then Embed" pipeline (what ``mode="explicit-cot"`` embeds)."""
        single = isinstance(inputs, SINGLE_INPUT_TYPES)
        items = [inputs] if single else list(inputs)
        self.eval()
        records = [self.processor(item, i) for i, item in enumerate(items)]
        ids = self._generate_trace_ids(records, max_new_tokens, batch_size, show_progress_bar)
        texts = [self.processor.tokenizer.decode(t, skip_special_tokens=True) for t in ids]
        return texts[0] if single else texts

    def explain(self, query, *, think_tokens: int | None = None, **kwargs):
        """Per think token, the top vocabulary tokens its hidden state decodes to (LM head), the CoT
        :meth:`generate_cot` decodes, and attention heatmaps to the image. See ``tte_flash.explain``."""
        from .explain import explain
        return explain(self, query, think_tokens=think_tokens, **kwargs)

    def _decode_from_think(self, records, think_tokens, max_new_tokens) -> list[list[int]]:
        eos = self.processor.tokenizer.eos_token_id
        generated = [[] for _ in records]
        done = [False] * len(records)
        for _ in range(max_new_tokens):
            # a dummy last token marks the slot whose logits predict the next COT token
            batch = self._collate(records, think_tokens, cot_ids=[g + [eos] for g in generated])
            predictor = batch.cot_pred_index.split([len(g) + 1 for g in generated])
            batch.cot_targets = batch.cot_targets[:0]  # no loss needed
            hidden = self._last_hidden(batch)
            next_ids = self.lm_head(hidden[torch.stack([p[-1] for p in predictor])]).argmax(-1).tolist()
            for i, token in enumerate(next_ids):
                if not done[i]:
                    done[i] = token == eos
                    if not done[i]:
                        generated[i].append(token)
            if all(done):
                break
        return generated

    def _last_hidden(self, batch) -> torch.Tensor:
        """Final hidden states (B*L, H) of a collated batch under the TTE mask."""
        return self._text_forward(batch).last_hidden_state.flatten(0, 1)

    def _text_forward(self, batch, output_hidden_states=False, **layout_fields):
        """The text model over a collated batch (moved to the model's device) under the TTE mask."""
        device = self.get_input_embeddings().weight.device
        batch.to(device, dtype=self.model.visual.dtype)
        layout = TTELayout(batch.seq_ids, batch.token_types, think_bidirectional=self.config.think_bidirectional,
                           cot_sees_query=self.config.cot_sees_query,
                           backend=resolve_backend(self.config.attn_backend, device))
        for name, value in layout_fields.items():
            setattr(layout, name, value)
        return self.model.language_model(inputs_embeds=self._embed_with_vision(batch), position_ids=batch.position_ids,
                                         attention_mask={"full_attention": layout, "sliding_attention": layout},
                                         use_cache=False, output_hidden_states=output_hidden_states)

    def _generate_trace_ids(self, records, max_new_tokens, batch_size, show_progress_bar) -> list[list[int]]:
        """Explicit CoT: greedy generation from each query with the KV cache (transformers ``generate``)."""
        tokenizer = self.processor.tokenizer
        traces = []
        starts = range(0, len(records), batch_size)
        for start in tqdm(starts, desc="Generating CoT", disable=not _progress(show_progress_bar, len(starts))):
            chunk = records[start:start + batch_size]
            kwargs = _left_padded_generation_inputs(chunk, tokenizer.pad_token_id, self)
            out = self.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            special = set(tokenizer.all_special_ids) | set(self.processor.think_token_ids) | {
                self.processor.emb_token_id, self.config.image_token_id, self.config.video_token_id}
            for row in out[:, kwargs["input_ids"].shape[1]:].tolist():
                row = row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
                traces.append([t for t in row if t not in special])  # a trace is plain text
        return traces


def _left_padded_generation_inputs(records: list[QueryRecord], pad_id: int, model) -> dict:
    width = max(r.input_ids.numel() for r in records)
    device = model.get_input_embeddings().weight.device
    input_ids = torch.full((len(records), width), pad_id, dtype=torch.long)
    mm_types = torch.zeros_like(input_ids)
    attention_mask = torch.zeros_like(input_ids)
    for i, r in enumerate(records):
        n = r.input_ids.numel()
        input_ids[i, width - n:], mm_types[i, width - n:], attention_mask[i, width - n:] = r.input_ids, r.mm_types, 1
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [getattr(r, name) for r in records if getattr(r, name) is not None]
        if parts:
            kwargs[name] = torch.cat(parts)
    if "mm_token_type_ids" in inspect.signature(model.model.forward).parameters:
        kwargs["mm_token_type_ids"] = mm_types
    return {k: v.to(device) for k, v in kwargs.items()}


def _append_text(record: QueryRecord, token_ids: list[int]) -> QueryRecord:
    """The record with ``token_ids`` appended as query text (positions continue after the query)."""
    ids = torch.tensor(token_ids, dtype=torch.long)
    n, p = ids.numel(), record.next_position
    return QueryRecord(input_ids=torch.cat([record.input_ids, ids]),
                       mm_types=torch.cat([record.mm_types, torch.full((n,), TEXT)]),
                       pixel_values=record.pixel_values, image_grid_thw=record.image_grid_thw,
                       pixel_values_videos=record.pixel_values_videos, video_grid_thw=record.video_grid_thw,
                       positions=torch.cat([record.positions, torch.arange(p, p + n).expand(3, -1)], dim=1),
                       next_position=p + n)


def _as_dict(item) -> dict:
    from .processing import normalize_input
    return dict(normalize_input(item))


def _progress(flag: bool | None, n_batches: int) -> bool:
    """sentence-transformers' habit: no bar unless asked for, or the package logs at INFO or below."""
    if flag is not None:
        return flag
    return n_batches > 1 and logging.getLogger("tte_flash").getEffectiveLevel() <= logging.INFO


def _read_config_dict(path: str, **hub_kwargs) -> dict:
    """config.json of a local directory or Hub id, with a clear error when neither exists."""
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).suffix != ""
    if not Path(path).exists() and looks_local:
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(path, **hub_kwargs)
    except OSError as err:
        raise FileNotFoundError(f"checkpoint not found: {path} (no such directory, and the Hub lookup failed: "
                                f"{str(err).splitlines()[0]})") from None
    return config_dict


_parent_signature = inspect.signature(Qwen2VLForConditionalGeneration.forward)
TTEFlashModel.forward.__signature__ = _parent_signature.replace(parameters=[
    *(p for p in _parent_signature.parameters.values() if p.kind != p.VAR_KEYWORD),
    inspect.Parameter("tte_batch", inspect.Parameter.KEYWORD_ONLY, default=None),
    *(p for p in _parent_signature.parameters.values() if p.kind == p.VAR_KEYWORD)])
AutoModel.register(TTEFlashConfig, TTEFlashModel)
try:  # legacy Qwen2-VL key names (model.layers.*, visual.*) load into this class as into Qwen2-VL's
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
    _qwen2_vl_mapping = get_checkpoint_conversion_mapping("Qwen2VLForConditionalGeneration")
    if _qwen2_vl_mapping and not get_checkpoint_conversion_mapping("TTEFlashModel"):
        register_checkpoint_conversion_mapping("TTEFlashModel", _qwen2_vl_mapping)
except ImportError:  # older transformers 5.x keep the mapping on the class, which this class inherits
    pass
