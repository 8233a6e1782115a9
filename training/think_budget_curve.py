"""Hit@1 against the think budget K, and the adaptive budget (``think_tokens="auto"``) against fixed K (issue 15).

    python training/think_budget_curve.py --model runs/abl/gr-grid1/k16_distill-seed0 --data runs/data_grid1 \\
        --budgets 0 1 2 4 8 16 32 --policy predictor --repeats 3 --output think_budget_curve.json

``--data`` is a folder with ``eval.jsonl`` (MMEB-eval rows, as ``python -m tte_flash.synthetic`` writes them;
media paths relative to the folder) or the JSONL file itself. The rows are split, seeded (``--seed``), into a
calibration part (``--calibration_fraction``, default half) and a test part. Then:

1. **Fixed K** (``--budgets``, default 0 1 2 4 8 16 32; budgets above the model's ``max_think_tokens`` are dropped
   with a message): every query of both parts is encoded with K think tokens and scored as
   ``python -m tte_flash.evaluate`` scores it (``tte_flash.evaluate.candidate_scores``, ``tte_flash.ranking``:
   pessimistic ties, the positive in column 0); per query: correct (positive ranked first) and NDCG@5.
2. **Policies**, learned on the calibration part only (``tte_flash.budget``): the per-task table (smallest K within
   ``--tolerance`` of the task's best calibration Hit@1; the task is the row's ``task`` field) and the K=0-state
   predictor (targets: the smallest K that gets each calibration query right). Both are stored on the loaded
   model with ``set_think_budget_policy`` (in memory) and the test part is encoded through the package's own
   ``encode_query(..., think_tokens="auto")``: the predictor row's time includes the extra K=0 pass it costs.
3. **Oracle**: per test query the smallest K that ranks its positive first (else the K with its best rank), an
   upper bound on any per-query policy; its ms/query is estimated from the fixed-K times, not measured.

``--policy`` (predictor or table) names the policy of the ``auto`` headline and the one ``--save_policy`` writes:
then the model folder's checkpoint is rewritten through ``save_pretrained`` (each file written to a temporary
folder beside it, then renamed into place, ``config.json`` last) with that policy only, the other cleared, so the
checkpoint's ``think_tokens="auto"`` is what was measured here. Without ``--save_policy`` the folder is not touched.

ms/query is the wall-clock time of the test queries' encoding plus their scoring (candidates are encoded once,
shared by every row, and not counted), with the same ``--batch_size`` for every K, the fastest of ``--repeats``
runs (all timed rows in rotating order). Times come from a shared machine: compare them within one run, not across
runs. Prints a markdown table (and the chosen-K distribution of each policy) and writes a JSON with every row, the
per-query results, the policies, the split, the arguments, versions and commit.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import torch

from tte_flash.budget import budget_table, fit_budget_predictor, predict_budgets
from tte_flash.evaluate import _inputs, _load, candidate_scores, load_model  # the evaluator's rows and scoring
from tte_flash.ranking import check_finite, hit_at_k, ndcg_at_k, ranks

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUDGETS = (0, 1, 2, 4, 8, 16, 32)
POLICIES = ("predictor", "table")
TIMING_NOTE = ("ms/query: wall-clock time of the test queries' encoding plus scoring (candidate encoding is shared "
               "and not counted), same batch size for every K, on a shared machine: compare times within one run, "
               "not across runs. The oracle's time is estimated from the fixed-K times, not measured.")


# ---------------------------------------------------------------------------------------- split and budgets

def split_rows(n_rows: int, calibration_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of row indices into (calibration, test), each sorted; both non-empty."""
    if not 0 < calibration_fraction < 1:
        raise ValueError(f"--calibration_fraction must be in (0, 1), got {calibration_fraction}")
    n_calibration = int(round(n_rows * calibration_fraction))
    if n_rows < 2 or not 0 < n_calibration < n_rows:
        raise ValueError(f"{n_rows} rows cannot be split into non-empty calibration and test parts "
                         f"at fraction {calibration_fraction}")
    order = np.random.default_rng(seed).permutation(n_rows).tolist()
    return sorted(order[:n_calibration]), sorted(order[n_calibration:])


