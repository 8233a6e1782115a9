"""MMEB-V2 (78 tasks: image, video, visual documents) from a local copy, scored as VLM2Vec scores it.

    python -m tte_flash.evaluate --benchmark mmeb-v2 --model DIR --data_root MMEB_V2 --output runs/mmeb [--tasks ...]

Layout (docs/mmeb.md): ``data_root`` is VLM2Vec's ``--data_basedir``: the TIGER-Lab/MMEB-V2 repository
unpacked (``image-tasks/``, ``video-tasks/frames/...``, ``visdoc-tasks/<name>/``) plus each task's test
file, saved where VLM2Vec's ``src/constant/dataset_hflocal_path.py`` loads it (``ANNOTATIONS`` below):
``<dir>[/<subset>]/<split>-*.parquet`` (or ``<split>.parquet`` / ``.jsonl`` / ``.json``).

Scoring (VLM2Vec ``eval.py`` + ``RankingMetrics``): each query ranks its own candidates (``local``: every
image task, SSv2, video QA, moment retrieval) or the task's whole candidate pool (``global``: video
classification against every label, video retrieval, visual documents). Hit@1 for image and video tasks,
NDCG@5 with linear gain and graded qrels for visual documents (``ndcg_linear@5``). Ties are broken
pessimistically (a relevant candidate ranks below equal scores); VLM2Vec's ``np.argsort`` leaves them to
the sort. Aggregation: the mean of the main metric per category, per modality and over all tasks present.

The task registry and the loaders live in :mod:`tte_flash.mmeb_data`, the ranking metrics in
:mod:`tte_flash.ranking`; their names are importable from here too.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from .mmeb_data import (CATEGORIES, TASKS, MissingTask, Task, TaskData, annotation_files,  # noqa: F401
                        load_task, read_rows, select_tasks, write_label_lists)
from .ranking import (TIES, NonFiniteScoresError, _ranked_metrics, check_finite, hit_at_k,  # noqa: F401
                      mean_metrics, ndcg_at_k, nonfinite_context, pad_scores, ranking_metrics, ranks)

logger = logging.getLogger("tte_flash.mmeb")


# ---------------------------------------------------------------------------------------- scoring a task

def score_task(data: TaskData, q_emb: torch.Tensor, c_emb: torch.Tensor, keys: list, similarity) -> dict:
    """Per-query ranking metrics from query and candidate embeddings (``keys`` name ``c_emb``'s rows).
    NaN or inf in a similarity: :class:`NonFiniteScoresError` naming the queries (never a score)."""
    sim = similarity(q_emb, c_emb).double().cpu().numpy()
    check_finite(sim, "similarities of the queries to the candidates", label="query")
    column = {k: i for i, k in enumerate(keys)}
    per_query = []
    for i, relevant in enumerate(data.relevance):
        if not relevant:
            raise ValueError(f"query {i} has no relevant candidate")
        pool = np.array([column[k] for k in data.local[i]]) if data.local is not None else np.arange(len(keys))
        gains = np.zeros(len(keys))
        gains[[column[k] for k in relevant if k in column]] = [g for k, g in relevant.items() if k in column]
        per_query.append(_ranked_metrics(sim[i, pool], gains[pool], sorted(relevant.values(), reverse=True),
                                         (1, 5, 10)))
    return mean_metrics(per_query)


def evaluate_task(model, task: Task, data_root, think_tokens=0, mode="latent", max_cot_tokens=128, batch_size=32,
                  num_frames=8, limit=None, show_progress_bar=None, reasoner=None, cache=None, cache_key=None):
    """Load, encode and score one task; returns its score dict (VLM2Vec's ``*_score.json`` keys and more).
    ``think_tokens`` a list: ``{K: score dict}``, the candidates encoded once for every K.
    ``cache``: a file for the candidate embeddings, reused when ``cache_key`` and the candidates match."""
    start = time.perf_counter()
    data = load_task(task, data_root, num_frames=num_frames, limit=limit)
    if not data.queries:
        raise ValueError(f"{task.name}: no queries in the test file")
    keys = list(data.candidates)
    c_emb = _cached_candidates(cache, cache_key, keys)
    if c_emb is None:
        with nonfinite_context(f"{task.name}, candidates"):
            c_emb = model.encode_document([data.candidates[k] for k in keys], batch_size=batch_size,
                                          convert_to_tensor=True, show_progress_bar=show_progress_bar)
        check_finite(c_emb, f"{task.name}, candidate embeddings", names=keys, label="candidate")
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(cache).with_name(f".{Path(cache).name}.{os.getpid()}.tmp")
            torch.save({"cache_key": cache_key, "keys": keys, "embeddings": c_emb.detach().cpu()}, tmp)
            os.replace(tmp, cache)
    document_seconds = time.perf_counter() - start
    extra = {"reasoner": reasoner} if reasoner is not None and mode == "explicit-cot" else {}
    results = {}
    for k in (think_tokens if isinstance(think_tokens, (list, tuple)) else [think_tokens]):
        start = time.perf_counter()
        with nonfinite_context(f"{task.name}, queries, K={k}"):
            q_emb = model.encode_query(data.queries, think_tokens=k, mode=mode, max_cot_tokens=max_cot_tokens,
                                       batch_size=batch_size, convert_to_tensor=True,
                                       show_progress_bar=show_progress_bar, **extra)
            metrics = score_task(data, q_emb, c_emb, keys, model.similarity)
        results[k] = {"task": task.name, "modality": task.modality, "category": task.category, "metric": task.metric,
                      "score": metrics[task.metric], **metrics, "num_pred": len(data.queries),
                      "num_data": len(data.queries), "num_candidates": len(keys), "eval_type": task.eval_type,
                      "think_tokens": k, "notes": data.notes, "document_seconds": round(document_seconds, 3),
                      "query_seconds": round(time.perf_counter() - start, 3)}
    return results if isinstance(think_tokens, (list, tuple)) else results[think_tokens]


def _cached_candidates(cache, cache_key, keys):
    """The cached candidate embeddings when the file holds these candidates for this key, else None."""
    if cache is None or not Path(cache).is_file():
        return None
    try:
        stored = torch.load(cache, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: recompute
        logger.warning("ignoring the embedding cache %s: %s", cache, err)
        return None
    if stored.get("cache_key") != cache_key or stored.get("keys") != keys:
        return None
    embeddings = stored.get("embeddings")
    if not isinstance(embeddings, torch.Tensor) or not bool(torch.isfinite(embeddings).all()):
        logger.warning("ignoring the embedding cache %s: it holds NaN or inf (or no) embeddings", cache)
        return None
    return embeddings


# ---------------------------------------------------------------------------------------- the benchmark

def score_path(output_dir, task: Task) -> Path:
    """``<output>/<modality>/<task>_score.json``, VLM2Vec's layout (``report_score_v2.py`` reads it)."""
    return Path(output_dir) / task.modality / f"{task.name}_score.json"


def write_json_atomic(path, obj) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _stored(path: Path, fingerprint: dict, overwrite: bool):
    """A finished score for this fingerprint, None to compute; ``ValueError`` for another run's file."""
    if not path.is_file() or overwrite:
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        logger.warning("%s is not valid JSON: recomputing it", path)
        return None
    if stored.get("fingerprint") != fingerprint:
        raise ValueError(f"{path} holds a score of another model or setting ({stored.get('fingerprint')}; this run: "
                         f"{fingerprint}): pass another --output, or --overwrite to replace it")
    return stored


def run_benchmark(model, data_root, output_dir, tasks=None, fingerprint: dict | None = None, overwrite=False,
                  progress=None, think_tokens=0, **eval_kwargs):
    """Every selected task, resumably: a task whose score file exists with the same ``fingerprint`` is
    read back, not recomputed. A task whose test file is missing is reported as missing; one that
    fails (a missing frame, a bad row, NaN or inf embeddings or scores) as an error with the message.
    Both are left out of the means: a non-finite score is never a rank, 0 or 1.
    Writes ``summary.json`` and ``summary.md`` under ``output_dir``; returns the summary.

    ``think_tokens`` a list of budgets: one results folder per K (``output_dir/k<K>``), the candidates
    encoded once per task for all of them; returns ``{K: summary}``. Candidate embeddings are kept in
    ``output_dir/.cache/<task>.candidates.pt`` (documents take no think tokens): a rerun with another K,
    or after a crash in the queries, does not encode them again.
    ``progress``: called with one line per task (default: the module logger at INFO)."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise FileNotFoundError(f"--data_root {data_root} is not a folder")
    several = isinstance(think_tokens, (list, tuple))
    budgets = list(dict.fromkeys(think_tokens)) if several else [think_tokens]
    folders = {k: results_folder(output_dir, k, several) for k in budgets}
    fingerprints = {k: {**(fingerprint or {}), "think_tokens": k, **{name: eval_kwargs.get(name) for name in
                                                                      ("mode", "max_cot_tokens", "num_frames", "limit")}}
                    for k in budgets}
    selected = select_tasks(tasks)
    for task in selected:  # refuse another run's files before any work
        for k in budgets:
            _stored(score_path(folders[k], task), fingerprints[k], overwrite)
    progress = progress or logger.info
    results = {k: {} for k in budgets}
    for number, task in enumerate(selected, 1):
        where = f"[{number}/{len(selected)}] {task.name}"
        todo = []
        for k in budgets:
            stored = _stored(score_path(folders[k], task), fingerprints[k], overwrite)
            if stored is None:
                todo.append(k)
                continue
            results[k][task.name] = {**stored, "status": "done", "resumed": True}
            progress(f"{where} K={k}: {task.metric} {stored['score']:.4f} (read back)")
        if not todo:
            continue
        cache_key = {k: v for k, v in fingerprints[todo[0]].items() if k not in ("think_tokens", "mode", "max_cot_tokens")}
        try:
            computed = evaluate_task(model, task, data_root, think_tokens=todo, cache_key=cache_key,
                                     cache=Path(output_dir) / ".cache" / f"{task.name}.candidates.pt", **eval_kwargs)
        except MissingTask as err:
            for k in todo:
                results[k][task.name] = {"task": task.name, "status": "missing", "reason": str(err)}
            progress(f"{where}: MISSING: {err}")
            continue
        except (FileNotFoundError, ValueError, KeyError, IndexError) as err:
            for k in todo:
                results[k][task.name] = {"task": task.name, "status": "error", "reason": f"{type(err).__name__}: {err}"}
            progress(f"{where}: ERROR: {type(err).__name__}: {err}")
            continue
        for k, result in computed.items():
            write_json_atomic(score_path(folders[k], task), {**result, "fingerprint": fingerprints[k]})
            results[k][task.name] = {**result, "status": "done", "resumed": False}
            progress(f"{where} K={k}: {task.metric} {result['score']:.4f} ({result['num_pred']} queries, "
                     f"{result['num_candidates']} candidates, {result['document_seconds'] + result['query_seconds']:.1f} s)")
    summaries = {}
    for k in budgets:
        summary = {"benchmark": "MMEB-V2", "fingerprint": fingerprints[k], "aggregate": aggregate(results[k], selected),
                   "tasks": results[k]}
        write_json_atomic(folders[k] / "summary.json", summary)
        (folders[k] / "summary.md").write_text(format_markdown(summary, selected) + "\n", encoding="utf-8")
        summaries[k] = summary
    return summaries if several else summaries[think_tokens]


def results_folder(output_dir, think_tokens: int, several: bool) -> Path:
    """Where a run's results for one K go: with several K, ``output_dir/k<K>``; with one, ``output_dir`` itself,
    or its ``k<K>`` folder when an earlier run with several K made one (so its finished tasks are read back)."""
    nested = Path(output_dir) / f"k{think_tokens}"
    return nested if several or nested.is_dir() else Path(output_dir)


def aggregate(results: dict, selected: list[Task]) -> dict:
    """Mean main metric per category, per modality and overall, over finished tasks, with the counts: ``n``
    finished, ``selected`` asked for, ``of`` in the benchmark (78 overall). A mean over fewer tasks than the
    benchmark has (a ``--tasks`` subset, missing or failed tasks) is partial and says so; never padded with 0."""
    def mean(group, every):
        done = [results[t.name]["score"] for t in group if results.get(t.name, {}).get("status") == "done"]
        return {"score": float(np.mean(done)) if done else None, "n": len(done), "selected": len(group),
                "of": len(every)}
    everything = list(TASKS.values())
    out = {"overall": mean(selected, everything), "modalities": {}, "categories": {}}
    for modality, categories in CATEGORIES.items():
        in_modality = [t for t in selected if t.modality == modality]
        if not in_modality:
            continue
        out["modalities"][modality] = mean(in_modality, [t for t in everything if t.modality == modality])
        for category in categories:
            group = [t for t in in_modality if t.category == category]
            if group:
                out["categories"][f"{modality}:{category}"] = mean(
                    group, [t for t in everything if t.modality == modality and t.category == category])
    return out


def _cell(entry) -> str:
    if entry["score"] is None:
        return "-"
    value = f"{100 * entry['score']:.1f}"
    return value if entry["n"] == entry["of"] else f"{value} ({entry['n']}/{entry['of']})"


def format_markdown(summary: dict, selected: list[Task]) -> str:
    """One table per modality (its tasks, then each category mean and the modality mean), the
    aggregated row as the paper lays it out, and the missing / failed tasks. Scores x 100."""
    agg, results = summary["aggregate"], summary["tasks"]
    setting = ", ".join(f"{k} {v}" for k, v in summary["fingerprint"].items() if v is not None)
    lines = ["# MMEB-V2", "", setting, "", "Scores x 100; `a (n/N)`: mean over the n of N tasks that finished.", ""]
    header = ["Overall"]
    row = [_cell(agg["overall"])]
    for modality, categories in CATEGORIES.items():
        if modality not in agg["modalities"]:
            continue
        for category in categories:
            if f"{modality}:{category}" in agg["categories"]:
                header.append(f"{modality} {category}")
                row.append(_cell(agg["categories"][f"{modality}:{category}"]))
        header.append(f"{modality} overall")
        row.append(_cell(agg["modalities"][modality]))
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |", ""]
    for modality in agg["modalities"]:
        lines += [f"## {modality}", "", "| category | task | metric | score | queries |", "|---|---|---|---|---|"]
        for task in (t for t in selected if t.modality == modality):
            r = results[task.name]
            score = f"{100 * r['score']:.1f}" if r["status"] == "done" else r["status"].upper()
            lines.append(f"| {task.category} | {task.name} | {task.metric} | {score} | {r.get('num_pred', '')} |")
        lines.append("")
    notes = [f"- {r['task']}: {note}" for r in results.values() if r["status"] == "done" for note in r.get("notes", [])]
    if notes:
        lines += ["## Notes (where a task's setup differs from VLM2Vec's run)", "", *notes, ""]
    problems = [r for r in results.values() if r["status"] != "done"]
    if problems:
        lines += ["## Not scored (left out of every mean)", ""]
        lines += [f"- {r['task']} ({r['status']}): {r['reason']}" for r in problems]
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m tte_flash.mmeb --write_labels VLM2VEC_FILE --data_root DIR``: the class lists of the
    video classification tasks (see :func:`write_label_lists`). Evaluation is ``tte_flash.evaluate``."""
    import argparse
    import sys
    parser = argparse.ArgumentParser(prog="python -m tte_flash.mmeb", description=main.__doc__.split("\n")[0])
    parser.add_argument("--write_labels", "--write-labels", required=True, metavar="VLM2VEC_FILE",
                        help="VLM2Vec's src/data/eval_dataset/video_classification_utils.py")
    parser.add_argument("--data_root", "--data-root", required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        written = write_label_lists(args.write_labels, args.data_root, overwrite=args.overwrite)
    except (OSError, SyntaxError, ValueError) as err:
        print(f"tte_flash.mmeb: error: {err}", file=sys.stderr)
        return 2
    for task, path in written.items():
        print(f"{task}: {len(path.read_text(encoding='utf-8').splitlines())} labels -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
