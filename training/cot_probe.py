"""What did the CoT branch learn? Decode traces from the think tokens on synthetic eval rows and score them.

    python training/cot_probe.py --model runs/tiny --data data --n 100 --think_tokens 16

On data from ``tte_flash.synthetic`` (its ``eval.jsonl`` carries the reference ``qry_cot``), for each of
the first ``--n`` queries it decodes a trace with ``model.generate_cot`` and reports how often:

* ``answer``: the last colour the trace names is the query's answer (chance 1/8 with 8 candidates);
* ``first_fact``: the trace's first fact is the reference's — for grid rows the anchor cell's
  "row R column C" (chance 1/9), for text rows the first sentence;
* ``exact``: the whole trace equals the reference.

A high COT token accuracy in training with ``answer`` and ``first_fact`` near chance means the branch
learned the traces' wording, not the input-dependent steps.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from tte_flash.data import eval_example, load_rows
from tte_flash.evaluate import load_model
from tte_flash.world import PALETTE as COLOURS  # every colour name of the world (a superset of synthetic's)


def first_fact(trace: str) -> str | None:
    location = re.search(r"row \d+ column \d+", trace)
    if location:
        return location.group(0)
    sentence = trace.strip().split(".")[0].strip()
    return sentence or None


def score(traces: list[str], rows: list[dict]) -> dict:
    answer = fact = exact = 0
    for trace, row in zip(traces, rows):
        reference = (row.get("qry_cot") or "").strip()
        named = [word for word in re.findall(r"[a-z]+", trace.lower()) if word in COLOURS]
        positive = row["tgt_text"][0] if isinstance(row["tgt_text"], list) else row["tgt_text"]
        answer += bool(named) and named[-1] == positive
        fact += first_fact(reference) is not None and first_fact(trace) == first_fact(reference)
        exact += trace.strip() == reference
    n = max(len(rows), 1)
    return {"n": len(rows), "answer": answer / n, "first_fact": fact / n, "exact": exact / n}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="a directory written by tte_flash.synthetic")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--think_tokens", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--output", default=None, help="write the scores and traces as JSON here")
    args = parser.parse_args(argv)
    rows = load_rows(Path(args.data) / "eval.jsonl")[:args.n]
    if not all(row.get("qry_cot") for row in rows):
        raise SystemExit(f"{args.data}/eval.jsonl has rows without a reference qry_cot; "
                         "use data written by python -m tte_flash.synthetic")
    model = load_model(args.model).eval()
    with torch.no_grad():
        traces = model.generate_cot([eval_example(row, args.data)[0] for row in rows],
                                    think_tokens=args.think_tokens, max_new_tokens=args.max_new_tokens)
    result = score(traces, rows)
    print(f"{result['n']} queries, K={args.think_tokens}: answer {result['answer']:.3f}  "
          f"first fact {result['first_fact']:.3f}  exact trace {result['exact']:.3f}")
    print(f"example: {traces[0]!r}\nreference: {rows[0]['qry_cot']!r}")
    if args.output:
        Path(args.output).write_text(json.dumps({**result, "model": args.model, "traces": traces}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
