"""Teacher side of the pipeline: write a ``qry_cot`` reasoning trace for every training row.

    python training/generate_cot.py --model path/to/reasoner --data train.jsonl --output train_cot.jsonl \\
        --image_root data --batch_size 8 --max_new_tokens 256

``--model`` is a Qwen2-VL checkpoint directory, a TTE-Flash checkpoint or a preset name. Generation
is greedy, batched, through transformers ``generate`` with the KV cache. The prompt is the row's
query (its image placed as in training) followed by ``--prompt``. Output rows are the input rows
with ``qry_cot`` filled in, in input order. Resumable: rows already in ``--output`` are skipped, and
each batch is appended and flushed as soon as it is done.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from tte_flash import TTEFlashModel
from tte_flash.data import TRAIN_COLUMNS, load_rows, train_example
from tte_flash.modeling import available_presets

DEFAULT_PROMPT = "Before answering, reason step by step about what the matching target must contain."


def load_reasoner(name: str) -> TTEFlashModel:
    if name in available_presets():
        return TTEFlashModel.from_preset(name)
    config = Path(name) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "qwen2_vl":
        return TTEFlashModel.from_backbone(name, max_think_tokens=0)  # generation never uses think tokens
    return TTEFlashModel.from_pretrained(name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="JSONL or Parquet training rows (MMEB-train columns)")
    parser.add_argument("--output", required=True, help="JSONL file to write (appended to when resuming)")
    parser.add_argument("--image_root", "--image-root", default=None)
    parser.add_argument("--batch_size", "--batch-size", type=int, default=8)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=256)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    args = parser.parse_args(argv)

    rows = load_rows(args.data, TRAIN_COLUMNS)
    output = Path(args.output)
    done = 0
    if output.exists() and not args.overwrite:
        done = sum(1 for line in output.open() if line.strip())
        if done > len(rows):
            raise ValueError(f"{output} has {done} rows but {args.data} only {len(rows)}: not the same data?")
    if done == len(rows):
        print(f"{output}: all {len(rows)} rows already have traces")
        return 0
    model = load_reasoner(args.model).eval()
    output.parent.mkdir(parents=True, exist_ok=True)
    mode = "a" if done and not args.overwrite else "w"
    with output.open(mode) as sink, tqdm(total=len(rows), initial=done, desc="Generating CoT") as bar:
        for start in range(done, len(rows), args.batch_size):
            chunk = rows[start:start + args.batch_size]
            queries = [train_example(row, args.image_root)["query"] for row in chunk]
            prompts = [{**q, "text": (q.get("text") or "") + "\n" + args.prompt} for q in queries]
            records = [model.processor(p, start + i) for i, p in enumerate(prompts)]
            traces = model._generate_trace_ids(records, args.max_new_tokens, len(records), False)
            for row, trace in zip(chunk, traces):
                text = model.processor.tokenizer.decode(trace, skip_special_tokens=True).strip()
                sink.write(json.dumps({**row, "qry_cot": text}) + "\n")
            sink.flush()
            bar.update(len(chunk))
    print(f"wrote {len(rows) - done} traces to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
