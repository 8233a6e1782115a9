"""Analytic model FLOPs of one latency configuration, and the GPU peaks MFU is measured against.

2 x matmul parameters x tokens for the text model, the vision tower (its merger on the merged
tokens) and, when generating, the LM head; plus attention, 4 x head_dim x heads per visible
query-key pair per layer (causal text, per-frame full attention in the vision tower). Padding is
not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from _latency_workload import Config
from tte_flash import TTEFlashModel

# dense tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name() and dtype
PEAK_TFLOPS = {"H100": {"bfloat16": 989.0, "float16": 989.0}, "H200": {"bfloat16": 989.0, "float16": 989.0},
               "A100": {"bfloat16": 312.0, "float16": 312.0}}


@dataclass
class FlopModel:
    """Analytic forward FLOPs of one model (matmul parameters and attention pairs)."""
    text_params: int  # text-model matmul parameters (no embedding table)
    lm_head_params: int
    vision_params: int  # vision tower without its merger
    merger_params: int
    text_attn: int  # 4 * head_dim * heads * layers: FLOPs per visible query-key pair
    vision_attn: int
    merge: int  # spatial_merge_size ** 2

    @classmethod
    def of(cls, model: TTEFlashModel) -> "FlopModel":
        text, vision = model.config.text_config, model.config.vision_config

        def count(module, skip=()):
            return sum(p.numel() for n, p in module.named_parameters() if p.dim() > 1 and not n.startswith(skip))
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(text_params=count(model.model.language_model, skip=("embed_tokens",)),
                   lm_head_params=model.lm_head.weight.numel(),
                   vision_params=count(model.model.visual, skip=("merger",)),
                   merger_params=count(model.model.visual.merger),
                   text_attn=4 * head_dim * text.num_attention_heads * text.num_hidden_layers,
                   vision_attn=4 * vision.embed_dim * vision.depth,
                   merge=vision.spatial_merge_size ** 2)

    def vision(self, record) -> int:
        total = 0
        for grid in (record.image_grid_thw, record.video_grid_thw):
            for t, h, w in ([] if grid is None else grid.tolist()):
                patches = t * h * w
                # per frame-group attention in Qwen2-VL's tower: t blocks of h*w patches
                total += 2 * self.vision_params * patches + self.vision_attn * t * (h * w) ** 2
                total += 2 * self.merger_params * patches // self.merge
        return total

    def prefill(self, context: int, tokens: int) -> int:
        """Text FLOPs of ``tokens`` new causal tokens after ``context`` cached ones."""
        pairs = tokens * context + tokens * (tokens + 1) // 2
        return 2 * self.text_params * tokens + self.text_attn * pairs

    def embed(self, record, extra_tokens: int) -> int:
        return self.vision(record) + self.prefill(0, record.input_ids.numel() + extra_tokens)

    def generate(self, record, new_tokens: int) -> int:
        length = record.input_ids.numel()
        steps = [self.prefill(length + i, 1) for i in range(new_tokens - 1)]  # token 1 comes from the prefill
        return self.vision(record) + self.prefill(0, length) + sum(steps) + 2 * self.lm_head_params * new_tokens

    def of_config(self, records: list, config: Config) -> int:
        records = records[:config.batch_size]
        if config.provider != "explicit-cot":
            return sum(self.embed(r, config.think_tokens + 1) for r in records)
        return sum(self.generate(r, config.cot_tokens) + self.embed(r, config.cot_tokens + 1) for r in records)


def peak_flops(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_TFLOPS.items():
        if key in name and dtype in table:
            return table[dtype] * 1e12
    return None


def text_tokens(query_tokens: list[int], config: Config) -> int:
    """Tokens through the text model per batch: the embedding pass, plus the prefill and decode steps."""
    if config.provider != "explicit-cot":
        return sum(length + config.think_tokens + 1 for length in query_tokens)
    return sum(length + config.cot_tokens - 1 + length + config.cot_tokens + 1 for length in query_tokens)
