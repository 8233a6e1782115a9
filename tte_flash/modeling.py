"""``TTEFlashModel``: Qwen2-VL with latent think tokens, as an embedding model.

The model *is* a ``Qwen2VLForConditionalGeneration`` (same modules, same weight names), so with
``think_bidirectional=False`` a saved checkpoint loads in plain transformers and reproduces the
embedding from ``[query][think][<emb>]`` with last-token pooling. The class is split by what it does:

* this file - the forward: :meth:`TTEFlashModel.tte_forward`, one pass over packed ``[query][think][emb][cot]``
  samples under the TTE mask (DESIGN.md §3), returning the ``<emb>`` states and the COT NLL; training code
  only calls this;
* ``tte_flash.loading`` - :meth:`from_preset`, :meth:`from_backbone`, :meth:`from_pretrained`, :meth:`save_pretrained`;
* ``tte_flash.embedding`` - :meth:`encode_query` / :meth:`encode_document` / :meth:`encode` / :meth:`similarity`,
  streamed and batched by a token budget (``tte_flash.encoding``), and ``mode="explicit-cot"`` (the
  "Think Then Embed" baseline: generate a trace, embed query + trace);
* ``tte_flash.reasoning`` - :meth:`generate_cot` (decode the reasoning the think tokens carry),
  :meth:`generate_traces`, :meth:`explain`.

The text model's attention is this package's (``tte_flash.attention``); the vision tower keeps its own.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import AutoModel, Qwen2VLForConditionalGeneration

from .attention import ATTN_NAME, TTELayout, resolve_backend
from .configuration import TTEFlashConfig
from .embedding import MODES, EmbeddingMixin
from .loading import PRESET_DIR, LoadingMixin, _read_config_dict, available_presets
from .losses import linear_cross_entropy
from .processing import TTEProcessor, normalize_input
from .processing import append_text as _append_text
from .reasoning import ReasoningMixin, _left_padded_generation_inputs

# names other modules import from here
__all__ = ["TTEFlashModel", "TTEOutput", "available_presets", "PRESET_DIR", "MODES", "_append_text",
           "_left_padded_generation_inputs", "_as_dict", "_read_config_dict"]


@dataclass
class TTEOutput:
    embeddings: torch.Tensor  # (N, H) hidden state at each sample's <emb>, not normalised
    cot_loss: torch.Tensor | None = None  # mean NLL over COT tokens (None without COT)
    cot_logits: torch.Tensor | None = None  # (M, V) logits predicting each COT token
    cot_accuracy: torch.Tensor | None = None  # greedy token accuracy over COT tokens
    cot_nll_sum: torch.Tensor | None = None  # summed NLL over COT tokens (what the training objective uses)
    cot_correct: torch.Tensor | None = None  # greedy hits over COT tokens


class TTEFlashModel(LoadingMixin, EmbeddingMixin, ReasoningMixin, Qwen2VLForConditionalGeneration):
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


def _as_dict(item) -> dict:
    return dict(normalize_input(item))


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
