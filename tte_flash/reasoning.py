"""Decoding text from a :class:`~tte_flash.modeling.TTEFlashModel` (mixed into the model class).

* :meth:`ReasoningMixin.generate_cot` - the chain of thought the think tokens carry (the CoT branch,
  DESIGN.md §3), under the training mask, no KV cache: an inspection tool;
* :meth:`ReasoningMixin.generate_traces` - explicit reasoning with transformers' ``generate`` (the
  "Think" of the "Think Then Embed" baseline, ``mode="explicit-cot"``);
* :meth:`ReasoningMixin.explain` - what each think token decodes to, and where it looks (``tte_flash.explain``).
"""
from __future__ import annotations

import inspect

import torch
from tqdm.auto import tqdm

from .encoding import show_progress
from .processing import SINGLE_INPUT_TYPES, QueryRecord


class ReasoningMixin:
    """Generation methods; they use the model's ``_collate`` / ``_last_hidden`` and transformers' ``generate``."""

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
        for start in tqdm(starts, desc="Decoding CoT", disable=not show_progress(show_progress_bar, len(starts))):
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

    def _generate_trace_ids(self, records, max_new_tokens, batch_size, show_progress_bar) -> list[list[int]]:
        """Explicit CoT: greedy generation from each query with the KV cache (transformers ``generate``)."""
        tokenizer = self.processor.tokenizer
        traces = []
        starts = range(0, len(records), batch_size)
        for start in tqdm(starts, desc="Generating CoT", disable=not show_progress(show_progress_bar, len(starts))):
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
