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

How: configurations are timed in groups that share a K=0 reference - per batch size, the K=0
baseline with every K; per batch size, K=0 and K=16 (or the largest K) with every N; per swept
query length, K=0 with every K. A group runs interleaved rounds (each configuration once per round,
the order rotating), and every ratio is the median over rounds of that round's time over the K=0
time of the same round, with a 95% confidence interval of the median and the IQR; rounds continue
until the intervals are narrow (``--precision``) or the group's budget (``--max-seconds``) is spent
(``_latency_timing.py`` says why). Peak memory is ``torch.cuda.max_memory_allocated`` over the timed
calls (weights included); not measured on the CPU. Model FLOPs and MFU: ``_latency_flops.py``.

``--attn``: ``reference`` / ``triton`` set ``model.config.attn_backend`` (packed, padding-free
batches under the TTE mask); ``sdpa`` / ``flash_attention_2`` run the text model through transformers'
own attention on left-padded batches with the plain causal mask, which is the same computation when
``think_bidirectional=False`` and there is no COT (last-token pooling, as an exported checkpoint is
served). Generation always runs through transformers (under ``reference``/``triton`` the package's
attention falls back to transformers' SDPA for KV-cache calls).

    python benchmarks/latency.py --think-tokens 16
    python benchmarks/latency.py --preset qwen2-vl-2b --device cuda --dtype bfloat16 \\
        --think-tokens 0 4 16 32 --cot-tokens 64 128 256 --batch-sizes 1 8 64 --json out.json
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _latency_flops import FlopModel, peak_flops, text_tokens  # noqa: E402
from _latency_report import (TARGET_K, check_targets, environment, plot, print_sweep_summary,  # noqa: E402
                             print_table, print_targets)
from _latency_timing import measure, ratio_stats, time_stats  # noqa: E402
from _latency_workload import (ATTN_CHOICES, Bench, Config, build_bench, embed, generate_traces,  # noqa: E402,F401
                               make_queries, records_of_length, setup)

from tte_flash.attention import resolve_backend  # noqa: E402
from tte_flash.loading import available_presets  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# warm-up rounds, minimum timed rounds (6: the fewest with a 95% CI of a median), one group's budget (seconds)
RUN_DEFAULTS = {"tiny": (1, 6, 15.0), None: (1, 6, 60.0)}


# ---------------------------------------------------------------------------------------------- run

def config_groups(args) -> list[list[Config]]:
    """The configurations timed together (each group's first is its K=0 reference), sweep excluded."""
    groups = []
    for b in args.batch_sizes:
        groups.append([Config("baseline", b)] + [Config("tte-flash", b, think_tokens=k) for k in args.think_tokens])
    for b in args.batch_sizes:
        if args.cot_tokens:
            anchors = [Config("baseline", b, anchor=True)]
            if args.reference_k:
                anchors.append(Config("tte-flash", b, think_tokens=args.reference_k, anchor=True))
            groups.append(anchors + [Config("explicit-cot", b, cot_tokens=n) for n in args.cot_tokens])
    return groups


def run_configs(bench: Bench, records: list, configs: list[Config], args, flops: FlopModel,
                peak: float | None) -> list[dict]:
    """Time one group of configurations in interleaved rounds; a row per non-anchor configuration."""
    k0 = next(i for i, c in enumerate(configs) if c.provider == "baseline")
    tte = next((i for i, c in enumerate(configs)
                if c.provider == "tte-flash" and c.think_tokens == args.reference_k), None)
    timings = measure([setup(bench, records, config) for config in configs], device=bench.device,
                      warmup=args.warmup, min_rounds=args.repeats, max_rounds=args.max_rounds,
                      max_seconds=args.max_seconds, precision=args.precision, reference=k0)
    print(f"  {timings.rounds} rounds in {timings.seconds:.1f} s (stopped: {timings.stopped})",
          file=sys.stderr, flush=True)
    rows = []
    for i, config in enumerate(configs):
        if config.anchor:
            continue
        out, times = timings.outputs[i], timings.times[i]
        if "generated_tokens" in out and set(out["generated_tokens"]) != {config.cot_tokens}:
            raise RuntimeError(f"{config.label}: generated {out['generated_tokens']} tokens, "
                               f"expected {config.cot_tokens}")
        stats = time_stats(times, config.label)
        vs_k0 = ratio_stats(times, timings.times[k0])
        vs_tte = None if tte is None else ratio_stats(times, timings.times[tte])
        batch_flops = flops.of_config(records, config)
        query_tokens = [r.input_ids.numel() for r in records[:config.batch_size]]
        seconds = stats["median_ms"] / 1e3
        rows.append({**{k: v for k, v in asdict(config).items() if k != "anchor"}, "label": config.label,
                     "query_tokens_mean": float(np.mean(query_tokens)),
                     "text_tokens_per_batch": text_tokens(query_tokens, config), **stats,
                     "n_runs": len(times), "rounds": timings.rounds, "group_seconds": timings.seconds,
                     "stopped": timings.stopped, "times_ms": [round(t * 1e3, 4) for t in times],
                     "k0_times_ms": [round(t * 1e3, 4) for t in timings.times[k0]],  # the same rounds' K=0 calls
                     "queries_per_s": config.batch_size / seconds,
                     "vs_k0": vs_k0["median"], "vs_k0_ci95": vs_k0["ci95"], "vs_k0_iqr": vs_k0["iqr"],
                     "vs_k0_of_medians": stats["median_ms"] / (float(np.median(timings.times[k0])) * 1e3),
                     "vs_tte": vs_tte and vs_tte["median"], "vs_tte_ci95": vs_tte and vs_tte["ci95"],
                     "vs_tte_iqr": vs_tte and vs_tte["iqr"],
                     "peak_mem_mb": None if timings.peak_bytes[i] is None else timings.peak_bytes[i] / 2**20,
                     "model_flops": batch_flops, "tflops_per_s": batch_flops / seconds / 1e12,
                     "mfu": None if peak is None else batch_flops / seconds / peak})
        ci = vs_k0["ci95"]
        print(f"  {config.label:>22}  batch {config.batch_size:>3}  "
              + (f"L={config.sweep_query_tokens:<5} " if config.sweep_query_tokens else "")
              + f"{stats['median_ms']:9.2f} ms  {vs_k0['median']:.3f}x K=0"
              + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""), file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=available_presets(), default="tiny", help="model architecture (random init): tiny | qwen2-vl-2b")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--attn", choices=ATTN_CHOICES, default=None,
                   help="text attention (default: the package's choice, triton on CUDA, reference elsewhere)")
    p.add_argument("--think-tokens", "--think_tokens", type=int, nargs="+", default=[4, 16, 32],
                   help="TTE-Flash think budgets K (the K=0 baseline is always run)")
    p.add_argument("--cot-tokens", "--cot_tokens", type=int, nargs="*", default=[32, 128],
                   help="explicit-CoT trace lengths N (none: skip explicit CoT)")
    p.add_argument("--batch-sizes", "--batch_sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed warm-up rounds per group, each config once per round (default 1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="minimum timed rounds per group, even past --max-seconds (default 6: the fewest that give "
                        "a 95%% CI of a median)")
    p.add_argument("--max-seconds", "--max_seconds", type=float, default=None,
                   help="time budget of one group's timed rounds: no new round starts after it (default by preset: "
                        "tiny 15, else 60)")
    p.add_argument("--precision", type=float, default=0.01,
                   help="end a group early once every ratio's 95%% CI is within this fraction of its median "
                        "(default 0.01; 0: always use the whole budget)")
    p.add_argument("--max-rounds", "--max_rounds", type=int, default=None,
                   help="most timed rounds per group (default: 1000, or --repeats if larger)")
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
    p.add_argument("--plot", default=None, help="write a PNG of the ratios to K=0 vs K, vs N (and vs query length) "
                                                 "here (default: beside the JSON, .png)")
    p.add_argument("--no-save", "--no_save", action="store_true", help="print the table only, write no files")
    p.add_argument("--jsonl", default=None, help="also append each group's rows here as soon as the group is timed "
                                                 "(a run killed later keeps them)")
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
    args.max_rounds = max(1000, args.repeats) if args.max_rounds is None else args.max_rounds
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.max_rounds < args.repeats:
        p.error(f"--max-rounds {args.max_rounds} is below --repeats {args.repeats}")
    if args.max_seconds < 0 or args.precision < 0:
        p.error("--max-seconds and --precision must be >= 0")
    args.think_tokens = sorted(set(args.think_tokens) - {0})
    args.cot_tokens = sorted(set(args.cot_tokens))
    args.batch_sizes = sorted(set(args.batch_sizes))
    args.sweep_batch_size = args.sweep_batch_size or args.batch_sizes[0]
    # the K that explicit CoT is compared with (vs_tte): DESIGN §9's K=16 when run, else the largest K
    args.reference_k = (TARGET_K if TARGET_K in args.think_tokens
                        else args.think_tokens[-1] if args.think_tokens else 0)
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
    reference_k = args.reference_k
    meta = environment(args, device)
    flops, peak = FlopModel.of(bench.model), peak_flops(device, args.dtype)

    queries = make_queries(max(args.batch_sizes + [args.sweep_batch_size]), args.seed, image_size)
    records = [bench.model.processor(q, i) for i, q in enumerate(queries)]
    print(f"{meta['preset']} on {meta['device_name']} ({args.dtype}, attn {args.attn}); warm-up {args.warmup} "
          f"rounds, {args.repeats}-{args.max_rounds} rounds per group, {args.max_seconds:g} s budget per group, "
          f"precision {args.precision:g}", file=sys.stderr)
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
    rows = []
    for configs in config_groups(args):
        rows += _appended(run_configs(bench, records, configs, args, flops, peak), args.jsonl, meta)
    for length, sweep_records in sweeps:
        sweep = [Config("baseline" if k == 0 else "tte-flash", args.sweep_batch_size, think_tokens=k,
                        sweep_query_tokens=length) for k in [0] + args.think_tokens]
        rows += _appended(run_configs(bench, sweep_records, sweep, args, flops, peak), args.jsonl, meta)
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


def _appended(rows: list[dict], path, meta: dict) -> list[dict]:
    """Append ``rows`` (with the device, preset and dtype) to the JSON-lines file ``path``, flushed; returns them."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        keep = {k: meta.get(k) for k in ("preset", "device_name", "dtype", "attn", "git_commit")}
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps({"source": "latency", **keep, **row}, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
