"""The think-token ablation on the CPU world (training/README.md): same data, same steps, four settings.

    python -m tte_flash.synthetic --output_dir data_grid1 --task grid --hops 1 --n_train 4000 --n_eval 300
    python training/tiny_ablation.py --data data_grid1 --out abl_grid1 --steps 300 --seeds 0 1 2 --workers 2

Settings (every run starts from ``--model``, default the pretrained ``tiny-instruct``, with the recipe
``training/configs/tiny-instruct.yaml`` and the overrides below):

* ``k0``: K=0, contrastive loss only;
* ``k16``: K=16, contrastive loss only;
* ``k16_cot``: K=16 + COT loss (cot_weight 1): the TTE-Flash recipe;
* ``explicit``: the explicit "Think Then Embed" pipeline: the embedder is trained on query + teacher
  trace (``--query_with_trace``, K=0), and at evaluation ``--reasoner`` (default: the same backbone,
  untouched) generates the trace that the embedder reads after the query;
* the levers of issue 15 (training/README.md): ``k16_cot_noq`` (a COT branch that cannot read the query),
  ``k16_distill`` / ``k16_distill_kl`` / ``k0_distill`` (explicit-to-latent self-distillation), ``k16_curriculum``
  and ``k16_distill_curriculum`` (the trace replaced by think tokens stage by stage), and ``k16_cot_open`` /
  ``k16_distill_open``: the think tokens on from the first step (no accuracy gate), for a pause-pretrained
  ``--model`` (``training/pretrain.py --pause_tokens``) whose think tokens are not fresh; ``k32_cot_open``,
  ``k32_distill_open`` and ``k32_open`` (no COT loss) the same at K=32; ``k16_curriculum_open`` and
  ``k16_distill_curriculum_open`` the curriculum levers without the gate.

``python training/tiny_ablation.py --report training/results/ti-*.json`` prints the markdown tables of
training/README.md from results files.

Each run is evaluated at its own K (``k16_cot`` also at K=0), with Hit@1, NDCG@5, the eval seconds per
query, and the eval split's best no-reasoning shortcut beside every score. Runs go ``--workers`` at a
time, one CPU thread each; finished runs are reused, so an interrupted ablation resumes.
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
            "k16_cot": {"think_tokens": 16, "cot_weight": 1.0},
            "explicit": {"think_tokens": 0, "cot_weight": 0.0, "query_with_trace": True},
            # the levers of issue 15 that make <emb> use the reasoning (training/README.md)
            "k16_cot_noq": {"think_tokens": 16, "cot_weight": 1.0, "extra": ["--cot_sees_query", "false"]},
            "k16_distill": {"think_tokens": 16, "cot_weight": 1.0, "extra": ["--distill_weight", "1"]},
            "k16_distill_kl": {"think_tokens": 16, "cot_weight": 1.0,
                               "extra": ["--distill_weight", "1", "--distill_kind", "kl"]},
            "k16_curriculum": {"think_tokens": 16, "cot_weight": 1.0, "curriculum": (0.25, 0.5, 0.75)},
            "k16_distill_curriculum": {"think_tokens": 16, "cot_weight": 1.0, "extra": ["--distill_weight", "1"],
                                       "curriculum": (0.25, 0.5, 0.75)},
            "k0_distill": {"think_tokens": 0, "cot_weight": 0.0, "extra": ["--distill_weight", "1"]},
            # k16_distill_open without its think tokens (K=0, the same COT loss and distillation): the control that
            # says whether the think tokens or the distillation do the work
            "k0_distill_cot": {"think_tokens": 0, "cot_weight": 1.0, "extra": ["--distill_weight", "1"]},
            # from a pause-pretrained backbone (pretrain.py --pause_tokens) the think tokens are not fresh: no gate
            "k16_cot_open": {"think_tokens": 16, "cot_weight": 1.0,
                             "extra": ["--think_warmup_steps", "0", "--think_warmup_accuracy", "0.0001"]},
            "k16_distill_open": {"think_tokens": 16, "cot_weight": 1.0,
                                 "extra": ["--distill_weight", "1", "--think_warmup_steps", "0",
                                           "--think_warmup_accuracy", "0.0001"]}}
OPEN = ["--think_warmup_steps", "0", "--think_warmup_accuracy", "0.0001"]  # no accuracy gate: the think tokens are not fresh
# the same at K=32 (a backbone pause-pretrained with 32 think tokens: one per cell of a 5x5 grid and more)
SETTINGS.update({name.replace("k16", "k32"): {**SETTINGS[name], "think_tokens": 32}
                 for name in ("k16_cot_open", "k16_distill_open")})
# the curriculum levers with the think tokens on from the first step (a pause-pretrained backbone)
SETTINGS.update({f"{name}_open": {**SETTINGS[name], "extra": SETTINGS[name].get("extra", []) + OPEN}
                 for name in ("k16_curriculum", "k16_distill_curriculum")})
SETTINGS["k32_open"] = {"think_tokens": 32, "cot_weight": 0.0, "extra": SETTINGS["k16_cot_open"]["extra"]}


def run(name, seed, args):
    setting = SETTINGS[name]
    run_dir = Path(args.out) / f"{name}-seed{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "training/train.py"), args.recipe,
           "--model", args.model, "--train_data", str(Path(args.data) / "train.jsonl"), "--image_root", args.data,
           "--output_dir", str(run_dir), "--max_steps", str(args.steps), "--seed", str(seed),
           "--think_tokens", str(setting["think_tokens"]), "--cot_weight", str(setting["cot_weight"]),
           "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "20"]
    cmd += ["--query_with_trace", "true"] if setting.get("query_with_trace") else []
    cmd += setting.get("extra", [])
    if setting.get("curriculum"):  # stage boundaries as fractions of the run
        cmd += ["--curriculum_steps", *(str(max(1, round(f * args.steps))) for f in setting["curriculum"])]
    cmd += args.train_args
    start = time.perf_counter()
    if not (run_dir / "train_summary.json").is_file():  # finished runs are reused
        with open(f"{run_dir}.log", "w") as log:
            subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    train_seconds = summary.get("train_runtime", time.perf_counter() - start)
    if name == "explicit":
        modes, budgets, extra = ["explicit-cot"], [0], ["--reasoner", args.reasoner or args.model]
    else:
        modes, budgets, extra = ["latent"], sorted({0, setting["think_tokens"]}) if setting["cot_weight"] else \
            [setting["think_tokens"]], []
    if not (run_dir / "eval_results.json").is_file():
        eval_cmd = [sys.executable, "-m", "tte_flash.evaluate", "--model", str(run_dir), "--data",
                    str(Path(args.data) / "eval.jsonl"), "--image_root", args.data, "--think_tokens",
                    *map(str, budgets), "--mode", *modes, "--max_cot_tokens", "64", *extra,
                    "--output", str(run_dir / "eval_results.json")]
        subprocess.run(eval_cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    result = json.loads((run_dir / "eval_results.json").read_text())
    probe = None
    if setting["cot_weight"] > 0:  # what the think tokens say: decoded traces scored against the reference
        if not (run_dir / "cot_probe.json").is_file():
            subprocess.run([sys.executable, str(ROOT / "training/cot_probe.py"), "--model", str(run_dir), "--data",
                            args.data, "--n", str(args.probe_n), "--think_tokens", str(setting["think_tokens"]),
                            "--max_new_tokens", "48", "--output", str(run_dir / "cot_probe.json")],
                           check=True, env=env, stdout=subprocess.DEVNULL)
        probe = {k: v for k, v in json.loads((run_dir / "cot_probe.json").read_text()).items() if k != "traces"}
    logs = [e for e in summary["log_history"] if "contrastive_loss" in e]
    return {"setting": name, "seed": seed, "train_seconds": round(train_seconds, 1), "steps": args.steps,
            "final_contrastive_loss": logs[-1]["contrastive_loss"] if logs else None,
            "final_cot_accuracy": logs[-1].get("cot_accuracy") if logs else None,
            "collapse_warning": any("collapse_warning" in e for e in summary["log_history"]),
            "think_tokens_from_step": next((int(e["think_tokens_from_step"]) for e in summary["log_history"]
                                            if "think_tokens_from_step" in e), None),
            "think_token_traces": probe,
            "runs": [{"mode": r["mode"], "think_tokens": r["think_tokens"], **r["metrics"],
                      "queries_per_second": r["queries_per_second"],
                      "seconds_per_query": round(1 / r["queries_per_second"], 5)} for r in result["runs"]],
            "shortcut_best": result.get("shortcut_best"), "shortcut_best_name": result.get("shortcut_best_name")}


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def summarise(results: list[dict]) -> list[dict]:
    """Mean and spread over seeds, per (setting, mode, K)."""
    groups: dict[tuple, list] = {}
    for r in results:
        for run_ in r["runs"]:
            groups.setdefault((r["setting"], run_["mode"], run_["think_tokens"]), []).append(run_)
    rows = []
    for (setting, mode, k), runs in groups.items():
        hits = [x["hit@1"] for x in runs]
        rows.append({"setting": setting, "mode": mode, "think_tokens": k, "seeds": len(runs),
                     "hit@1_mean": round(sum(hits) / len(hits), 4), "hit@1_min": min(hits), "hit@1_max": max(hits),
                     "ndcg@5_mean": round(sum(x["ndcg@5"] for x in runs) / len(runs), 4),
                     "seconds_per_query_mean": round(sum(x["seconds_per_query"] for x in runs) / len(runs), 5)})
    return rows


def _starts(steps) -> str:
    """Per seed, the step the think tokens came on ("never": the embedder never left the collapsed start)."""
    return " / ".join("never" if s is None else str(s) for s in steps) if steps else "-"


def markdown(path) -> str:
    """A results JSON as the markdown table of training/README.md: per setting and evaluation, Hit@1 mean
    (min-max) over seeds, NDCG@5, eval ms per query, what the think tokens decode to, the best shortcut."""
    data = json.loads(Path(path).read_text())
    results = data["results"]
    shortcut = results[0]
    probe, starts = {}, {}
    for r in results:
        if r.get("think_token_traces"):
            probe.setdefault(r["setting"], []).append(r["think_token_traces"]["answer"])
        if SETTINGS.get(r["setting"], {}).get("think_tokens"):
            starts.setdefault(r["setting"], []).append(r.get("think_tokens_from_step"))
    lines = [f"`{Path(path).name}` ({data['meta'].get('dataset')}, {results[0]['steps']} steps; best no-reasoning "
             f"shortcut {shortcut['shortcut_best_name']['hit@1']}: Hit@1 {shortcut['shortcut_best']['hit@1']:.3f})", "",
             "| setting | evaluated at | seeds | Hit@1 mean (min-max) | NDCG@5 | eval ms/query | think-token traces right "
             "| think tokens on from step |", "|---|---|---|---|---|---|---|---|"]
    for row in summarise(results):
        at = "explicit CoT" if row["mode"] == "explicit-cot" else f"K={row['think_tokens']}"
        traces = probe.get(row["setting"]) if row["think_tokens"] else None
        traces = f"{sum(traces) / len(traces):.2f}" if traces else "-"
        lines.append(f"| {row['setting']} | {at} | {row['seeds']} | {row['hit@1_mean']:.3f} ({row['hit@1_min']:.3f}-"
                     f"{row['hit@1_max']:.3f}) | {row['ndcg@5_mean']:.3f} | {1000 * row['seconds_per_query_mean']:.2f} | "
                     f"{traces} | {_starts(starts.get(row['setting'])) if row['think_tokens'] else '-'} |")
    return "\n".join(lines)


def main():
    if sys.argv[1:2] == ["--report"]:  # python training/tiny_ablation.py --report training/results/ti-*.json
        print("\n\n".join(markdown(path) for path in sys.argv[2:]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--model", default="tiny-instruct", help="preset or initial checkpoint")
    parser.add_argument("--reasoner", default=None, help="trace generator of the explicit setting (default: --model)")
    parser.add_argument("--recipe", default=str(ROOT / "training/configs/tiny-instruct.yaml"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--probe_n", type=int, default=100, help="eval queries whose think-token traces are scored")
    parser.add_argument("--results", default=None, help="also write the results JSON here (e.g. training/results/x.json)")
    args, args.train_args = parser.parse_known_args()  # anything else goes to training/train.py
    args.data, args.out = str(Path(args.data).resolve()), str(Path(args.out).resolve())
    if Path(args.model).exists():
        args.model = str(Path(args.model).resolve())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    jobs = [(name, seed) for seed in args.seeds for name in args.settings]
    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(lambda job: run(*job, args), jobs))
    first = Path(args.out) / f"{jobs[0][0]}-seed{jobs[0][1]}" / "eval_results.json"
    meta = {"args": vars(args), "git_commit": _git_commit(), "threads_per_run": 1, "cpu_count": os.cpu_count(),
            "dataset": json.loads((Path(args.data) / "meta.json").read_text()).get("name")
            if (Path(args.data) / "meta.json").is_file() else None,
            "versions": json.loads(first.read_text()).get("versions")}
    output = json.dumps({"meta": meta, "summary": summarise(results), "results": results}, indent=2) + "\n"
    (Path(args.out) / "results.json").write_text(output)
    if args.results:
        Path(args.results).write_text(output)
    print(f"{'setting':10s} {'mode':13s} {'K':>3s} {'seeds':>5s} {'hit@1':>6s} {'min':>6s} {'max':>6s} "
          f"{'ndcg@5':>6s} {'s/query':>8s}  best shortcut")
    shortcut = results[0]
    for row in summarise(results):
        print(f"{row['setting']:10s} {row['mode']:13s} {row['think_tokens']:3d} {row['seeds']:5d} "
              f"{row['hit@1_mean']:6.3f} {row['hit@1_min']:6.3f} {row['hit@1_max']:6.3f} {row['ndcg@5_mean']:6.3f} "
              f"{row['seconds_per_query_mean']:8.4f}  {shortcut['shortcut_best_name']['hit@1']} "
              f"{shortcut['shortcut_best']['hit@1']:.3f}")


if __name__ == "__main__":
    main()
