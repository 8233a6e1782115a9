"""``TTEFlashConfig``: a Qwen2-VL config plus the think-token settings.

It subclasses transformers' ``Qwen2VLConfig`` so the backbone fields (``text_config``,
``vision_config``, image/video token ids) keep their standard names and a saved checkpoint's weights
are laid out exactly like Qwen2-VL's. It is registered with ``AutoConfig`` as ``model_type="tte_flash"``.
"""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, Qwen2VLConfig


@strict
class TTEFlashConfig(Qwen2VLConfig):
    """Configuration of a TTE-Flash model.

    Backbone fields are Qwen2-VL's (``text_config``, ``vision_config``, ``image_token_id``,
    ``video_token_id``, ``vision_start_token_id``, ``vision_end_token_id``, ``tie_word_embeddings``).
    """

    model_type = "tte_flash"

    # Largest think budget K the checkpoint was built for; encode calls may use any K in [0, max].
    max_think_tokens: int = 32
    # K used when an encode_query call does not pass think_tokens. Documents default to 0.
    default_think_tokens: int = 16
    # Token ids of THINK_1..THINK_max (in order) and of <emb>; set by from_preset/from_backbone.
    think_token_ids: list[int] | None = None
    emb_token_id: int | None = None
    # Think tokens attend to each other in both directions (needs this package's attention, not
    # exportable to plain Qwen2-VL). False keeps the mask plain causal at inference.
    think_bidirectional: bool = False
    # During training/explain, COT tokens attend to the query tokens (True) or only to think/COT (False).
    cot_sees_query: bool = True
    # Which decoder layer's hidden state at <emb> is the embedding: -1 = final (normed) output,
    # -k = output of the k-th layer from the end, passed through the final norm.
    embedding_layer: int = -1
    # L2-normalise embeddings by default (encode calls may override).
    normalize_embeddings: bool = True
    # InfoNCE temperature used in training, stored with the checkpoint (VLM2Vec/TTE use 0.02). Not named
    # `temperature`: transformers would read that as a generation setting.
    contrastive_temperature: float = 0.02
    # Attention backend for the text model: "reference", "triton", or None for automatic
    # (triton on NVIDIA GPUs of compute capability 8.0 and newer, reference elsewhere; $TTE_FLASH_ATTN overrides
    # automatic).
    attn_backend: str | None = None
    # Pixel budget per image for the image processor (Qwen2-VL's min_pixels / max_pixels).
    image_min_pixels: int = 56 * 56
    image_max_pixels: int = 28 * 28 * 1280
    # Adaptive budget (think_tokens="auto"): {task: K} learned on validation data, and a linear
    # predictor {"budgets", "weight", "bias"} from the query's K=0 state (see tte_flash.budget).
    think_budget_table: dict | None = None
    think_budget_predictor: dict | None = None
    # The backbone this model was built from (from_backbone), for the model card's base_model.
    backbone_name_or_path: str | None = None
    # Frames sampled per video (even, as Qwen2-VL packs frames in pairs).
    video_max_frames: int = 8
    # Longest query/document in tokens before [think][emb]; longer inputs lose text from the end, with a
    # warning (vision blocks are kept whole). None: the backbone's max_position_embeddings - max_think_tokens - 1.
    max_query_tokens: int | None = None

    def check_tte_fields(self) -> None:
        """Raise ``ValueError`` for inconsistent think-token settings (called when a model is built; not
        named ``validate_*``, which strict dataclasses would run, wrapped in a non-ValueError)."""
        if self.max_think_tokens < 0:
            raise ValueError(f"max_think_tokens must be >= 0, got {self.max_think_tokens}")
        if not 0 <= self.default_think_tokens <= self.max_think_tokens:
            raise ValueError(f"default_think_tokens={self.default_think_tokens} must be in "
                             f"[0, max_think_tokens={self.max_think_tokens}]")
        if self.think_token_ids is not None and len(self.think_token_ids) != self.max_think_tokens:
            raise ValueError(f"config has {len(self.think_token_ids)} think_token_ids but "
                             f"max_think_tokens={self.max_think_tokens}")
        if self.attn_backend not in (None, "reference", "triton"):
            raise ValueError(f"attn_backend must be None, 'reference' or 'triton', got {self.attn_backend!r}")
        if self.max_query_tokens is not None and self.max_query_tokens < 1:
            raise ValueError(f"max_query_tokens must be >= 1 or None, got {self.max_query_tokens}")
        n_layers = self.text_config.num_hidden_layers
        if not -n_layers <= self.embedding_layer <= -1:
            raise ValueError(f"embedding_layer must be in [-{n_layers}, -1], got {self.embedding_layer}")


AutoConfig.register("tte_flash", TTEFlashConfig)
