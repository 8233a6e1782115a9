"""Has a trained embedder collapsed? Mean off-diagonal cosine similarity of its embeddings.

    python training/embedding_spread.py --model runs/tiny --data data/eval.jsonl --image_root data

Prints, for the model and (``--compare``, default ``tiny``) a reference such as the untrained preset:
the mean cosine between different queries, between different candidate documents, and between
queries and documents, on the first ``--n`` evaluation rows at ``--think_tokens``. Values near 1 for
all three mean every input maps to (nearly) the same vector: the contrastive loss then sits at
ln(number of candidates) and Hit@1 at chance, whatever the data. See training/README.md.
"""
from __future__ import annotations

import argparse
import json

import torch

from tte_flash.data import eval_example, load_rows
from tte_flash.evaluate import embedding_spread, load_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory, Hub id or preset")
    parser.add_argument("--compare", default="tiny", help="a second model to print beside it ('' for none)")
    parser.add_argument("--data", required=True, help="MMEB-eval rows (JSONL/Parquet)")
    parser.add_argument("--image_root", default=None)
    parser.add_argument("--n", type=int, default=64, help="evaluation rows used")
    parser.add_argument("--think_tokens", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed of a preset")
    args = parser.parse_args(argv)
    examples = [eval_example(row, args.image_root) for row in load_rows(args.data)[:args.n]]
    queries = [query for query, _ in examples]
    documents = list({json.dumps(c, sort_keys=True): c for _, cands in examples for c in cands}.values())
    print(f"{len(queries)} queries, {len(documents)} distinct documents, K={args.think_tokens}")
    print(f"{'model':40s} {'query-query':>11s} {'doc-doc':>8s} {'query-doc':>9s}")
    for name in filter(None, [args.model, args.compare]):
        torch.manual_seed(args.seed)
        result = embedding_spread(load_model(name).eval(), queries, documents, args.think_tokens)
        print(f"{name[-40:]:40s} {result['query_query']:11.4f} {result['doc_doc']:8.4f} {result['query_doc']:9.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
