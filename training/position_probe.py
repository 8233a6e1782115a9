"""Is a cell's position written into its visual token? Linear probes on the hidden states of a backbone.

Locating a named colour ("Where is the navy cell?" -> "row 2 column 1") needs the position of the navy
cell in the state that attention reads from it; Qwen2-VL's rotary positions (2-D in the vision tower,
M-RoPE in the text model) rotate queries and keys but never write a position into a token's state. This
probe reads, layer by layer, whether a linear map recovers a cell's row and column (and, with think
tokens, whether think token i has become a probe of one cell): logistic regression fitted on half of the
grids, scored on the other half. Issue 15 (training/README.md).

    python training/position_probe.py --model tte_flash/presets/tiny-reasoner --n 400 --output x.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from tte_flash import TTEFlashModel
from tte_flash.processing import collate
from tte_flash.world import World, model_inputs


@torch.no_grad()
def image_token_states(model, samples, batch_size: int = 50):
    """Per layer, the states of every visual token, with (row, column, grid rows, grid cols) labels."""
    image_id = model.config.image_token_id
    states, labels = None, []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        records = [model.processor(item) for item in model_inputs(chunk)]
        batch = collate(records, model.processor.think_token_ids, model.processor.emb_token_id, think_tokens=0,
                        packed=False, pad_id=model.processor.tokenizer.pad_token_id)
        out = model._text_forward(batch, output_hidden_states=True)
        slots = (batch.input_ids == image_id)  # (B, L), raster order within each sample
        layers = [h[slots].float().numpy() for h in out.hidden_states]
        states = layers if states is None else [np.concatenate([a, b]) for a, b in zip(states, layers)]
        for s, n in zip(chunk, slots.sum(1).tolist()):
            rows, cols = len(s["grid"]), len(s["grid"][0])
            if n != rows * cols:
                raise ValueError(f"{n} visual tokens for a {rows}x{cols} grid: one token per cell expected")
            labels += [(r, c, rows, cols) for r in range(rows) for c in range(cols)]
    return states, np.array(labels)


def probe(states, labels, n_grids_train_tokens: int) -> dict:
    """Held-out accuracy of a linear read-out of row and column from each layer's states."""
    out = {}
    for layer, x in enumerate(states):
        x = (x - x[:n_grids_train_tokens].mean(0)) / (x[:n_grids_train_tokens].std(0) + 1e-6)
        scores = {}
        for name, y in (("row", labels[:, 0]), ("column", labels[:, 1])):
            clf = LogisticRegression(max_iter=2000, C=1.0)
            clf.fit(x[:n_grids_train_tokens], y[:n_grids_train_tokens])
            scores[name] = round(float(clf.score(x[n_grids_train_tokens:], y[n_grids_train_tokens:])), 3)
        out[f"layer {layer}"] = scores
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a backbone folder or preset")
    p.add_argument("--n", type=int, default=400, help="grids (half to fit, half to score)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = TTEFlashModel.from_backbone(args.model)
    model.eval()
    world = World(seed=args.seed, task_weights={"locate": 1.0}, multi_questions=False)
    samples = [world.sample() for _ in range(args.n)]
    states, labels = image_token_states(model, samples)
    half = sum(len(s["grid"]) * len(s["grid"][0]) for s in samples[:args.n // 2])
    chance = {"row": round(float(np.bincount(labels[half:, 0]).max() / len(labels[half:])), 3),
              "column": round(float(np.bincount(labels[half:, 1]).max() / len(labels[half:])), 3)}
    result = {"model": args.model, "n_grids": args.n, "majority_class": chance, "probes": probe(states, labels, half)}
    print(json.dumps(result, indent=1))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
