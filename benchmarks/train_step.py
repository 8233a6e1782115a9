"""One full-size training step, as the recipe runs it: seconds, tokens/s, MFU and peak memory.

The step of ``training/configs/qwen2-vl-2b.yaml`` on random weights (no download): the Qwen2-VL-2B
architecture, vision tower frozen, LoRA r16/alpha64/dropout 0.05 on every attention and MLP projection plus the
think/emb token rows (``tte_flash.training.apply_lora``), K=16 think tokens, a COT trace per query (default
256 tokens), the gradient cache (``Objective.grad_cache_backward``), then one AdamW step on the trainable
parameters. The recipe also sets ``distill_weight: 1`` (each query embedded a second time with its trace, the
distillation teacher): ``--distill-weight 1`` adds those rows; the default (0) is the step without them, as the
GPU loan measures it. Inputs are synthetic: a query of an image and a sentence, a text positive per query.

    python benchmarks/train_step.py --preset qwen2-vl-2b --batch-size 2          # CPU: does one step fit?
    python benchmarks/train_step.py --preset qwen2-vl-2b --batch-size 128 --grad-cache-chunk 16 --steps 3  # GPU

It reports per step: seconds, tokens (text tokens through the language model, vision patches apart),
tokens/s, peak memory of the step (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS, VmHWM, reset after
the model is built: weights, optimizer state and activations, not the build's temporaries) and, on a GPU with a
known peak, model FLOPs utilisation: 6 x (language-model parameters x tokens) + 4 x (vision parameters x
patches) + attention, over the step time (the gradient cache's extra forward is not counted as useful work, the
usual MFU convention). The first step includes autotuning and allocator warm-up: with ``--steps N`` the
reported numbers are the median over steps 2..N. Writes JSON under benchmarks/results/ (``--no-save``: none).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks._common import (default_results_path, device_name, git_commit, proc_memory_bytes,  # noqa: E402
                               reset_peak_rss, versions)
from tte_flash.loading import available_presets  # noqa: E402

TARGET_CPU_GB = 20.0  # issue 10: the 2B step at batch 2 fits in 20 GB on a CPU
WORDS = ("the red cell is left of the blue one so the answer moves two rows down and then one column right "
         "which lands on a green square near the corner of the grid").split()


def synthetic_examples(n: int, seed: int, image_size: tuple[int, int] | None, cot_words: int) -> list[dict]:
    """Training examples in ``tte_flash.data.train_example``'s shape: image+text query, text positive, a trace."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        query = {"text": f"Question {i}: which cell does the arrow reach after the move? " +
                 " ".join(rng.choice(WORDS, 12))}
        if image_size is not None:
            pixels = rng.integers(0, 256, (image_size[1], image_size[0], 3), dtype=np.uint8)
            query["image"] = Image.fromarray(pixels)
        positive = {"text": f"answer {i}: " + " ".join(rng.choice(WORDS, 8))}
        examples.append({"query": query, "positive": positive, "negatives": [],
                         "cot": " ".join(rng.choice(WORDS, cot_words))})
    return examples


def build(args, device: torch.device, dtype: torch.dtype):
    """The model as training.main builds it for the recipe (LoRA, frozen vision), on ``device`` in ``dtype``."""
    from tte_flash.training import ModelArguments, apply_lora, build_model
    model_args = ModelArguments(model=args.preset, max_think_tokens=32, lora=not args.no_lora, lora_r=16,
                                lora_alpha=64, lora_dropout=0.05,
                                attn_backend=None if args.attn == "auto" else args.attn)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random init straight in the training dtype (no fp32 copy of 2B weights)
    try:
        torch.manual_seed(args.seed)
        model = build_model(model_args)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device=device, dtype=dtype)
    model.model.visual.requires_grad_(False)
    if args.liger_kernels:
        from tte_flash.training import apply_liger_kernels
        apply_liger_kernels(model, device.type)
    if model_args.lora:
        model = apply_lora(model, model_args)
    return model.train()


def parameter_counts(model) -> dict:
    language, vision, trainable = 0, 0, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable += p.numel()
        if "lora_" in name or "trainable_tokens" in name:
            continue
        if ".visual." in name or name.startswith("visual."):
            vision += p.numel()
        elif "embed_tokens" not in name and "lm_head" not in name:
            language += p.numel()
    return {"language": language, "vision": vision, "trainable": trainable}


def step_flops(counts: dict, text_tokens: int, patches: int, attention_pairs: int, config) -> int:
    """Useful FLOPs of one step (forward + backward): 6 N T for the language model (head included via the COT
    tokens' vocabulary matmul left out: small next to N T at 2B), 2x3 = 6 per attention pair per head dim unit
    (QK and PV, forward + backward), and the frozen vision tower's forward twice (cache pass + recompute)."""
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    attention = 6 * 2 * attention_pairs * text.num_attention_heads * head_dim * text.num_hidden_layers
    return 6 * counts["language"] * text_tokens + attention + 2 * 2 * counts["vision"] * patches