def cap_budgets(budgets, max_think_tokens: int) -> tuple[list[int], list[int]]:
    """(kept, dropped): the distinct budgets in [0, max_think_tokens], sorted, and those above it."""
    budgets = sorted(set(int(k) for k in budgets))
    if budgets and budgets[0] < 0:
        raise ValueError(f"budgets must be >= 0, got {budgets[0]}")
    kept = [k for k in budgets if k <= max_think_tokens]
    if not kept:
        raise ValueError(f"no budget <= the model's max_think_tokens={max_think_tokens} in {budgets}")
    return kept, [k for k in budgets if k > max_think_tokens]


# ---------------------------------------------------------------------------------------- encoding and scoring

class Part:
    """One part of the rows (calibration or test): its query inputs, candidate index and tasks."""

    def __init__(self, name, positions, queries, index, tasks, ids):
        self.name, self.positions = name, positions
        self.queries = [queries[i] for i in positions]
        self.index = index[positions]  # (n, max_candidates) into the shared candidate embeddings
        self.tasks = [tasks[i] for i in positions]
        self.ids = [ids[i] for i in positions]

    def __len__(self):
        return len(self.queries)


def scores_of(model, q_emb, doc_emb, part: Part, what: str) -> torch.Tensor:
    """``[n, max_candidates]`` scores (positive in column 0, -inf padding), as ``tte_flash.evaluate`` scores."""
    scores = candidate_scores(model.similarity(q_emb, doc_emb), part.index)
    return check_finite(scores, f"scores ({what}, {part.name})", names=part.ids, label="row", padding=True)


def timed_scores(model, part: Part, doc_emb, batch_size: int, **encode_kwargs) -> tuple[torch.Tensor, float]:
    """(scores, seconds) of encoding ``part``'s queries with ``encode_kwargs`` and scoring them."""
    start = time.perf_counter()
    q_emb = model.encode_query(part.queries, batch_size=batch_size, convert_to_tensor=True,
                               show_progress_bar=False, **encode_kwargs)
    scores = scores_of(model, q_emb, doc_emb, part, str(encode_kwargs))
    return scores, time.perf_counter() - start


