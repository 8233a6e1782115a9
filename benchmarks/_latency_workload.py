"""The latency benchmark's workload: synthetic queries, the model under test, and one callable per config.

A configuration (``Config``) is one provider at one batch size: ``baseline`` (K=0), ``tte-flash``
(K think tokens, one forward pass) or ``explicit-cot`` (N tokens generated greedily, then embedded
with K=0). ``setup`` turns it into the callable that is timed: preprocessed records in, embeddings
on the device out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from tte_flash import TTEFlashModel, collate
from tte_flash.modeling import _append_text, _left_padded_generation_inputs

ATTN_CHOICES = ("reference", "triton", "sdpa", "flash_attention_2")
INSTRUCTIONS = ("Represent the given image with the following question: ",
                "Find a document that answers the question about this image: ",
                "Retrieve the caption that best matches the image and the question: ")
QUESTIONS = ("Which vehicle is the second closest to the camera?", "How many people are wearing a red hat?",
             "What is written on the sign to the left of the door?", "Is the cup on the table empty or full?",
             "Which animal is partially hidden behind the fence?", "What colour is the largest building here?")
FILLER = ("the scene shows a street with parked cars, a bicycle against a wall, two people talking near a shop "
          "window, a dog on a lead, trees along the pavement and a bus in the distance under a grey sky. ")


# ---------------------------------------------------------------------------------------------- inputs

def synthetic_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A PIL-drawn scene: a colour gradient with random rectangles, ellipses and lines."""
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 256, 3)
    grad = (base + 80 * np.stack([x / width, y / height, (x + y) / (width + height)], -1)) % 256
    image = Image.fromarray(grad.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        colour = tuple(rng.integers(0, 256, 3).tolist())
        shape = rng.integers(3)
        if shape == 0:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        elif shape == 1:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, 8)))
    return image


def make_queries(n: int, seed: int, image_size: tuple[int, int] | None) -> list[dict]:
    """``n`` queries like the real workload: an instruction, a question and (unless None) an image."""
    rng = np.random.default_rng(seed)
    queries = []
    for i in range(n):
        query = {"instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)], "text": QUESTIONS[i % len(QUESTIONS)]}
        if image_size is not None:
            query["image"] = synthetic_image(rng, *image_size)
        queries.append(query)
    return queries


def records_of_length(processor, queries: list[dict], query_tokens: int) -> list:
    """Records of exactly ``query_tokens`` tokens each: the question padded (or cut) with filler text."""
    records = []
    for query in queries:
        fixed = processor({**query, "text": " "}).input_ids.numel() - 1  # instruction + image block
        room = query_tokens - fixed
        if room < 1:
            raise ValueError(f"query length {query_tokens} is below the instruction + image's {fixed + 1} tokens")
        filler = query["text"] + " " + FILLER * (1 + room // len(FILLER))
        ids = processor.tokenizer(filler, add_special_tokens=False).input_ids[:room]
        records.append(processor({**query, "text": processor.tokenizer.decode(ids)}))
    return records


# ---------------------------------------------------------------------------------------------- model

@dataclass
class Bench:
    """The model and how its text attention runs in this benchmark."""
    model: TTEFlashModel
    device: torch.device
    attn: str  # one of ATTN_CHOICES

    @property
    def packed(self) -> bool:
        return self.attn in ("reference", "triton")


def build_bench(preset: str, device: torch.device, dtype: torch.dtype, attn: str, seed: int) -> Bench:
    torch.manual_seed(seed)
    model = TTEFlashModel.from_preset(preset).to(device=device, dtype=dtype).eval()
    if attn in ("reference", "triton"):
        model.config.attn_backend = attn
    else:
        if model.config.think_bidirectional:
            raise ValueError(f"--attn {attn} is plain causal attention; this model has think_bidirectional=True")
        for cfg in {id(c): c for c in (model.config.text_config, model.model.language_model.config)}.values():
            cfg._attn_implementation = attn  # transformers reads this at call time (attention and mask)
    return Bench(model, device, attn)


@torch.inference_mode()
def embed(bench: Bench, records: list, think_tokens: int) -> torch.Tensor:
    """(B, H) ``<emb>`` states of ``[query][think x K][<emb>]``, left on the device."""
    model, processor = bench.model, bench.model.processor
    if bench.packed:
        batch = collate(records, processor.think_token_ids, processor.emb_token_id, think_tokens=think_tokens,
                        packed=True, pad_id=processor.tokenizer.pad_token_id)
        return model.tte_forward(batch).embeddings
    tail = processor.think_token_ids[:think_tokens] + [processor.emb_token_id]  # positions continue as text
    inputs = _left_padded_generation_inputs([_append_text(r, tail) for r in records],
                                            processor.tokenizer.pad_token_id, model)
    for name in ("pixel_values", "pixel_values_videos"):
        if name in inputs:
            inputs[name] = inputs[name].to(model.model.visual.dtype)
    layer = model.config.embedding_layer
    out = model.model(**inputs, use_cache=False, output_hidden_states=layer != -1)
    if layer == -1:
        return out.last_hidden_state[:, -1]
    return model.model.language_model.norm(out.hidden_states[layer][:, -1])


@torch.inference_mode()
def generate_traces(bench: Bench, records: list, new_tokens: int) -> list[list[int]]:
    """Exactly ``new_tokens`` greedy tokens per record (transformers ``generate``, KV cache, EOS held off)."""
    model, tokenizer = bench.model, bench.model.processor.tokenizer
    inputs = _left_padded_generation_inputs(records, tokenizer.pad_token_id, model)
    out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    traces = out[:, inputs["input_ids"].shape[1]:].tolist()
    return [_as_text_ids(bench, trace) for trace in traces]


def _as_text_ids(bench: Bench, ids: list[int]) -> list[int]:
    """A random model may emit vision placeholders, think tokens or <emb>; read them back as plain text."""
    config, processor = bench.model.config, bench.model.processor
    special = {config.image_token_id, config.video_token_id, config.vision_start_token_id,
               config.vision_end_token_id, processor.emb_token_id, *processor.think_token_ids}
    space = processor.tokenizer(" ", add_special_tokens=False).input_ids[0]
    return [space if token in special else token for token in ids]


# ---------------------------------------------------------------------------------------------- configs

@dataclass
class Config:
    provider: str  # "baseline" (K=0), "tte-flash" (K think tokens), "explicit-cot" (N generated tokens)
    batch_size: int
    think_tokens: int = 0
    cot_tokens: int = 0
    sweep_query_tokens: int | None = None  # set for rows of the query-length sweep
    anchor: bool = False  # timed only as a reference of its group's rounds (K=0, K=ref); no row of its own

    @property
    def label(self) -> str:
        if self.provider == "explicit-cot":
            return f"explicit-cot N={self.cot_tokens}"
        return f"{self.provider} K={self.think_tokens}"


def setup(bench: Bench, records: list, config: Config) -> Callable[[], dict]:
    """The timed callable of one configuration: records -> embeddings on the device (plus bookkeeping)."""
    records = records[:config.batch_size]
    if config.provider in ("baseline", "tte-flash"):
        return lambda: {"embeddings": embed(bench, records, config.think_tokens)}

    def explicit_cot():
        traces = generate_traces(bench, records, config.cot_tokens)
        embeddings = embed(bench, [_append_text(r, t) for r, t in zip(records, traces)], 0)
        return {"embeddings": embeddings, "generated_tokens": [len(t) for t in traces]}
    return explicit_cot