def run(args) -> dict:
    from tte_flash.collator import TrainCollator
    from tte_flash.objective import Objective

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build(args, device, dtype)
    build_s = time.perf_counter() - t0
    build_peak = (proc_memory_bytes("VmHWM") or 0) if device.type == "cpu" else None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    counts = parameter_counts(model)
    print(f"built {args.preset} in {build_s:.0f} s: language {counts['language'] / 1e9:.2f} B, vision "
          f"{counts['vision'] / 1e9:.2f} B, trainable {counts['trainable'] / 1e6:.2f} M parameters", file=sys.stderr)
    from tte_flash.attention import resolve_backend
    packed = resolve_backend(base.config.attn_backend, device) == "triton"
    collator = TrainCollator(base.processor, think_budgets=(args.think_tokens,), use_cot=args.cot_tokens > 0,
                             max_cot_tokens=max(args.cot_tokens, 2), packed=packed, seed=args.seed,
                             teacher=args.distill_weight > 0)
    objective = Objective(temperature=0.02, cot_weight=1.0 if args.cot_tokens > 0 else 0.0,
                          distill_weight=args.distill_weight)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    image_size = None if args.image_size == "none" else tuple(int(x) for x in args.image_size.split("x"))
    steps = []
    for step in range(args.steps):
        examples = synthetic_examples(args.batch_size, args.seed + step, image_size, args.cot_tokens)
        batch = collator(examples)["train_batch"]
        text_tokens, patches, pairs = _workload(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            reset_peak_rss()  # the step's peak, not the model build's
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if args.grad_cache_chunk:
            loss, stats = objective.grad_cache_backward(model, batch, args.grad_cache_chunk)
        else:
            loss, stats = objective.loss(model, batch)
            loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else (proc_memory_bytes("VmHWM") or 0)
        if not torch.isfinite(loss):
            raise SystemExit(f"train_step: step {step} gave a non-finite loss ({float(loss)})")
        row = {"step": step, "seconds": round(seconds, 3), "text_tokens": text_tokens, "vision_patches": patches,
               "attention_pairs": pairs, "tokens_per_s": round(text_tokens / seconds, 1), "loss": float(loss),
               "cot_loss": float(stats["cot_loss"]) if "cot_loss" in stats else None,
               "peak_memory_gb": round(peak / 1e9, 2)}
        steps.append(row)
        if args.jsonl:
            _append_jsonl(args.jsonl, {"source": "train_step", "preset": args.preset, "batch_size": args.batch_size,
                                       "device": device_name(device), **row})
        print(f"  step {step}: {seconds:.1f} s, {text_tokens} tokens, {row['tokens_per_s']:.0f} tokens/s, "
              f"peak {row['peak_memory_gb']:.1f} GB, loss {row['loss']:.3f}", file=sys.stderr)
    timed = steps[1:] or steps
    seconds = statistics.median(r["seconds"] for r in timed)
    middle = timed[len(timed) // 2]
    flops = step_flops(counts, middle["text_tokens"], middle["vision_patches"], middle["attention_pairs"],
                       base.config)
    peak_flops = _peak_flops(device, args.dtype)
    summary = {"seconds_per_step": seconds, "tokens_per_s": round(middle["text_tokens"] / seconds, 1),
               "peak_memory_gb": max(r["peak_memory_gb"] for r in steps), "model_tflops_per_step": flops / 1e12,
               "mfu": round(flops / seconds / peak_flops, 4) if peak_flops else None,
               "steps_timed": len(timed)}
    if device.type == "cpu":
        summary["fits_in_20_gb"] = summary["peak_memory_gb"] <= TARGET_CPU_GB
    return {"meta": {"device": device_name(device), "versions": versions(), "commit": git_commit(),
                     "preset": args.preset, "dtype": args.dtype, "batch_size": args.batch_size,
                     "grad_cache_chunk": args.grad_cache_chunk, "distill_weight": args.distill_weight,
                     "think_tokens": args.think_tokens, "cot_tokens": args.cot_tokens, "lora": not args.no_lora, "image_size": args.image_size,
                     "attn_backend": base.config.attn_backend, "packed": packed, "liger_kernels": args.liger_kernels,
                     "threads": torch.get_num_threads(),
                     "parameters": counts, "build_seconds": round(build_s, 1),
                     "build_peak_memory_gb": None if build_peak is None else round(build_peak / 1e9, 2)},
            "steps": steps, "summary": summary}


def _append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _workload(batch) -> tuple[int, int, int]:
    """(text tokens, vision patches, visible attention pairs under the TTE mask) of a train batch, counted
    sample by sample on its packed layout (padding, if the backend pads, is not work)."""
    from tte_flash.mask import dense_mask
    packed = dataclasses.replace(batch, packed=True)
    tokens = patches = pairs = 0
    for i in range(len(batch)):
        sample = packed.pack([i])[0]
        tokens += sample.input_ids.numel()
        patches += 0 if sample.pixel_values is None else sample.pixel_values.shape[0]
        pairs += int(dense_mask(sample.seq_ids.flatten(), sample.token_types.flatten()).sum())
    return tokens, patches, pairs


def _peak_flops(device: torch.device, dtype: str) -> float | None:
    try:
        from benchmarks._latency_flops import peak_flops
    except ImportError:
        return None
    return peak_flops(device, dtype)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=available_presets(), default="qwen2-vl-2b", help="architecture (random init): qwen2-vl-2b | small | tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--attn", choices=("auto", "triton", "reference"), default="auto")
    p.add_argument("--batch-size", "--batch_size", type=int, default=None,
                   help="queries per step (default: 128 on CUDA, the recipe's per-device batch; 2 on CPU)")
    p.add_argument("--grad-cache-chunk", "--grad_cache_chunk", type=int, default=None,
                   help="gradient-cache chunk (default: 16 as in the recipe, or 1 for a batch of at most 16; "
                        "0 for a plain step)")
    p.add_argument("--think-tokens", "--think_tokens", type=int, default=16)
    p.add_argument("--cot-tokens", "--cot_tokens", type=int, default=256, help="trace words per query (0: no COT)")
    p.add_argument("--distill-weight", "--distill_weight", type=float, default=0.0,
                   help="explicit-to-latent self-distillation as the recipe's --distill_weight: each query is also "
                        "embedded with its trace at K=0 (the teacher rows are counted as work); needs --cot-tokens")
    p.add_argument("--image-size", "--image_size", default="448x336", help="WxH of the query images, or 'none'")
    p.add_argument("--no-lora", "--no_lora", action="store_true", help="train every language-model weight")
    p.add_argument("--liger-kernels", "--liger_kernels", action="store_true",
                   help="CUDA: Liger-Kernel's RMSNorm/SwiGLU/M-RoPE/LayerNorm (as training's --liger_kernels)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--jsonl", type=Path, default=None,
                   help="also append each step's row (and the summary at the end) here as soon as it is measured")
    p.add_argument("--no-save", "--no_save", action="store_true")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if args.batch_size is None:
        args.batch_size = 128 if args.device.startswith("cuda") else 2
    if args.grad_cache_chunk is None:
        args.grad_cache_chunk = 16 if args.batch_size > 16 else 1
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.grad_cache_chunk < 0 or args.think_tokens < 0 or args.cot_tokens < 0:
        p.error("--grad-cache-chunk, --think-tokens and --cot-tokens must be >= 0")
    if args.distill_weight < 0 or (args.distill_weight > 0 and args.cot_tokens == 0):
        p.error("--distill-weight must be >= 0 and needs traces (--cot-tokens > 0): the teacher embeds query + trace")
    if args.image_size != "none":
        try:
            w, h = (int(x) for x in args.image_size.lower().split("x"))
            assert w > 0 and h > 0
        except (ValueError, AssertionError):
            p.error(f"--image-size {args.image_size!r}: expected WxH (e.g. 448x336) or 'none'")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    s = result["summary"]
    if args.jsonl:
        _append_jsonl(args.jsonl, {"source": "train_step", "summary": True, "preset": args.preset,
                                   "batch_size": args.batch_size, "device": result["meta"]["device"],
                                   "parameters": result["meta"]["parameters"], **s})
    print(f"\n{args.preset} training step on {result['meta']['device']} ({args.dtype}, batch {args.batch_size}, "
          f"grad-cache chunk {args.grad_cache_chunk}, K={args.think_tokens}, COT {args.cot_tokens}):")
    print(f"  seconds/step {s['seconds_per_step']:.2f}   tokens/s {s['tokens_per_s']:.0f}   "
          f"peak memory {s['peak_memory_gb']:.1f} GB   model TFLOP/step {s['model_tflops_per_step']:.2f}   "
          f"MFU {'-' if s['mfu'] is None else format(100 * s['mfu'], '.1f') + '%'}")
    if "fits_in_20_gb" in s:
        print(f"  target: fits in {TARGET_CPU_GB:.0f} GB on a CPU -> {'met' if s['fits_in_20_gb'] else 'NOT met'}")
    if not args.no_save:
        path = args.json or default_results_path(f"train-step-{args.preset}", torch.device(args.device))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