def timed_table_scores(model, part: Part, doc_emb, batch_size: int) -> tuple[torch.Tensor, float]:
    """As :func:`timed_scores` with ``think_tokens="auto"`` and each query's task (one encode call per task)."""
    start = time.perf_counter()
    q_emb = None
    for task in sorted(set(part.tasks)):
        idx = [i for i, t in enumerate(part.tasks) if t == task]
        emb = model.encode_query([part.queries[i] for i in idx], think_tokens="auto", task=task,
                                 batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
        q_emb = emb.new_empty(len(part), emb.shape[1]) if q_emb is None else q_emb
        q_emb[idx] = emb
    scores = scores_of(model, q_emb, doc_emb, part, "auto, table")
    return scores, time.perf_counter() - start


def k0_states(model, part: Part, batch_size: int) -> torch.Tensor:
    """The K=0 ``<emb>`` states the predictor reads, computed as ``encode_query(think_tokens="auto")`` does."""
    return model.encode_query(part.queries, think_tokens=0, batch_size=batch_size, convert_to_tensor=True,
                              normalize_embeddings=False, truncate_dim=None, show_progress_bar=False)


def per_query(scores: torch.Tensor) -> dict:
    """Per query: correct (positive ranked first, pessimistic ties), rank and NDCG@5, from tte_flash.ranking."""
    return {"correct": (ranks(scores) == 1).tolist(), "rank": ranks(scores).tolist(),
            "ndcg@5": [ndcg_at_k(scores[i:i + 1], 5) for i in range(len(scores))]}


def metrics(scores: torch.Tensor) -> dict:
    return {"hit@1": hit_at_k(scores, 1), "ndcg@5": ndcg_at_k(scores, 5)}


# ---------------------------------------------------------------------------------------- the curve

def calibration_runs(model, part: Part, doc_emb, budgets, batch_size: int) -> dict:
    """``{K: {"metrics", "per_query"}}`` of the calibration part at every fixed K (untimed)."""
    runs = {}
    for k in budgets:
        q_emb = model.encode_query(part.queries, think_tokens=k, batch_size=batch_size, convert_to_tensor=True,
                                   show_progress_bar=False)
        scores = scores_of(model, q_emb, doc_emb, part, f"K={k}")
        runs[k] = {"metrics": metrics(scores), "per_query": per_query(scores)}
    return runs


def timed_rounds(measures: dict, repeats: int) -> dict:
    """``{name: (scores, seconds)}``: each measure (a callable returning ``(scores, seconds)``) run ``repeats``
    times in rotating order, so a change in the shared machine's load falls on every row alike; the fastest
    time of each is kept."""
    names, best = list(measures), {}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            scores, seconds = measures[name]()
            best[name] = (scores, min(seconds, best.get(name, (None, float("inf")))[1]))
    return best


def table_policy(runs: dict, calibration: Part, test: Part, tolerance: float) -> tuple[dict, list[str]]:
    """The per-task table from calibration Hit@1 per (task, K) (``runs``: :func:`calibration_runs`); tasks
    only in the test part get the largest K."""
    scores = {}
    for task in sorted(set(calibration.tasks)):
        idx = [i for i, t in enumerate(calibration.tasks) if t == task]
        scores[task] = {k: float(np.mean([run["per_query"]["correct"][i] for i in idx])) for k, run in runs.items()}
    table = budget_table(scores, tolerance)
    unseen = sorted(set(test.tasks) - set(table))
    table.update({task: max(runs) for task in unseen})
    return table, unseen


def oracle_row(runs: dict, n_test: int) -> dict:
    """Per test query the smallest K that ranks its positive first, else the K with its best rank (smallest K)."""
    budgets = sorted(runs)
    chosen, correct, ndcg = [], [], []
    for i in range(n_test):
        best = min(budgets, key=lambda k: (runs[k]["test"]["per_query"]["rank"][i], k))
        chosen.append(best)
        correct.append(runs[best]["test"]["per_query"]["correct"][i])
        ndcg.append(runs[best]["test"]["per_query"]["ndcg@5"][i])
    return {"name": "oracle", "kind": "oracle", "chosen_k": dict(sorted(Counter(chosen).items())),
            "test": {"hit@1": float(np.mean(correct)), "ndcg@5": float(np.mean(ndcg))},
            "ms_per_query": float(np.mean([runs[k]["ms_per_query"] for k in chosen])), "ms_estimated": True,
            "per_query": {"chosen_k": chosen, "correct": correct}}


def auto_row(name, policy, scores, seconds, n_test, chosen) -> dict:
    return {"name": name, "kind": "auto", "policy": policy, "test": metrics(scores),
            "ms_per_query": 1000 * seconds / n_test, "chosen_k": dict(sorted(Counter(chosen).items())),
            "per_query": {"chosen_k": chosen, **per_query(scores)}}


def add_comparisons(rows: list[dict]) -> dict:
    """Fill ``time_vs_kmax`` (ms/query over the largest fixed K's) and ``hit@1_lost`` (best fixed K's test
    Hit@1 minus the row's) in place; return the reference ``{kmax, best_fixed_k, best_fixed_hit@1}``."""
    fixed = [r for r in rows if r["kind"] == "fixed"]
    kmax = max(fixed, key=lambda r: r["think_tokens"])
    best = max(fixed, key=lambda r: (r["test"]["hit@1"], -r["think_tokens"]))
    for row in rows:
        row["time_vs_kmax"] = row["ms_per_query"] / kmax["ms_per_query"]
        row["hit@1_lost"] = best["test"]["hit@1"] - row["test"]["hit@1"]
    return {"kmax": kmax["think_tokens"], "best_fixed_k": best["think_tokens"],
            "best_fixed_hit@1": best["test"]["hit@1"]}


def markdown_table(rows: list[dict], reference: dict) -> str:
    lines = ["| K or policy | Hit@1 test | NDCG@5 | ms/query | time vs K=max | Hit@1 lost vs best fixed K |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        ms = f"{row['ms_per_query']:.2f}" + (" (est.)" if row.get("ms_estimated") else "")
        lines.append(f"| {row['name']} | {row['test']['hit@1']:.3f} | {row['test']['ndcg@5']:.3f} | {ms} | "
                     f"{row['time_vs_kmax']:.2f}x | {row['hit@1_lost']:+.3f} |")
    lines.append(f"\nK=max is K={reference['kmax']}; best fixed K on the test part: K={reference['best_fixed_k']} "
                 f"(Hit@1 {reference['best_fixed_hit@1']:.3f}). {TIMING_NOTE}")
    return "\n".join(lines)


def chosen_k_line(rows: list[dict]) -> str:
    return "\n".join(f"{row['name']}: chosen K {row['chosen_k']}" for row in rows if "chosen_k" in row)


# ---------------------------------------------------------------------------------------- saving the policy

def save_policy(model, folder: Path, policy: str) -> None:
    """Rewrite ``folder``'s checkpoint through ``save_pretrained`` with only ``policy`` stored: written to a
    temporary folder beside it, each file fsynced and renamed into place, ``config.json`` last; the model card
    and other files of the folder are kept."""
    if policy == "predictor":
        model.config.think_budget_table = None
    else:
        model.config.think_budget_predictor = None
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.think-budget-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, model_card=False)
        names = sorted((p.name for p in tmp.iterdir() if p.is_file()), key=lambda n: n == "config.json")
        for name in names:
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a trained TTE-Flash checkpoint folder")
    p.add_argument("--data", required=True, help="a folder with eval.jsonl (tte_flash.synthetic), or the JSONL file")
    p.add_argument("--budgets", type=int, nargs="+", default=list(DEFAULT_BUDGETS),
                   help="fixed think budgets K (capped at the model's max_think_tokens)")
    p.add_argument("--calibration_fraction", type=float, default=0.5,
                   help="share of the rows (seeded split) that learns the policies; the rest is the test part")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="table policy: a task's smallest K with calibration Hit@1 >= best - tolerance")
    p.add_argument("--policy", choices=POLICIES, default="predictor",
                   help="the policy of the auto headline and of --save_policy (both are reported)")
    p.add_argument("--save_policy", action="store_true",
                   help="write the --policy policy into the model folder's checkpoint (atomically)")
    p.add_argument("--seed", type=int, default=0, help="the split and the predictor's initialisation")
    p.add_argument("--batch_size", type=int, default=32, help="the same for every K")
    p.add_argument("--repeats", type=int, default=1, help="times each timed row is run (the fastest is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one per job on a shared CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--output", default=None, help="the results JSON")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--batch_size, --repeats and --threads must be >= 1")
    return args


