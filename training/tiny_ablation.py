"""The tiny-recipe ablation reported in training/README.md: same data, same steps, three settings.

    python -m tte_flash.synthetic --output_dir data --task grid --hops 1 --n_train 4000 --n_eval 300
    python training/tiny_ablation.py --data data --steps 400 --seeds 0 1 --workers 2 --out training/results/tiny-grid1

Settings: K=0 without the CoT loss, K=16 without it, K=16 with it (cot_weight 1). Each run trains the
``tiny`` preset from scratch with ``training/configs/tiny.yaml`` and the overrides below, then is evaluated
(Hit@1, NDCG@5) at its K, and the CoT run also with explicit CoT; the eval split's best no-reasoning
shortcut is reported beside every score. Runs go ``--workers`` at a time, one CPU thread each.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"k0": {"think_tokens": 0, "cot_weight": 0.0}, "k16": {"think_tokens": 16, "cot_weight": 0.0},
            "k16_cot": {"think_tokens": 16, "cot_weight": 1.0}}


def run(name, seed, args):
    setting = SETTINGS[name]
    run_dir = Path(args.out) / f"{name}-seed{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "training/train.py"), str(ROOT / "training/configs/tiny.yaml"),
           "--model", args.model, "--train_data", str(Path(args.data) / "train.jsonl"), "--image_root", args.data,
           "--output_dir", str(run_dir), "--max_steps", str(args.steps), "--seed", str(seed),
           "--think_tokens", str(setting["think_tokens"]), "--cot_weight", str(setting["cot_weight"]),
           "--learning_rate", str(args.learning_rate), "--temperature", str(args.temperature), "--save_strategy", "no", "--disable_tqdm", "true",
           "--logging_steps", "20"]
    start = time.perf_counter()
    if not (run_dir / "train_summary.json").is_file():  # finished runs are reused
        with open(f"{run_dir}.log", "w") as log:
            subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    train_seconds = summary.get("train_runtime", time.perf_counter() - start)
    modes = ["latent", "explicit-cot"] if setting["cot_weight"] > 0 else ["latent"]
    budgets = sorted({0, setting["think_tokens"]})
    eval_cmd = [sys.executable, "-m", "tte_flash.evaluate", "--model", str(run_dir), "--data",
                str(Path(args.data) / "eval.jsonl"), "--image_root", args.data, "--think_tokens", *map(str, budgets),
                "--mode", *modes, "--max_cot_tokens", "64", "--output", str(run_dir / "eval_results.json")]
    subprocess.run(eval_cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    result = json.loads((run_dir / "eval_results.json").read_text())
    logs = [e for e in summary["log_history"] if "contrastive_loss" in e]
    return {"setting": name, "seed": seed, "train_seconds": round(train_seconds, 1), "steps": args.steps,
            "final_contrastive_loss": logs[-1]["contrastive_loss"] if logs else None,
            "final_cot_accuracy": logs[-1].get("cot_accuracy") if logs else None,
            "runs": [{"mode": r["mode"], "think_tokens": r["think_tokens"], **r["metrics"],
                      "queries_per_second": r["queries_per_second"]} for r in result["runs"]],
            "shortcut_best": result.get("shortcut_best"), "shortcut_best_name": result.get("shortcut_best_name")}


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--model", default="tiny", help="preset or initial checkpoint (default: the tiny preset)")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    args.data, args.out = str(Path(args.data).resolve()), str(Path(args.out).resolve())
    if Path(args.model).exists():
        args.model = str(Path(args.model).resolve())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    jobs = [(name, seed) for seed in args.seeds for name in args.settings]
    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(lambda job: run(*job, args), jobs))
    meta = {"args": vars(args), "git_commit": _git_commit(), "threads_per_run": 1,
            "cpu_count": os.cpu_count(), "dataset": json.loads((Path(args.data) / "meta.json").read_text()).get("name")
            if (Path(args.data) / "meta.json").is_file() else None,
            "versions": json.loads((Path(args.out) / f"{jobs[0][0]}-seed{jobs[0][1]}" / "eval_results.json")
                                   .read_text()).get("versions")}
    (Path(args.out) / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"{'setting':10s} {'seed':>4s} {'mode':13s} {'K':>3s} {'hit@1':>6s} {'ndcg@5':>6s} {'train s':>8s} "
          f"{'cot acc':>7s} best shortcut")
    for r in results:
        for run_ in r["runs"]:
            print(f"{r['setting']:10s} {r['seed']:4d} {run_['mode']:13s} {run_['think_tokens']:3d} "
                  f"{run_['hit@1']:6.3f} {run_['ndcg@5']:6.3f} {r['train_seconds']:8.0f} "
                  f"{r['final_cot_accuracy'] or 0:7.3f} {r['shortcut_best_name']['hit@1']} "
                  f"{r['shortcut_best']['hit@1']:.3f}")


if __name__ == "__main__":
    main()
