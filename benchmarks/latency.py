"""End-to-end query latency: baseline embedder (K=0), TTE-Flash (K think tokens), explicit CoT (N tokens).

One run, one backbone, the same synthetic queries (an instruction, a question and a PIL-drawn image,
fixed seed) for every configuration:

* ``baseline``     - embed ``[query][<emb>]`` (K=0);
* ``tte-flash``    - embed ``[query][think x K][<emb>]`` in one forward pass;
* ``explicit-cot`` - the "Think Then Embed" pipeline: generate exactly N trace tokens greedily with
  transformers ``generate`` and its KV cache (EOS suppressed until N, so every row does the same
  work), then embed ``[query][trace][<emb>]`` (K=0).

What is timed: from preprocessed query records (tokenised, image processor applied, on the host) to
the embeddings on the device - collation, the host-to-device copy, the vision tower, generation and
the embedding forward. Image decoding/resizing is identical for every configuration and left out.
Timing: warm-up calls, then repeated calls taken round-robin over the configurations (so a slow
spell of a shared machine is spread over all of them), each bracketed by CUDA events
(``perf_counter`` on the CPU) with the device synchronised; medians and p90 are reported. Peak memory
is ``torch.cuda.max_memory_allocated`` over the timed calls (weights included); not measured on the CPU.

``--attn``: ``reference`` / ``triton`` set ``model.config.attn_backend`` (packed, padding-free
batches under the TTE mask); ``sdpa`` / ``flash_attention_2`` run the text model through transformers'
own attention on left-padded batches with the plain causal mask, which is the same computation when
``think_bidirectional=False`` and there is no COT (last-token pooling, as an exported checkpoint is
served). Generation always runs through transformers (under ``reference``/``triton`` the package's
attention falls back to transformers' SDPA for KV-cache calls).

Model FLOPs (for TFLOP/s and MFU) are analytic: 2 x parameters x tokens for the text model, the
vision tower and (when generating) the LM head, plus attention (4 x head_dim x heads x visible
query-key pairs per layer); padding is not counted. MFU needs a peak-FLOPs entry for the GPU
(``PEAK_TFLOPS``); it is skipped on the CPU.

    python benchmarks/latency.py --think-tokens 16
    python benchmarks/latency.py --preset qwen2-vl-2b --device cuda --dtype bfloat16 \\
        --think-tokens 0 4 16 32 --cot-tokens 64 128 256 --batch-sizes 1 8 64 --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

import tte_flash
from tte_flash import TTEFlashModel, collate
from tte_flash.attention import resolve_backend
from tte_flash.modeling import _append_text, _left_padded_generation_inputs

REPO = Path(__file__).resolve().parents[1]
ATTN_CHOICES = ("reference", "triton", "sdpa", "flash_attention_2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# dense tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name() and dtype
PEAK_TFLOPS = {"H100": {"bfloat16": 989.0, "float16": 989.0}, "H200": {"bfloat16": 989.0, "float16": 989.0},
               "A100": {"bfloat16": 312.0, "float16": 312.0}}
# warm-up calls, timed calls, and a time budget per configuration (seconds) after which a
# configuration stops repeating once it has 3 timed calls
RUN_DEFAULTS = {"tiny": (1, 5, 5.0), None: (3, 10, 60.0)}
TARGET_K, TARGET_N, TARGET_SPEEDUP, TARGET_OVERHEAD = 16, 128, 20.0, 1.10  # DESIGN.md §9

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


def timed_call(fn: Callable[[], dict], device: torch.device) -> tuple[float, int | None, dict]:
    """(milliseconds, peak device memory in bytes or None, output) of one synchronised call."""
    if device.type != "cuda":
        start = time.perf_counter()
        out = fn()
        return (time.perf_counter() - start) * 1e3, None, out
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end), torch.cuda.max_memory_allocated(device), out


def measure(fns: list[Callable[[], dict]], device: torch.device, warmup: int, repeats: int, budget_s: float):
    """Time every callable ``repeats`` times, round-robin, after ``warmup`` calls each.

    Round-robin spreads slow spells of a shared machine over all configurations instead of a few. A
    configuration stops repeating once it has 3 timed calls and has used ``budget_s`` seconds.
    Returns per callable: (timings in ms, peak device memory in bytes or None, the last output).
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    results = [([], None, None) for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            times, peak, _ = results[i]
            if len(times) >= min(3, repeats) and sum(times) / 1e3 > budget_s:
                continue
            ms, call_peak, out = timed_call(fn, device)
            results[i] = (times + [ms], call_peak if peak is None else max(peak, call_peak), out)
    return results


# ---------------------------------------------------------------------------------------------- FLOPs

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


# ---------------------------------------------------------------------------------------------- run

def run_configs(bench: Bench, records: list, configs: list[Config], args, flops: FlopModel, peak: float | None):
    fns = [setup(bench, records, config) for config in configs]
    rows = []
    for config, (times, peak_mem, out) in zip(configs, measure(fns, bench.device, args.warmup, args.repeats,
                                                               args.max_seconds)):
        if "generated_tokens" in out and set(out["generated_tokens"]) != {config.cot_tokens}:
            raise RuntimeError(f"{config.label}: generated {out['generated_tokens']} tokens, expected {config.cot_tokens}")
        median = float(np.median(times))
        batch_flops = flops.of_config(records, config)
        query_tokens = [r.input_ids.numel() for r in records[:config.batch_size]]
        rows.append({**asdict(config), "label": config.label,
                     "query_tokens_mean": float(np.mean(query_tokens)),
                     "text_tokens_per_batch": text_tokens(query_tokens, config),
                     "median_ms": median, "p90_ms": float(np.percentile(times, 90)),
                     "mean_ms": float(np.mean(times)), "min_ms": float(np.min(times)), "n_runs": len(times),
                     "times_ms": [round(t, 4) for t in times],
                     "queries_per_s": config.batch_size / (median / 1e3),
                     "peak_mem_mb": None if peak_mem is None else peak_mem / 2**20,
                     "model_flops": batch_flops, "tflops_per_s": batch_flops / (median / 1e3) / 1e12,
                     "mfu": None if peak is None else batch_flops / (median / 1e3) / peak})
        print(f"  {config.label:>22}  batch {config.batch_size:>3}  "
              + (f"L={config.sweep_query_tokens:<5} " if config.sweep_query_tokens else "")
              + f"{median:9.2f} ms  ({len(times)} runs)", file=sys.stderr, flush=True)
    return rows


def text_tokens(query_tokens: list[int], config: Config) -> int:
    """Tokens through the text model per batch: the embedding pass, plus the prefill and decode steps."""
    if config.provider != "explicit-cot":
        return sum(length + config.think_tokens + 1 for length in query_tokens)
    return sum(length + config.cot_tokens - 1 + length + config.cot_tokens + 1 for length in query_tokens)


def add_ratios(rows: list[dict], reference_k: int) -> None:
    """vs_k0 / vs_tte: median latency over the K=0 baseline / TTE-Flash K=reference_k of the same batch."""
    def key(row):
        return row["batch_size"], row["sweep_query_tokens"]
    k0 = {key(r): r["median_ms"] for r in rows if r["provider"] == "baseline"}
    tte = {key(r): r["median_ms"] for r in rows if r["provider"] == "tte-flash" and r["think_tokens"] == reference_k}
    for row in rows:
        row["vs_k0"] = row["median_ms"] / k0[key(row)] if key(row) in k0 else None
        row["vs_tte"] = row["median_ms"] / tte[key(row)] if key(row) in tte else None


def check_targets(rows: list[dict], meta: dict) -> list[dict]:
    """DESIGN.md §9 inference targets, for every batch size that has the needed rows."""
    applies = meta["device_type"] == "cuda" and meta["preset"] == "qwen2-vl-2b"
    main = [r for r in rows if r["sweep_query_tokens"] is None]
    targets = []
    for batch_size in sorted({r["batch_size"] for r in main}):
        find = {(r["provider"], r["think_tokens"], r["cot_tokens"]): r for r in main if r["batch_size"] == batch_size}
        tte, cot, k0 = (find.get(("tte-flash", TARGET_K, 0)), find.get(("explicit-cot", 0, TARGET_N)),
                        find.get(("baseline", 0, 0)))
        if tte and cot:
            speedup = cot["median_ms"] / tte["median_ms"]
            targets.append({"target": f"TTE-Flash K={TARGET_K} >= {TARGET_SPEEDUP:g}x faster than explicit CoT "
                                      f"N={TARGET_N}", "batch_size": batch_size, "value": speedup,
                            "met": speedup >= TARGET_SPEEDUP, "applies": applies})
        if tte and k0:
            overhead = tte["median_ms"] / k0["median_ms"]
            targets.append({"target": f"TTE-Flash K={TARGET_K} <= {TARGET_OVERHEAD:.2f}x the K=0 baseline",
                            "batch_size": batch_size, "value": overhead, "met": overhead <= TARGET_OVERHEAD,
                            "applies": applies})
    return targets


# ---------------------------------------------------------------------------------------------- output

def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_table(rows: list[dict], reference_k: int, show_mfu: bool, title: str) -> None:
    columns = ["config", "batch", "q tok", "median ms", "p90 ms", "queries/s", "vs K=0", f"vs K={reference_k}",
               "peak MB", "TFLOP/s"] + (["MFU"] if show_mfu else [])
    table = [[r["label"] if r["sweep_query_tokens"] is None else f"{r['label']} L={r['sweep_query_tokens']}",
              str(r["batch_size"]), f"{r['query_tokens_mean']:.0f}", f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}",
              f"{r['queries_per_s']:.1f}", _fmt(r["vs_k0"], ".2f") + ("x" if r["vs_k0"] else ""),
              _fmt(r["vs_tte"], ".2f") + ("x" if r["vs_tte"] else ""), _fmt(r["peak_mem_mb"], ".0f"),
              f"{r['tflops_per_s']:.3g}"] + ([_fmt(r["mfu"], ".1%")] if show_mfu else []) for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(columns, widths))))
    print("  ".join("-" * w for w in widths))
    for row in table:
        print("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))))


def print_sweep_summary(rows: list[dict]) -> None:
    """Per query length: what each K adds, in latency and in tokens (the cost grows only by K tokens)."""
    print("\nQuery-length sweep: latency added by K think tokens vs tokens added")
    for length in sorted({r["sweep_query_tokens"] for r in rows}):
        at = {r["think_tokens"]: r for r in rows if r["sweep_query_tokens"] == length}
        base = at.get(0)
        parts = [f"K={k}: +{(r['median_ms'] / base['median_ms'] - 1):.1%} latency, +{k / (length + 1):.1%} tokens"
                 for k, r in sorted(at.items()) if k and base]
        print(f"  L={length:<5} K=0 {base['median_ms']:.2f} ms; " + "; ".join(parts) if base else f"  L={length}: no K=0")


def print_targets(targets: list[dict]) -> None:
    if not targets:
        return
    print("\nTargets (DESIGN.md §9; they are for a GPU with the qwen2-vl-2b preset):")
    for t in targets:
        note = "" if t["applies"] else "  (informational: not a GPU + qwen2-vl-2b run)"
        print(f"  batch {t['batch_size']:>3}: {t['target']}: {t['value']:.2f}x -> "
              f"{'MET' if t['met'] else 'NOT MET'}{note}")


def plot(rows: list[dict], path: str, meta: dict, reference_k: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if r["sweep_query_tokens"] is None]
    sweep = [r for r in rows if r["sweep_query_tokens"] is not None]
    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(15 if sweep else 10, 4.2), squeeze=False)
    axes = axes[0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, batch_size in enumerate(sorted({r["batch_size"] for r in main})):
        colour = colours[i % len(colours)]
        latent = sorted((r["think_tokens"], r["median_ms"]) for r in main
                        if r["batch_size"] == batch_size and r["provider"] != "explicit-cot")
        cot = sorted((r["cot_tokens"], r["median_ms"]) for r in main
                     if r["batch_size"] == batch_size and r["provider"] == "explicit-cot")
        if latent:
            axes[0].plot(*zip(*latent), "o-", color=colour, label=f"batch {batch_size}")
            axes[1].axhline(dict(latent).get(reference_k, max(latent)[1]), color=colour, ls="--", lw=1)
        if cot:
            axes[1].plot(*zip(*cot), "s-", color=colour, label=f"explicit CoT, batch {batch_size}")
    axes[0].set(xlabel="think tokens K", ylabel="median latency per batch (ms)", title="TTE-Flash: latency vs K")
    axes[1].set(xlabel="generated CoT tokens N", ylabel="median latency per batch (ms)", yscale="log",
                title=f"Explicit CoT vs N (dashed: TTE-Flash K={reference_k})")
    for i, k in enumerate(sorted({r["think_tokens"] for r in sweep})):
        points = sorted((r["query_tokens_mean"], r["median_ms"]) for r in sweep if r["think_tokens"] == k)
        axes[2].plot(*zip(*points), "o-", color=colours[i % len(colours)], label=f"K={k}")
    if sweep:
        axes[2].set(xlabel="query tokens", ylabel="median latency per batch (ms)",
                    title=f"Latency vs query length (batch {sweep[0]['batch_size']})")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"{meta['preset']} on {meta['device_name']} ({meta['dtype']}, attn {meta['attn']}), "
                 f"commit {meta['git_commit'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args, device: torch.device) -> dict:
    def version(name):
        try:
            return __import__(name).__version__
        except Exception:  # not installed, or broken on this machine
            return None

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except Exception:
            return None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device_type": device.type, "device_name": name, "cpu_threads": torch.get_num_threads(),
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "dtype": args.dtype, "preset": args.preset, "attn": args.attn,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.version.cuda, "transformers": version("transformers"),
                         "triton": version("triton"), "flash_attn": version("flash_attn"),
                         "tte_flash": getattr(tte_flash, "__version__", None)},
            "git_commit": git("rev-parse", "HEAD") or "unknown",
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "platform": platform.platform(), "settings": {k: v for k, v in vars(args).items()}}


