"""Peak memory of one long input through the reference attention: one dense L x L mask vs blocks of query rows.

The reference attention (the CPU path) used to build one (L, L) boolean mask per forward and hand it to SDPA;
it now runs SDPA over blocks of query rows, each block building only its own rows of the mask over the keys
its samples reach (``tte_flash.attention.chunked_attention``). This encodes one query of ``--tokens`` tokens
(text, plus K think tokens and <emb>) with the ``tiny`` preset, once per method, each in a fresh process:

* ``dense``: ``REFERENCE_BLOCK_BYTES`` set so high that every input is one block, which is exactly the
  previous code path (the whole dense mask, one SDPA call);
* ``blocked``: the default block budget.

    nice -n 10 python benchmarks/reference_memory.py                    # 32,768 tokens, both methods
    python benchmarks/reference_memory.py --tokens 8192 --methods blocked --no-save

Peak RSS is VmHWM of the case's process (Linux /proc): ``peak`` is the whole process (Python, torch, the
model, the input), ``added`` the peak reached during the encode minus the RSS just before it (the peak is
reset there). Results: a table, and JSON under benchmarks/results/ (``--no-save`` for the table only).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks._common import (default_results_path, device_name, git_commit, proc_memory_bytes,  # noqa: E402
                               reset_peak_rss, versions)

METHODS = ("dense", "blocked")
TARGET_GB = 2.0  # issue 18: a 32k-token input on the CPU reference path, whole process


def run_case(method: str, tokens: int, think_tokens: int) -> dict:
    """Encode one query of ``tokens`` tokens in this process; peak RSS, seconds and the embedding's head."""
    from tte_flash import TTEFlashModel, attention
    if method == "dense":
        attention.REFERENCE_BLOCK_BYTES = 2**62  # every input fits one block: the dense-mask path
    torch.manual_seed(0)
    model = TTEFlashModel.from_preset("tiny", max_query_tokens=tokens).eval()
    query_tokens = tokens - think_tokens - 1  # + K think tokens + <emb>
    sentence = "the red cell is left of the blue cell and above the green one. "
    text = (sentence * (query_tokens // len(sentence) + 1))[:query_tokens]
    length = model.processor.estimate_length({"text": text}) + think_tokens + 1
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): the measurement needs Linux")
    before = proc_memory_bytes("VmRSS")
    start = time.perf_counter()
    embedding = model.encode_query({"text": text}, think_tokens=think_tokens, batch_size=1,
                                   normalize_embeddings=False)
    seconds = time.perf_counter() - start
    peak = proc_memory_bytes("VmHWM")
    return {"method": method, "tokens": int(length), "think_tokens": think_tokens, "seconds": round(seconds, 2),
            "rss_before_gb": round(before / 2**30, 3), "peak_gb": round(peak / 2**30, 3),
            "added_gb": round((peak - before) / 2**30, 3),
            "block_bytes": attention.REFERENCE_BLOCK_BYTES, "embedding_head": [float(x) for x in embedding[:4]]}


def run_in_subprocess(method: str, args) -> dict:
    command = [sys.executable, __file__, "--case", method, "--tokens", str(args.tokens),
               "--think-tokens", str(args.think_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TTE_FLASH_ATTN": "reference"})
    if done.returncode:
        return {"method": method, "tokens": args.tokens, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    lines = [f"{'method':<9}{'tokens':>8}{'peak GB':>10}{'added GB':>10}{'seconds':>9}",
             "-" * 46]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['method']:<9}{row['tokens']:>8}  failed: {row['error']}")
        else:
            lines.append(f"{row['method']:<9}{row['tokens']:>8}{row['peak_gb']:>10.2f}{row['added_gb']:>10.2f}"
                         f"{row['seconds']:>9.1f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32768, help="the query's length with its think tokens and <emb>")
    p.add_argument("--think-tokens", "--think_tokens", type=int, default=16)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--output", default=None, help="results JSON (default: benchmarks/results/reference-memory-...)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--case", choices=METHODS, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.tokens, args.think_tokens)))
        return
    rows = [run_in_subprocess(method, args) for method in args.methods]
    print(format_table(rows))
    heads = [tuple(row["embedding_head"]) for row in rows if "embedding_head" in row]
    agree = max((abs(a - b) for h in heads[1:] for a, b in zip(h, heads[0])), default=0.0)
    print(f"target: whole process under {TARGET_GB} GB at 32k tokens; max |difference| of the embeddings' first "
          f"values between methods: {agree:.2e}")
    if not args.no_save:
        path = Path(args.output) if args.output else default_results_path("reference-memory", torch.device("cpu"))
        path.parent.mkdir(parents=True, exist_ok=True)
        result = {"benchmark": "reference_memory", "device": device_name(torch.device("cpu")),
                  "versions": versions(), "commit": git_commit(), "preset": "tiny", "target_gb": TARGET_GB,
                  "max_embedding_difference": agree, "rows": rows}
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
