"""``tte-flash demo``: the whole pipeline on a CPU in a few minutes, offline.

1. generate synthetic reasoning-retrieval data (``tte_flash.synthetic``): by default a one-hop walk on a 4x4
   grid from a named position ("What colour is the cell above row 3, column 4?"), a task where K=0 stays near
   chance at the demo's 300 steps (it needs about three times as many) and the explicit pipeline is right almost
   always (training/README.md, "Report: think tokens that
   earn their place");
2. TTE-train the pretrained ``tiny-thinker`` backbone (the CPU world's Qwen2-VL-2B-Instruct, shipped in
   the package, whose think tokens were in its pretraining) at K think tokens with the CoT loss and
   explicit-to-latent self-distillation (the recipe's default, ``--distill_weight``; ``tte_flash.training``);
3. evaluate K=0, K and explicit CoT (the model writes a trace, then embeds query + trace): Hit@1,
   NDCG@5, queries/s, beside the no-reasoning shortcuts;
4. decode what the think tokens say (how often the decoded trace names the right answer) and draw
   their attention heatmaps for one query;
5. write the model card and print where everything is.

Measured results of the same recipe over three seeds: training/README.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tte-flash demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", "--output-dir", default="tte-flash-demo")
    parser.add_argument("--model", default="tiny-thinker",
                        help="starting point: a preset (tiny-thinker: pretrained with think tokens; tiny-reasoner, "
                             "tiny-instruct: pretrained; tiny: random), a Qwen2-VL backbone directory or a TTE-Flash "
                             "checkpoint")
    parser.add_argument("--think_warmup_steps", "--think-warmup-steps", type=int, default=0,
                        help="train at K=0 for these steps first, and then until the in-batch accuracy reaches 0.5 "
                             "(for a backbone whose think tokens are new; tiny-thinker's are pretrained: 0)")
    parser.add_argument("--task", choices=("grid", "text", "mixed"), default="grid")
    parser.add_argument("--hops", type=int, default=1,
                        help="reasoning hops of the task (0: read the cell at a position; 1-2: see training/README.md)")
    parser.add_argument("--anchor", choices=("colour", "position"), default="position",
                        help="grid walks start at a named position (default) or a named colour (finding it first: "
                             "beyond the tiny backbones, training/README.md)")
    parser.add_argument("--grid", type=int, default=4, help="cells per side of the grid images")
    parser.add_argument("--palette", default="world", help="basic (9 colours) or world (20)")
    parser.add_argument("--sampling", choices=("legacy", "region"), default="region",
                        help="region: the moves alone say nothing about the answer (tte_flash.synthetic)")
    parser.add_argument("--distill_weight", "--distill-weight", type=float, default=1.0,
                        help="explicit-to-latent self-distillation (0: the CoT loss alone)")
    parser.add_argument("--n_train", "--n-train", type=int, default=2000)
    parser.add_argument("--n_eval", "--n-eval", type=int, default=200)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", "--batch-size", type=int, default=32)
    parser.add_argument("--think_tokens", "--think-tokens", type=int, default=16)
    parser.add_argument("--max_cot_tokens", "--max-cot-tokens", type=int, default=40)
    parser.add_argument("--n_probe", "--n-probe", type=int, default=20,
                        help="eval queries whose think-token traces are decoded and checked")
    parser.add_argument("--learning_rate", "--learning-rate", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from . import synthetic
    from .evaluate import evaluate_many, format_table
    from .modeling import TTEFlashModel
    from .training import main as train_main

    start = time.perf_counter()
    out = Path(args.output_dir)
    print(f"[1/5] synthetic {args.task} data ({args.hops} hop): {args.n_train} train / {args.n_eval} eval rows")
    grid_args = {} if args.task == "text" else {"grid": args.grid, "palette": args.palette, "sampling": args.sampling,
                                                "anchor": args.anchor if args.hops else "colour"}
    data = synthetic.generate(out / "data", args.n_train, args.n_eval, seed=args.seed, hops=args.hops, task=args.task,
                              **grid_args)
    paths = data["paths"]

    lever = f"CoT loss{', self-distillation' if args.distill_weight > 0 else ''}"
    gate = (["--think_warmup_steps", str(args.think_warmup_steps), "--think_warmup_accuracy", "0.5"]
            if args.think_warmup_steps else [])
    when = f"K=0 for at least {args.think_warmup_steps} steps and until the in-batch accuracy reaches 0.5, then " \
        if gate else ""
    print(f"[2/5] TTE training from {args.model} for {args.steps} steps ({lever}; {when}K={args.think_tokens})")
    model_dir = out / "model"
    train_main(["--model", args.model, "--train_data", paths["train"], "--image_root", paths["image_root"],
                "--output_dir", str(model_dir), "--think_tokens", str(args.think_tokens), *gate,
                "--distill_weight", str(args.distill_weight),
                "--cot_weight", "1.0", "--max_steps", str(args.steps), "--per_device_train_batch_size",
                str(args.batch_size), "--learning_rate", str(args.learning_rate), "--warmup_steps", str(max(1, args.steps // 10)),
                "--lr_scheduler_type", "cosine", "--temperature", "0.05", "--logging_steps",
                str(max(1, args.steps // 10)), "--save_strategy", "no", "--use_cpu", "--seed", str(args.seed),
                "--disable_tqdm", "true"])
    model = TTEFlashModel.from_pretrained(model_dir)

    print("[3/5] evaluating K=0, K=%d and explicit CoT (K=0 here is this model without its think tokens; a model "
          "trained at K=0 alone stays near chance for 300 steps and needs about three times the steps: "
          "training/README.md)" % args.think_tokens)
    result = evaluate_many(model, paths["eval"], paths["image_root"], think_tokens=(0, args.think_tokens),
                           modes=("latent",), max_cot_tokens=args.max_cot_tokens)
    explicit = evaluate_many(model, paths["eval"], paths["image_root"], think_tokens=(0,), modes=("explicit-cot",),
                             max_cot_tokens=args.max_cot_tokens, shortcut=False)
    result["runs"] += explicit["runs"]
    print(format_table(result))
    if args.distill_weight > 0:
        print("  (explicit-cot here: this model writes a trace, then embeds query + trace, as the distillation teacher "
              "it was also trained as; time per query includes writing the trace)")
    else:
        print("  (explicit-cot here: this model writes a trace, then embeds query + trace, an input it was not trained "
              "on; the fair explicit pipeline trains its embedder on query + trace: training/tiny_ablation.py)")
    (model_dir / "eval_results.json").write_text(json.dumps(result, indent=2) + "\n")

    print("[4/5] what the think tokens say, for the first eval query")
    from .data import eval_example, load_rows
    eval_rows = load_rows(paths["eval"])
    first = next((r for r in eval_rows if r.get("qry_img_path")), eval_rows[0])  # prefer one with an image
    from .world import last_word
    query, _ = eval_example(first, paths["image_root"])
    explanation = model.explain(query, think_tokens=args.think_tokens, top_k=3, max_new_tokens=args.max_cot_tokens,
                                heatmap_dir=out / "explain")
    print(f"  query: {first['qry_text']!r}\n  reference trace: {first.get('qry_cot')!r}\n"
          f"  decoded from the think tokens: {explanation.cot!r}")
    probe = eval_rows[:args.n_probe]
    decoded = model.generate_cot([eval_example(r, paths["image_root"])[0] for r in probe],
                                 think_tokens=args.think_tokens, max_new_tokens=args.max_cot_tokens)
    named = sum(last_word(text) == row["tgt_text"][0] for text, row in zip(decoded, probe))
    print(f"  traces decoded from the think tokens that end in the right answer: {named}/{len(probe)}")
    for i, reading in enumerate(explanation.top_tokens[:4]):
        print(f"  think {i}: " + ", ".join(f"{tok!r} ({p:.2f})" for tok, p in reading))
    (out / "explain").mkdir(parents=True, exist_ok=True)
    (out / "explain" / "explanation.json").write_text(json.dumps(
        {**explanation.to_dict(), "probe": {"n": len(probe), "right_answer": named,
                                            "traces": [{"query": r["qry_text"], "reference": r.get("qry_cot"),
                                                        "decoded": t} for r, t in zip(probe, decoded)]}},
        indent=2) + "\n")

    print("[5/5] model card")
    from .card import write_model_card
    write_model_card(model_dir, model.config, force=True)
    print(f"\ndone in {time.perf_counter() - start:.0f}s. Artefacts:\n"
          f"  data:        {paths['image_root']}  (README.md describes the task)\n"
          f"  model:       {model_dir}  (README.md is its model card; train_summary.json the training log)\n"
          f"  evaluation:  {model_dir / 'eval_results.json'}\n"
          f"  explanation: {out / 'explain'}  (explanation.json, attention.png: the think tokens' attention to the image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
