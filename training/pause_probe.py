"""Does a backbone answer better after K think tokens? Teacher-forced accuracy of the first answer token of
held-out one-word world questions (``tte_flash.world.eval_questions``), answered right after the prompt (K=0)
and after K think tokens (the layout of pause-pretraining and of the TTE COT branch, ``pretrain.py
--pause_tokens``). Issue 15's pause-pretraining lever (training/README.md).

    python training/pause_probe.py --model runs/pause/pause16 --think_tokens 0 16 --n 300 --output x.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

from tte_flash import TTEFlashModel
from tte_flash.world import eval_questions

ROOT = Path(__file__).resolve().parent.parent


def _collator_class():
    spec = importlib.util.spec_from_file_location("pretrain_for_probe", ROOT / "training/pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PretrainCollator


@torch.no_grad()
def first_token_predictions(model, questions, think_tokens: int, batch_size: int = 50) -> tuple[list, list]:
    """(greedy prediction, reference) of each question's first answer token, under teacher forcing."""
    collator = _collator_class()(model.processor, pause_tokens=think_tokens, pause_p=1.0 if think_tokens else 0.0)
    predicted, wanted = [], []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        batch = collator(chunk)["batch"]
        out = model.tte_forward(batch, return_cot_logits=True)
        lengths = [len(model.processor.tokenize_cot(q["answer"])) for q in chunk]
        firsts = torch.tensor([sum(lengths[:i]) for i in range(len(chunk))])
        predicted += out.cot_logits[firsts].argmax(-1).tolist()
        wanted += batch.cot_targets[firsts].tolist()
    return predicted, wanted


def first_token_accuracy(model, questions, think_tokens: int, batch_size: int = 50) -> float:
    """Share of questions whose first answer token is the model's greedy prediction (teacher forcing)."""
    predicted, wanted = first_token_predictions(model, questions, think_tokens, batch_size)
    return sum(a == b for a, b in zip(predicted, wanted)) / len(questions)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a backbone folder (pretrain.py output) or preset")
    p.add_argument("--think_tokens", type=int, nargs="+", default=[0, 16])
    p.add_argument("--kinds", nargs="+", default=["move1_short", "move2_short", "text1_short", "text2_short"])
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = TTEFlashModel.from_backbone(args.model, max_think_tokens=max(max(args.think_tokens), 1),
                                        image_min_pixels=3136, image_max_pixels=50176).eval()
    result = {"model": args.model, "n": args.n, "accuracy": {}}
    for kind in args.kinds:
        questions = eval_questions(kind, args.n)
        result["accuracy"][kind] = {k: first_token_accuracy(model, questions, k) for k in args.think_tokens}
        print(kind, result["accuracy"][kind], flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
