"""The ``tte-flash`` command (also ``python -m tte_flash``).

``tte-flash quickstart``: on the embedded ``tiny`` preset (random weights, offline, CPU), embed
text+image queries with 16 think tokens, rank documents with ``similarity``, save and reload the
model, check the reloaded model gives the same vectors, and decode what the think tokens say.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw


def _scene(color: str, shape: str, size: int = 112) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    return image


def quickstart(args) -> int:
    from tte_flash import TTEFlashModel

    start = time.perf_counter()
    model = TTEFlashModel.from_preset(args.model) if args.model in ("tiny", "qwen2-vl-2b") \
        else TTEFlashModel.from_pretrained(args.model)
    queries = [{"instruction": "Find the picture that answers the question.",
                "text": "Which shape is red?", "image": _scene("red", "circle")},
               "a blue square on a white background"]
    documents = ["a red circle", "a blue square", {"image": _scene("blue", "square")},
                 {"image": _scene("red", "circle")}]
    q = model.encode_query(queries, think_tokens=args.think_tokens)
    d = model.encode_document(documents)
    scores = model.similarity(q, d)
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"random weights: rankings are not meaningful until trained)")
    print(f"queries embedded with {args.think_tokens} think tokens -> {tuple(q.shape)}; documents -> {tuple(d.shape)}")
    names = ["text: a red circle", "text: a blue square", "image: blue square", "image: red circle"]
    for qi, query in enumerate(["image+text: Which shape is red?", "text: a blue square ..."]):
        ranking = scores[qi].argsort(descending=True).tolist()
        print(f"  {query:34s} -> " + ", ".join(f"{names[j]} ({scores[qi, j]:.3f})" for j in ranking))
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.output_dir or tmp
        model.save_pretrained(out_dir)
        reloaded = TTEFlashModel.from_pretrained(out_dir)
        same = np.array_equal(reloaded.encode_query(queries, think_tokens=args.think_tokens), q)
        print(f"saved to {out_dir if args.output_dir else '(a temporary directory)'}; reloaded model gives "
              f"identical embeddings: {same}")
    cot = model.generate_cot(queries[0], think_tokens=args.think_tokens, max_new_tokens=16)
    print(f"decoded from the think tokens (untrained, so noise): {cot!r}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0 if same else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tte-flash", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    qs = commands.add_parser("quickstart", help="embed, rank, save and reload on the tiny preset (CPU, offline)")
    qs.add_argument("--model", default="tiny", help="a preset name (tiny, qwen2-vl-2b) or a checkpoint path")
    qs.add_argument("--think-tokens", "--think_tokens", type=int, default=16)
    qs.add_argument("--output-dir", "--output_dir", default=None, help="keep the saved model here")
    qs.set_defaults(func=quickstart)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