def _commit() -> dict:
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def _versions() -> dict:
    import transformers

    import tte_flash
    return {"tte_flash": tte_flash.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, device).eval()
    budgets, dropped = cap_budgets(args.budgets, model.config.max_think_tokens)
    if dropped:
        print(f"think_budget_curve: dropping budgets {dropped}: above the model's "
              f"max_think_tokens={model.config.max_think_tokens}", file=sys.stderr)
    data = Path(args.data)
    path = data / "eval.jsonl" if data.is_dir() else data
    rows, image_root, dataset = _load(str(path), None, None)
    queries, documents, index = _inputs(rows, image_root)
    tasks = [str(row.get("task") or dataset) for row in rows]
    ids = [row.get("id", i) for i, row in enumerate(rows)]
    calibration_rows, test_rows = split_rows(len(rows), args.calibration_fraction, args.seed)
    parts = {name: Part(name, positions, queries, index, tasks, ids)
             for name, positions in (("calibration", calibration_rows), ("test", test_rows))}
    test = parts["test"]

    start = time.perf_counter()
    doc_emb = model.encode_document(documents, batch_size=args.batch_size, convert_to_tensor=True,
                                    show_progress_bar=False)
    document_seconds = time.perf_counter() - start
    model.encode_query(test.queries[:args.batch_size], think_tokens=max(budgets), batch_size=args.batch_size,
                       show_progress_bar=False)  # warm-up: lazy initialisation stays out of the first row's time
    calibration = calibration_runs(model, parts["calibration"], doc_emb, budgets, args.batch_size)
    correct = {k: torch.tensor(run["per_query"]["correct"]) for k, run in calibration.items()}
    predictor = fit_budget_predictor(k0_states(model, parts["calibration"], args.batch_size), correct, seed=args.seed)
    table, unseen = table_policy(calibration, parts["calibration"], test, args.tolerance)
    model.set_think_budget_policy(table=table, predictor=predictor)  # in memory: both rows run encode_query("auto")

    measures = {k: partial(timed_scores, model, test, doc_emb, args.batch_size, think_tokens=k) for k in budgets}
    measures["predictor"] = partial(timed_scores, model, test, doc_emb, args.batch_size, think_tokens="auto")
    measures["table"] = partial(timed_table_scores, model, test, doc_emb, args.batch_size)
    timed = timed_rounds(measures, args.repeats)
    runs = {k: {"calibration": calibration[k], "ms_per_query": 1000 * timed[k][1] / len(test),
                "test": {"metrics": metrics(timed[k][0]), "per_query": per_query(timed[k][0])}} for k in budgets}
    chosen = {"predictor": predict_budgets(predictor, k0_states(model, test, args.batch_size)),
              "table": [table[t] for t in test.tasks]}
    auto = {policy: auto_row(f"auto: {policy}", policy, *timed[policy], len(test), chosen[policy])
            for policy in POLICIES}
    auto[args.policy]["name"] += " (--policy)"

    table_rows = [{"name": f"K={k}", "kind": "fixed", "think_tokens": k, "test": run["test"]["metrics"],
                   "calibration": run["calibration"]["metrics"], "ms_per_query": run["ms_per_query"]}
                  for k, run in runs.items()]
    table_rows += [auto[args.policy], auto[next(p for p in POLICIES if p != args.policy)], oracle_row(runs, len(test))]
    reference = add_comparisons(table_rows)
    if args.save_policy:
        save_policy(model, Path(args.model), args.policy)
    per_query_rows = [{k: v for k, v in row.items() if k != "per_query"} for row in table_rows]
    return {
        "model": str(args.model), "data": str(path), "dataset": dataset, "n_rows": len(rows),
        "n_documents": len(documents), "document_seconds": round(document_seconds, 4),
        "split": {"seed": args.seed, "calibration_fraction": args.calibration_fraction,
                  "calibration": calibration_rows, "test": test_rows},
        "budgets": budgets, "budgets_dropped": dropped, "max_think_tokens": model.config.max_think_tokens,
        "rows": per_query_rows, "reference": reference, "timing_note": TIMING_NOTE,
        "policy": {"chosen": args.policy, "saved": bool(args.save_policy), "tolerance": args.tolerance,
                   "table": table, "tasks_without_calibration_rows": unseen, "predictor": predictor},
        "per_query": {"fixed": {str(k): {part: run[part]["per_query"] for part in ("calibration", "test")}
                                for k, run in runs.items()},
                      **{row["name"]: row["per_query"] for row in table_rows if "per_query" in row},
                      "ids": {name: part.ids for name, part in parts.items()}},
        "markdown": markdown_table(table_rows, reference), "device": str(device), "threads": args.threads,
        "batch_size": args.batch_size, "repeats": args.repeats, "args": vars(args), "argv": sys.argv,
        "versions": _versions(), **_commit(),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(result["markdown"])
    print(chosen_k_line(result["rows"]))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