# ---------------------------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model architecture (random init): tiny | qwen2-vl-2b")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--attn", choices=ATTN_CHOICES, default=None,
                   help="text attention (default: the package's choice, triton on CUDA, reference elsewhere)")
    p.add_argument("--think-tokens", "--think_tokens", type=int, nargs="+", default=[4, 16, 32],
                   help="TTE-Flash think budgets K (the K=0 baseline is always run)")
    p.add_argument("--cot-tokens", "--cot_tokens", type=int, nargs="*", default=[32, 128],
                   help="explicit-CoT trace lengths N (none: skip explicit CoT)")
    p.add_argument("--batch-sizes", "--batch_sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per config (default by preset)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per config (default by preset)")
    p.add_argument("--max-seconds", "--max_seconds", type=float, default=None,
                   help="stop repeating a config after this many seconds once it has 3 timed calls")
    p.add_argument("--image-size", "--image_size", default="448x336",
                   help="WxH of the synthetic query images, or 'none' for text-only queries")
    p.add_argument("--sweep-query-length", "--sweep_query_length", type=int, nargs="*", default=[],
                   help="also time K=0 and every K at these query lengths (tokens, image included)")
    p.add_argument("--sweep-batch-size", "--sweep_batch_size", type=int, default=None,
                   help="batch size of the sweep (default: the smallest --batch-sizes)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write meta + rows + targets here (default: benchmarks/results/"
                                                 "latency-<device>-<preset>-<date>[-sweep].json)")
    p.add_argument("--plot", default=None, help="write a PNG of latency vs K and vs N (and vs query length) here "
                                                 "(default: beside the JSON, .png)")
    p.add_argument("--no-save", "--no_save", action="store_true", help="print the table only, write no files")
    args = p.parse_args(argv)

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    args.attn = args.attn or resolve_backend(None, device)
    if args.attn == "triton" and device.type != "cuda":
        p.error("--attn triton needs a CUDA device (the Triton kernel does not run on the CPU here; "
                "use --attn reference or sdpa)")
    if args.attn == "triton" and not hasattr(importlib.import_module("tte_flash.kernels"), "tte_attention"):
        p.error("--attn triton: tte_flash.kernels has no tte_attention in this checkout")
    if args.attn == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            p.error("--attn flash_attention_2 needs flash-attn (pip install 'tte-flash[flash]')")
        if device.type != "cuda" or args.dtype == "float32":
            p.error("--attn flash_attention_2 needs a CUDA device and --dtype bfloat16 or float16")
    if any(k < 0 for k in args.think_tokens) or any(n < 1 for n in args.cot_tokens):
        p.error("--think-tokens must be >= 0 and --cot-tokens >= 1")
    if any(b < 1 for b in args.batch_sizes):
        p.error("--batch-sizes must be >= 1")
    warmup, repeats, budget = RUN_DEFAULTS.get(args.preset, RUN_DEFAULTS[None])
    args.warmup = warmup if args.warmup is None else args.warmup
    args.repeats = repeats if args.repeats is None else args.repeats
    args.max_seconds = budget if args.max_seconds is None else args.max_seconds
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    args.think_tokens = sorted(set(args.think_tokens) - {0})
    args.cot_tokens = sorted(set(args.cot_tokens))
    args.batch_sizes = sorted(set(args.batch_sizes))
    args.sweep_batch_size = args.sweep_batch_size or args.batch_sizes[0]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    image_size = None if args.image_size.lower() == "none" else tuple(int(x) for x in args.image_size.split("x"))
    bench = build_bench(args.preset, device, DTYPES[args.dtype], args.attn, args.seed)
    max_k = bench.model.config.max_think_tokens
    if args.think_tokens and args.think_tokens[-1] > max_k:
        raise SystemExit(f"--think-tokens {args.think_tokens[-1]} exceeds the preset's max_think_tokens={max_k}")
    reference_k = TARGET_K if TARGET_K in args.think_tokens else (args.think_tokens[-1] if args.think_tokens else 0)
    meta = environment(args, device)
    flops, peak = FlopModel.of(bench.model), peak_flops(device, args.dtype)

    queries = make_queries(max(args.batch_sizes + [args.sweep_batch_size]), args.seed, image_size)
    records = [bench.model.processor(q, i) for i, q in enumerate(queries)]
    configs = [Config(provider, b, think_tokens=k) for b in args.batch_sizes
               for provider, k in [("baseline", 0)] + [("tte-flash", k) for k in args.think_tokens]]
    configs += [Config("explicit-cot", b, cot_tokens=n) for b in args.batch_sizes for n in args.cot_tokens]
    print(f"{meta['preset']} on {meta['device_name']} ({args.dtype}, attn {args.attn}); "
          f"warm-up {args.warmup}, repeats {args.repeats}", file=sys.stderr)
    sweeps = []  # built (and checked) before anything is timed
    for length in args.sweep_query_length:
        try:
            sweeps.append((length, records_of_length(bench.model.processor, queries[:args.sweep_batch_size], length)))
        except ValueError as err:
            raise SystemExit(f"--sweep-query-length: {err}; pass longer lengths (or --image-size none)") from None
    if not args.no_save:
        stem = f"latency-{device.type}-{args.preset}-{time.strftime('%Y-%m-%d')}{'-sweep' if sweeps else ''}"
        args.json = args.json or str(Path(__file__).resolve().parent / "results" / f"{stem}.json")
        args.plot = args.plot or str(Path(args.json).with_suffix(".png"))
    rows = run_configs(bench, records, configs, args, flops, peak)
    for length, sweep_records in sweeps:
        sweep = [Config("baseline" if k == 0 else "tte-flash", args.sweep_batch_size, think_tokens=k,
                        sweep_query_tokens=length) for k in [0] + args.think_tokens]
        rows += run_configs(bench, sweep_records, sweep, args, flops, peak)
    add_ratios(rows, reference_k)
    targets = check_targets(rows, meta)

    title = (f"{meta['preset']} | {meta['device_name']} | {args.dtype} | attn {args.attn} | "
             f"torch {torch.__version__} | commit {meta['git_commit'][:10]}{' (dirty)' if meta['git_dirty'] else ''}")
    print_table([r for r in rows if r["sweep_query_tokens"] is None], reference_k, peak is not None, title)
    if args.sweep_query_length:
        sweep_rows = [r for r in rows if r["sweep_query_tokens"] is not None]
        print_table(sweep_rows, reference_k, peak is not None, "Query-length sweep")
        print_sweep_summary(sweep_rows)
    print_targets(targets)
    result = {"meta": {**meta, "reference_think_tokens": reference_k}, "rows": rows, "targets": targets}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(rows, args.plot, result["meta"], reference_k)
        print(f"wrote {args.plot}")
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
