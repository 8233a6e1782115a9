"""How long does building the kernel's block table take, and how much memory, for one long sample?

The block table (``kernels/block_table.py``) is built once per layout and block shape, on the layout's
device, before the first launch. This script times the build on the CPU for single samples of 16k, 32k
and 128k tokens (the worst case: a sample's tiles grow with its length squared) and for a packed 16k
layout, at the shipped tile shapes, and reports the peak extra resident memory of the build. Each
measurement runs in a fresh process (peak RSS is per process), so the numbers do not mix.

``--before REV`` also measures the builder as it was at git revision ``REV`` (its
``kernels/block_table.py``, read with ``git show``), e.g. the commit before a change; a build whose
estimated size exceeds ``--max-before-pairs`` (key x row-block pairs of the old construction) is
skipped and reported as such instead of exhausting the machine's memory.

    python benchmarks/block_table_build.py                       # the working tree's builder
    python benchmarks/block_table_build.py --before 52d5fc1      # and the builder of that commit
    python benchmarks/block_table_build.py --tile-mix benchmarks/results/compile-check-....json

``--tile-mix JSON`` prints instead, for each launch of a ``compile_check.py --json`` report, how many of its
tiles fall in each tile kind on the packed layouts (``--tokens``, default 16k here) and the tile-weighted SASS
instructions of a partial tile over a full one (the per-kind counts of the report, weighted by the kinds'
tile counts): what a partial tile costs on average where the kinds occur as in training.

``--schedule`` prints a model (not a measurement) of what launching the longest programs first buys: each
kernel's programs (the shipped head-dim-128 tiles, Qwen2-VL-2B's 12 query / 2 KV heads; a dK/dV program loops over
its share of a GQA group's heads, split as the launcher splits them) cost their visited tiles plus
``--program-overhead`` tiles, and are dispatched in launch order (block fastest, then head: what GPUs do in
practice, not a CUDA promise) to ``--slots`` resident programs (132 SMs x 1 program: at these tiles' registers,
146-242 a thread x 256 threads, one fits an SM), each taking the earliest free slot. The makespan in block order
against the table's longest-first order (``row_order`` / ``col_order``), and the bound max(total / slots, longest
program), is the gain to look for on the GPU (the grid's tail), not a number to quote.

Writes ``benchmarks/results/block_table_build.json`` (``--output`` to change): one row per measurement
with the versions, commit and date (``--tile-mix`` and ``--schedule`` print; ``--schedule --output F`` also writes F).
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, RESULTS, git_commit, proc_memory_bytes, reset_peak_rss, versions  # noqa: E402

QUERY, THINK, EMB, COT = 0, 1, 2, 3
# (name, [(query, think, emb, cot) per sample]) as a function of the token count
LAYOUTS = {
    # one sample: a long query, 16 think tokens, <emb>, a 128-token trace (the quadratic worst case)
    "one-sample": lambda tokens: [(tokens - 145, 16, 1, 128)],
    # packed training-like samples of ~1k tokens (what the table's cost looked like before: unchanged)
    "packed": lambda tokens: [(700, 16, 1, 307)] * (tokens // 1024) + (
        [(tokens % 1024, 0, 0, 0)] if tokens % 1024 else []),
    # packed inference-like samples (no COT) of 1000 tokens: odd lengths, so sample starts cut tiles
    "packed-infer": lambda tokens: [(983, 16, 1, 0)] * (tokens // 1000) + (
        [(tokens % 1000, 0, 0, 0)] if tokens % 1000 else []),
}
# block shapes to time the build at: the shipped bf16 fwd and dQ tiles at head dim 128 (128x64, 128x32), the d256
# dK/dV tile (16x64) and the interpreter's 16x16
SHAPES = [(128, 64), (128, 32), (16, 64), (16, 16)]
# glibc: every allocation of 128 KiB or more gets its own mapping, returned on free, so the peak resident set
# counts the build's large tensors instead of reusing memory freed earlier in the process
MEASURE_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")


def load_builder(revision: str | None):
    """``build_block_table`` of the working tree (``revision`` None) or of a git revision, as a module."""
    if revision is None:
        source = (REPO / "kernels" / "block_table.py").read_text()
    else:
        source = subprocess.run(["git", "show", f"{revision}:kernels/block_table.py"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout
    module = types.ModuleType(f"block_table_{revision or 'worktree'}")
    exec(compile(source, f"block_table.py@{revision or 'worktree'}", "exec"), module.__dict__)
    return module


def worktree_revision() -> str | None:
    """The commit, with ``-dirty`` only when ``kernels/block_table.py`` itself differs from it."""
    commit = git_commit()
    if commit is None:
        return None
    changed = subprocess.run(["git", "status", "--porcelain", "--", "kernels/block_table.py"], cwd=REPO,
                             capture_output=True, text=True).stdout.strip()
    return commit.removesuffix("-dirty") + ("-dirty" if changed else "")


def layout_intervals(samples, think_bidirectional=True, cot_sees_query=True):
    import torch

    from tte_flash.mask import mask_intervals
    seq, kinds = [], []
    for index, lengths in enumerate(samples):
        for kind, count in zip((QUERY, THINK, EMB, COT), lengths):
            seq.append(torch.full((count,), index, dtype=torch.int32))
            kinds.append(torch.full((count,), kind, dtype=torch.uint8))
    seq, kinds = torch.cat(seq), torch.cat(kinds)
    bounds = mask_intervals(seq, kinds, think_bidirectional=think_bidirectional, cot_sees_query=cot_sees_query)
    return [x.to(torch.int32).contiguous() for x in bounds]  # as prepare_layout keeps them


def old_pairs(col_lo, col_hi, block_m) -> int:
    """(key, row block) pairs the previous construction materialises: its memory scales with this."""
    return int(((col_hi.long() - 1) // block_m - col_lo.long() // block_m + 1).sum())


def measure_one(layout: str, tokens: int, block_m: int, block_n: int, revision: str | None) -> dict:
    """Build once on a small layout to warm up, then time one build and take its peak RSS (this process)."""
    module = load_builder(revision)
    row_lo, row_hi, gap_lo, gap_hi, col_lo, col_hi = layout_intervals(LAYOUTS[layout](tokens))
    build = module.build_block_table
    if len(inspect.signature(build).parameters) == 4:  # the old builder: column intervals only
        args = (col_lo, col_hi)
    else:
        args = (row_lo, row_hi, gap_lo, gap_hi, col_lo, col_hi)
    warm = layout_intervals(LAYOUTS[layout](2048))  # first-call overheads (allocator, op dispatch) kept out
    build(*(warm[4:] if len(args) == 2 else warm), block_m, block_n)
    reset_peak_rss()
    before = proc_memory_bytes("VmRSS")
    start = time.perf_counter()
    table = build(*args, block_m, block_n)
    seconds = time.perf_counter() - start
    peak = proc_memory_bytes("VmHWM")
    table_bytes = sum(x.numel() * x.element_size() for x in table if hasattr(x, "numel"))
    counts = module.tile_counts(table)
    return dict(seconds=seconds, peak_extra_mb=(peak - before) / 2**20 if peak and before else None,
                table_mb=table_bytes / 2**20, visited=counts["visited"], full=counts["full"],
                visible_pairs=counts["visible_pairs"])


def run(args) -> list[dict]:
    environment = dict(**versions(), commit=git_commit(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                       cpu_count=os.cpu_count(), torch_threads=args.threads)
    builders = [("before", args.before)] if args.before else []
    builders.append(("after", None))
    rows = []
    for layout in args.layouts:
        for tokens in args.tokens:
            _, _, _, _, col_lo, col_hi = layout_intervals(LAYOUTS[layout](tokens))
            for block_m, block_n in SHAPES:
                for label, revision in builders:
                    row = dict(layout=layout, tokens=tokens, block_m=block_m, block_n=block_n, builder=label,
                               revision=revision or worktree_revision())
                    pairs = old_pairs(col_lo, col_hi, block_m)
                    if label == "before":
                        row["old_pairs"] = pairs
                    if label == "before" and pairs > args.max_before_pairs:
                        row.update(skipped=f"{pairs:,} key x row-block pairs (> --max-before-pairs): would need "
                                           f"~{pairs * 70 / 2**30:.0f} GiB")
                    else:
                        command = [sys.executable, __file__, "--one", layout, str(tokens), str(block_m),
                                   str(block_n), revision or "", "--threads", str(args.threads)]
                        done = subprocess.run(command, capture_output=True, text=True, env=MEASURE_ENV)
                        if done.returncode:
                            row["error"] = done.stderr.strip().splitlines()[-1] if done.stderr else "failed"
                        else:
                            row.update(json.loads(done.stdout.strip().splitlines()[-1]))
                    rows.append(dict(row, **environment))
                    print_row(rows[-1])
    return rows


def print_row(r: dict) -> None:
    if "seconds" in r:
        result = (f"{r['seconds']:8.3f} s {r['peak_extra_mb']:9.1f} MB peak {r['table_mb']:8.2f} MB table "
                  f"{r['visited']:>11,} tiles")
    else:
        result = r.get("skipped") or r.get("error")
    print(f"{r['layout']:10} {r['tokens']:>7} {r['block_m']:>4}x{r['block_n']:<3} {r['builder']:6}  {result}",
          flush=True)


def tile_mix(report: Path, layouts, tokens: int) -> list[dict]:
    """Per launch of a compile_check report and layout: tiles of each kind (the side the kernel's programs own) and
    the tile-weighted SASS instructions of a partial tile over a full tile."""
    import re

    sys.path.insert(0, str(REPO))
    from tte_flash.kernels.block_table import FULL, KIND_NAMES, build_block_table, kind_counts
    rows = []
    for launch in json.loads(report.read_text())["rows"]:
        if not launch.get("sass_full") or not launch.get("sass_kinds"):
            continue
        block_m, block_n = map(int, re.match(r"(\d+)x(\d+)", launch["config"]).groups())
        by_row = launch["kernel"] != "_bwd_dkdv_kernel"
        for layout in layouts:
            table = build_block_table(*layout_intervals(LAYOUTS[layout](tokens)), block_m, block_n)
            counts = kind_counts(table, by_row).sum(0).tolist()
            partial = {KIND_NAMES[k]: n for k, n in enumerate(counts) if k != FULL and n}
            # a kind whose loop the SASS parser could not place (compile_check shows "-") leaves the ratio unknown
            uncounted = sorted(name for name in partial if name not in launch["sass_kinds"])
            weighted = None
            if partial and not uncounted:
                cost = sum(n * launch["sass_kinds"][name] for name, n in partial.items())
                weighted = cost / sum(partial.values()) / launch["sass_full"]
            rows.append(dict(triton=launch["triton"], kernel=launch["kernel"], head_dim=launch["head_dim"],
                             config=launch["config"], layout=layout, tokens=tokens, full=counts[FULL], **partial,
                             partial_over_full_weighted=round(weighted, 3) if weighted else None,
                             uncounted_kinds=uncounted))
            ratio = (f"{weighted:.2f}" if weighted else
                     f"unknown (no SASS count for {', '.join(uncounted)})" if uncounted else "- (no partial tile)")
            print(f"{launch['triton']:6} {launch['kernel']:17} d{launch['head_dim']:<4} {launch['config']:19} "
                  f"{layout:13} full {counts[FULL]:6} " + " ".join(f"{k} {v}" for k, v in partial.items())
                  + f"  partial/full (weighted) {ratio}")
    return rows


# the kernels the model schedules, and whether their programs own row blocks (else key blocks)
SCHEDULED = (("fwd", True), ("dq", True), ("dkdv", False))


def shipped_tiles(kernel: str, head_dim: int = 128) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the shipped sm_90 16-bit config of a kernel (the launchers' table, read without a GPU)."""
    from tte_flash.kernels.tte_attention import _CONFIGS
    config = next(config for largest, config in _CONFIGS[kernel, 2] if head_dim <= largest)
    return config.block_m, config.block_n


def makespan(costs, slots: int) -> float:
    """Finish time of programs with these costs, dispatched in this order, each to the earliest free of ``slots``."""
    import heapq
    free = [0.0] * slots
    end = 0.0
    for cost in costs:
        start = heapq.heappop(free)
        heapq.heappush(free, start + cost)
        end = max(end, start + cost)
    return end


def schedule(layouts, tokens: int, slots: int, overhead: float, q_heads: int = 12, kv_heads: int = 2) -> list[dict]:
    """The model of the docstring: makespan in block order and longest-first, per layout and kernel."""
    sys.path.insert(0, str(REPO))
    from tte_flash.kernels.block_table import build_block_table, kind_counts
    from tte_flash.kernels.tte_attention import fewest_splits
    rows = []
    print(f"{'layout':13} {'kernel':5} {'programs':>8} {'block order':>11} {'longest 1st':>11} {'bound':>8} "
          f"{'gain':>6}  (tile units)")
    for layout in layouts:
        bounds = layout_intervals(LAYOUTS[layout](tokens))
        for kernel, by_row in SCHEDULED:
            block_m, block_n = shipped_tiles(kernel)
            table = build_block_table(*bounds, block_m, block_n)
            tiles = kind_counts(table, by_row).sum(1).double()
            order = table.row_order if by_row else table.col_order
            heads = q_heads
            if not by_row:  # dK/dV: a program per key block, KV head and split of the group (the launcher's rule)
                group = q_heads // kv_heads
                splits = fewest_splits(tiles.numel() * kv_heads, group, slots)
                heads, tiles = kv_heads * splits, tiles * (group // splits)  # a program loops over its heads
            tiles = tiles + overhead
            plain = makespan(tiles.tolist() * heads, slots)
            first = makespan(tiles[order.long()].tolist() * heads, slots)
            bound = max(float(tiles.sum()) * heads / slots, float(tiles.max()))
            rows.append(dict(layout=layout, tokens=tokens, kernel=kernel, block_m=block_m, block_n=block_n,
                             programs=tiles.numel() * heads, slots=slots, overhead_tiles=overhead,
                             makespan_block_order=plain, makespan_longest_first=first, bound=bound,
                             predicted_gain=plain / first))
            print(f"{layout:13} {kernel:5} {tiles.numel() * heads:8d} {plain:11.1f} {first:11.1f} {bound:8.1f} "
                  f"{plain / first:6.3f}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 131072])
    p.add_argument("--layouts", nargs="+", default=["one-sample", "packed"], choices=sorted(LAYOUTS))
    p.add_argument("--before", default=None, help="also measure the builder of this git revision")
    p.add_argument("--max-before-pairs", type=int, default=80_000_000,
                   help="skip an old build above this many (key, row block) pairs (~70 bytes each at peak)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads of a build (1: on loaded cores, 2 threads wait ~0.5 s for each other)")
    p.add_argument("--output", type=Path, default=RESULTS / "block_table_build.json")
    p.add_argument("--tile-mix", type=Path, default=None, metavar="COMPILE_CHECK_JSON",
                   help="print tile kinds and the tile-weighted partial/full SASS of each launch in this report "
                        "(layouts --layouts, one size: the first --tokens, 16384 by default here)")
    p.add_argument("--schedule", action="store_true",
                   help="print the model of launching the longest programs first (docstring) for --layouts at the "
                        "first --tokens (16384 by default here)")
    p.add_argument("--slots", type=int, default=132, help="--schedule: programs resident at once (SMs x per SM)")
    p.add_argument("--program-overhead", type=float, default=1.0,
                   help="--schedule: a program's prologue and epilogue, in tiles")
    p.add_argument("--one", nargs=5, metavar=("LAYOUT", "TOKENS", "BLOCK_M", "BLOCK_N", "REVISION"),
                   help=argparse.SUPPRESS)  # one measurement in this process (used by the parent)
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    if args.one:
        import torch
        torch.set_num_threads(args.threads)
        layout, tokens, block_m, block_n, revision = args.one
        print(json.dumps(measure_one(layout, int(tokens), int(block_m), int(block_n), revision or None)))
        return 0
    if args.schedule:
        tokens = args.tokens[0] if "--tokens" in given else 16384
        layouts = args.layouts if "--layouts" in given else sorted(LAYOUTS)
        rows = schedule(layouts, tokens, args.slots, args.program_overhead)
        if "--output" in given:
            args.output.write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    if args.tile_mix:
        tokens = args.tokens[0] if "--tokens" in given else 16384
        tile_mix(args.tile_mix, args.layouts if "--layouts" in given else sorted(LAYOUTS), tokens)
        return 0
    print(f"{'layout':10} {'tokens':>7} {'block':8} {'build':6}  result")
    rows = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
