"""MMEB-V2 (78 tasks: image, video, visual documents) from a local copy, with VLM2Vec's tasks, loaders and
metrics; scored correctly by default, or by VLM2Vec's exact procedure (``--scoring vlm2vec``) or both ways.

    python -m tte_flash.evaluate --benchmark mmeb-v2 --model DIR --data_root MMEB_V2 --output runs/mmeb [--tasks ...]
    python -m tte_flash.mmeb --scoring both --model DIR --data_root MMEB_V2 --output runs/mmeb [--tasks ...]

Layout (docs/mmeb.md): ``data_root`` is VLM2Vec's ``--data_basedir``: the TIGER-Lab/MMEB-V2 repository
unpacked (``image-tasks/``, ``video-tasks/frames/...``, ``visdoc-tasks/<name>/``) plus each task's test
file, saved where VLM2Vec's ``src/constant/dataset_hflocal_path.py`` loads it (``ANNOTATIONS`` below):
``<dir>[/<subset>]/<split>-*.parquet`` (or ``<split>.parquet`` / ``.jsonl`` / ``.json``).

Scoring (VLM2Vec ``eval.py`` + ``RankingMetrics``): each query ranks its own candidates (``local``: every
image task, SSv2, video QA, moment retrieval) or the task's whole candidate pool (``global``: video
classification against every label, video retrieval, visual documents). Hit@1 for image and video tasks,
NDCG@5 with linear gain and graded qrels for visual documents (``ndcg_linear@5``). Aggregation: the mean of
the main metric per category, per modality and over all tasks present.

Scoring (docs/mmeb.md, "Scoring: correct vs vlm2vec"). ``correct`` (default): each relevant document keeps
its own grade, ties are broken pessimistically (a relevant candidate ranks below equal scores), and a
query whose positive is not among its candidates fails the task. ``vlm2vec``: VLM2Vec's procedure,
reproduced exactly: grades paired with documents after a ``set`` reorders the labels (its graded NDCG then
depends on the ids' hash order, for string ids on PYTHONHASHSEED), ties in numpy's unstable ``argsort``
order of float32 scores over VLM2Vec's pool order, and such a query kept as VLM2Vec keeps it, with a warning
(an MVBench answer no option has: a miss; a video label labels.txt lacks: one more candidate).

The task registry and the loaders live in :mod:`tte_flash.mmeb_data`, the ranking metrics in
:mod:`tte_flash.ranking`; their names are importable from here too.
"""
from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from .mmeb_data import (CATEGORIES, TASKS, MissingTask, Task, TaskData, annotation_files,  # noqa: F401
                        load_task, read_rows, select_tasks, write_label_lists)
from .ranking import (SCORINGS, TIES, NonFiniteScoresError, _ranked_metrics, check_finite, hit_at_k,  # noqa: F401
                      mean_metrics, ndcg_at_k, nonfinite_context, pad_scores, ranking_metrics, ranks, vlm2vec_grades,
                      vlm2vec_metrics, vlm2vec_order)
from .writing import atomic_write_bytes, folder_lock, sha256_bytes, sha256_json

logger = logging.getLogger("tte_flash.mmeb")
# run_benchmark's scoring when the caller passes none: python -m tte_flash.mmeb --scoring sets it around its run
_SCORING = contextvars.ContextVar("tte_flash_mmeb_scoring", default="correct")
_PROMPTS = contextvars.ContextVar("tte_flash_mmeb_prompts", default="tte")  # likewise for --prompts
PROMPTS = ("tte", "vlm2vec")


# ---------------------------------------------------------------------------------------- scoring a task

def score_task(data: TaskData, q_emb: torch.Tensor, c_emb: torch.Tensor, keys: list, similarity,
               scoring: str = "correct") -> dict:
    """Per-query ranking metrics from query and candidate embeddings (``keys`` name ``c_emb``'s rows), averaged.
    NaN or inf in a similarity: :class:`NonFiniteScoresError` naming the queries (never a score).
    ``scoring``: ``correct`` (graded qrels as given, pessimistic ties) or ``vlm2vec`` (VLM2Vec's procedure:
    :func:`score_task_vlm2vec`)."""
    if scoring == "vlm2vec":
        return score_task_vlm2vec(data, q_emb, c_emb, keys, similarity)
    if scoring != "correct":
        raise ValueError(f"unknown scoring {scoring!r}; choose one of {SCORINGS}")
    if data.misses or data.added:
        found = data.misses + data.added
        raise ValueError(f"{found[0]} ({len(found)} such queries; --scoring vlm2vec keeps them as VLM2Vec does)")
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


def score_task_vlm2vec(data: TaskData, q_emb: torch.Tensor, c_emb: torch.Tensor, keys: list, similarity,
                       ks=(1, 5, 10), chunk: int = 1024) -> dict:
    """:func:`score_task` by VLM2Vec's procedure (``eval.py`` + ``RankingMetrics``), for numbers comparable with
    its leaderboard: float32 similarities ranked by numpy's default (unstable) ``argsort`` of their negation,
    each query's own candidates (local tasks) or the whole pool (global ones) in VLM2Vec's order; the labels
    paired with their grades after a ``set`` reorders them (:func:`~tte_flash.ranking.vlm2vec_grades`); a
    query whose positive is not a candidate scores 0 (:attr:`TaskData.misses`). A global pool is ordered as
    VLM2Vec's ``generate_cand_dataset`` orders it (every query's own candidates, that is its labels, in query
    order, then the rest), which decides the order of tied candidates."""
    sim = similarity(q_emb, c_emb).float().cpu().numpy()
    check_finite(sim, "similarities of the queries to the candidates", label="query")
    column = {k: i for i, k in enumerate(keys)}
    depth = max(ks)  # the metrics read the first max(ks) ranks only
    ranked_rows = []
    if data.local is None:  # global: VLM2Vec argsorts the whole score matrix along its rows (here in blocks)
        pool = list(dict.fromkeys([k for relevant in data.relevance for k in relevant if k in column] + keys))
        sim = sim[:, [column[k] for k in pool]]
        for start in range(0, len(sim), chunk):
            ranked_rows += [[pool[j] for j in row] for row in vlm2vec_order(sim[start:start + chunk])[:, :depth]]
    else:  # local: each query's own candidates, in the order its row lists them
        for i, pool in enumerate(data.local):
            ranked_rows.append([pool[j] for j in vlm2vec_order(sim[i, [column[k] for k in pool]])[:depth]])
    per_query = []
    for i, ranked in enumerate(ranked_rows):
        if data.label_ids is not None:  # graded: the pairing on the ids as VLM2Vec holds them (int or str)
            ours = dict(data.label_ids[i])
            graded = {ours[label]: grade for label, grade in
                      vlm2vec_grades([label for label, _ in data.label_ids[i]], data.grades[i]).items()}
        else:
            graded = vlm2vec_grades(list(data.relevance[i]))
        if not graded:
            raise ValueError(f"query {i} has no relevant candidate")
        per_query.append(vlm2vec_metrics(ranked, graded, ks))
    return mean_metrics(per_query)


def _scorings(scoring: str) -> tuple[str, tuple]:
    """(the scoring whose number is ``score``, every scoring computed) for ``scoring`` correct/vlm2vec/both."""
    if scoring == "both":
        return "correct", SCORINGS
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; choose one of {(*SCORINGS, 'both')}")
    return scoring, (scoring,)


def evaluate_task(model, task: Task, data_root, think_tokens=0, mode="latent", max_cot_tokens=128, batch_size=32,
                  num_frames=8, limit=None, show_progress_bar=None, reasoner=None, cache=None, cache_key=None,
                  scoring="correct", data: TaskData | None = None, reuse_cache=True, prompts="tte"):
    """Load, encode and score one task; returns its score dict (VLM2Vec's ``*_score.json`` keys and more).
    ``think_tokens`` a list: ``{K: score dict}``, the candidates encoded once for every K.
    ``cache``: a file for the candidate embeddings, reused (unless ``reuse_cache`` is False) when ``cache_key``,
    the candidates and their content (:func:`inputs_digest`) match and the embeddings have the SHA-256 stored
    with them. ``data``: the task as :func:`load_task` loaded it (default: loaded here).
    ``scoring``: ``correct`` (default), ``vlm2vec`` (VLM2Vec's procedure, docs/mmeb.md) or ``both``: ``score`` and
    the metric keys are the correct scoring's, ``scores`` holds each scoring's main metric and ``by_scoring``
    its metrics. With ``both``, a task the correct scoring refuses (a positive that is no candidate) has
    ``score`` None and the reason in ``errors``, its vlm2vec number still in ``scores``.
    ``prompts``: how an image task's instruction and text are joined (:func:`load_task`: ``tte`` or ``vlm2vec``)."""
    primary, scorings = _scorings(scoring)
    start = time.perf_counter()
    if data is None:
        data = load_task(task, data_root, num_frames=num_frames, limit=limit, vlm2vec="vlm2vec" in scorings,
                         prompts=prompts)
    if not data.queries:
        raise ValueError(f"{task.name}: no queries in the test file")
    keys = list(data.candidates)
    candidates_sha256 = inputs_digest(data.candidates) if cache is not None else None
    c_emb = _cached_candidates(cache, cache_key, keys, candidates_sha256) if reuse_cache else None
    if c_emb is None:
        with nonfinite_context(f"{task.name}, candidates"):
            c_emb = model.encode_document([data.candidates[k] for k in keys], batch_size=batch_size,
                                          convert_to_tensor=True, show_progress_bar=show_progress_bar)
        check_finite(c_emb, f"{task.name}, candidate embeddings", names=keys, label="candidate")
        if cache is not None:
            _write_cache(Path(cache), cache_key, keys, candidates_sha256, c_emb.detach().cpu())
    document_seconds = time.perf_counter() - start
    extra = {"reasoner": reasoner} if reasoner is not None and mode == "explicit-cot" else {}
    results = {}
    for k in (think_tokens if isinstance(think_tokens, (list, tuple)) else [think_tokens]):
        start = time.perf_counter()
        with nonfinite_context(f"{task.name}, queries, K={k}"):
            q_emb = model.encode_query(data.queries, think_tokens=k, mode=mode, max_cot_tokens=max_cot_tokens,
                                       batch_size=batch_size, convert_to_tensor=True,
                                       show_progress_bar=show_progress_bar, **extra)
            by_scoring, errors = {}, {}
            for name in scorings:
                try:
                    by_scoring[name] = score_task(data, q_emb, c_emb, keys, model.similarity, scoring=name)
                except ValueError as err:
                    if (name == primary and len(scorings) == 1) or isinstance(err, NonFiniteScoresError):
                        raise
                    errors[name] = f"{type(err).__name__}: {err}"
        metrics = by_scoring.get(primary, {})
        extra_keys = {"scoring": scoring,
                      "scores": {name: by_scoring[name][task.metric] if name in by_scoring else None for name in scorings}}
        if "vlm2vec" in scorings:  # queries kept as VLM2Vec keeps them (the correct scoring refuses the task)
            extra_keys.update(misses=len(data.misses), added_candidates=len(data.added))
        if len(scorings) > 1:
            extra_keys.update(by_scoring=by_scoring, errors=errors)
        results[k] = {"task": task.name, "modality": task.modality, "category": task.category, "metric": task.metric,
                      "score": metrics.get(task.metric), **metrics, **extra_keys, "num_pred": len(data.queries),
                      "num_data": len(data.queries), "num_candidates": len(keys), "eval_type": task.eval_type,
                      "think_tokens": k, "notes": data.notes, "document_seconds": round(document_seconds, 3),
                      "query_seconds": round(time.perf_counter() - start, 3)}
    return results if isinstance(think_tokens, (list, tuple)) else results[think_tokens]


def _embeddings_sha256(embeddings: torch.Tensor) -> str:
    array = embeddings.detach().cpu().contiguous()
    return sha256_bytes(f"{array.dtype}{tuple(array.shape)}".encode() + array.view(torch.uint8).numpy().tobytes())


def _write_cache(path: Path, cache_key, keys, candidates_sha256, embeddings: torch.Tensor):
    """The candidate embeddings with what they were made from and their own SHA-256, written whole."""
    import io
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"cache_key": cache_key, "keys": keys, "candidates_sha256": candidates_sha256,
                "rows": len(embeddings), "sha256": _embeddings_sha256(embeddings), "embeddings": embeddings}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _cached_candidates(cache, cache_key, keys, candidates_sha256=None):
    """The cached candidate embeddings when the file holds these candidates (same keys, same content) for this
    key, one row per candidate, with the SHA-256 stored beside them; else None, with a warning naming the file
    when it is damaged (zeroed, permuted, torn, foreign) or its candidates' content changed."""
    if cache is None or not Path(cache).is_file():
        return None
    try:
        stored = torch.load(cache, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file: recompute
        logger.warning("ignoring the embedding cache %s: %s", cache, err)
        return None
    if not isinstance(stored, dict) or stored.get("cache_key") != cache_key or stored.get("keys") != keys:
        return None
    embeddings = stored.get("embeddings")
    problem = None
    if stored.get("candidates_sha256") != candidates_sha256:
        problem = "the candidates' content changed since it was written (or it predates content hashes)"
    elif not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or stored.get("rows") != len(keys) or \
            len(embeddings) != len(keys):
        problem = "it does not hold one embedding per candidate"
    elif _embeddings_sha256(embeddings) != stored.get("sha256"):
        problem = "its embeddings do not match their SHA-256 (damaged or edited)"
    elif not bool(torch.isfinite(embeddings).all()):
        problem = "it holds NaN or inf embeddings"
    if problem is not None:
        logger.warning("ignoring the embedding cache %s: %s; encoding the candidates again", cache, problem)
        return None
    return embeddings


def inputs_digest(obj) -> str:
    """A SHA-256 of a task's inputs as the model reads them: texts and every other value, bytes, and for each
    local image or video file (or folder of frames) its path, size and mtime, so a file replaced under the
    same path changes the digest. Order-sensitive (dict keys may mix ints and strings)."""
    digest = hashlib.sha256()

    def media(value):
        if isinstance(value, (list, tuple)):
            for one in value:
                media(one)
        elif isinstance(value, (str, os.PathLike)) and not str(value).startswith(("http://", "https://")):
            path = Path(value)
            files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
            for file in files:
                try:
                    stat = file.stat()
                    digest.update(f"file {file} {stat.st_size} {stat.st_mtime_ns}\n".encode())
                except OSError:
                    digest.update(f"missing {file}\n".encode())
        else:
            walk(value)

    def walk(value):
        if isinstance(value, dict):
            digest.update(b"{")
            for key, item in value.items():
                digest.update(f"{type(key).__name__}:{key!r}=".encode())
                (media if key in ("image", "video") else walk)(item)
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                walk(item)
            digest.update(b"]")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            digest.update(b"bytes " + hashlib.sha256(value).digest())
        elif hasattr(value, "tobytes"):  # a PIL image, a numpy array
            digest.update(f"{type(value).__name__} {getattr(value, 'size', '')} {getattr(value, 'shape', '')}"
                          .encode() + hashlib.sha256(value.tobytes()).digest())
        else:
            digest.update(f"{type(value).__name__}:{value!r};".encode())

    walk(obj)
    return digest.hexdigest()


def task_digest(data: TaskData) -> str:
    """:func:`inputs_digest` of everything a task's score depends on: queries, candidates, relevance, pools."""
    return inputs_digest({"queries": data.queries, "candidates": data.candidates, "relevance": data.relevance,
                          "local": data.local, "label_ids": data.label_ids, "grades": data.grades})


# ---------------------------------------------------------------------------------------- the benchmark

def score_path(output_dir, task: Task) -> Path:
    """``<output>/<modality>/<task>_score.json``, VLM2Vec's layout (``report_score_v2.py`` reads it)."""
    return Path(output_dir) / task.modality / f"{task.name}_score.json"


def write_json_atomic(path, obj) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash or a full disk never leaves
    half a file (nor the temporary one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def _stored(path: Path, fingerprint: dict, overwrite: bool, warn: bool = True):
    """A finished score for this fingerprint, None to compute; ``ValueError`` for another run's file. A score
    file whose content does not match the SHA-256 written in it (edited, damaged) or that is no score file
    is computed again, with a warning (``warn``)."""
    report = logger.warning if warn else logger.debug
    if not path.is_file() or overwrite:
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        report("%s is not valid JSON: recomputing it", path)
        return None
    if not isinstance(stored, dict):
        report("%s is not a score file tte-flash wrote: recomputing it", path)
        return None
    if stored.get("fingerprint") != fingerprint:
        raise ValueError(f"{path} holds a score of another model or setting ({stored.get('fingerprint')}; this run: "
                         f"{fingerprint}): pass another --output, or --overwrite to replace it")
    if stored.get("sha256") != sha256_json({k: v for k, v in stored.items() if k != "sha256"}):
        report("%s does not match the SHA-256 written in it (edited or damaged): recomputing it", path)
        return None
    return stored


def _write_score(path: Path, result: dict):
    write_json_atomic(path, {**result, "sha256": sha256_json(result)})


def run_benchmark(model, data_root, output_dir, tasks=None, fingerprint: dict | None = None, overwrite=False,
                  progress=None, think_tokens=0, scoring: str | None = None, prompts: str | None = None,
                  **eval_kwargs):
    """Every selected task, resumably: a task whose score file exists with the same ``fingerprint`` is
    read back, not recomputed. A task whose test file is missing is reported as missing; one that
    fails (a missing frame, a bad row, NaN or inf embeddings or scores) as an error with the message.
    Both are left out of the means: a non-finite score is never a rank, 0 or 1.
    Writes ``summary.json`` and ``summary.md`` under ``output_dir``; returns the summary.

    ``think_tokens`` a list of budgets: one results folder per K (``output_dir/k<K>``), the candidates
    encoded once per task for all of them; returns ``{K: summary}``. Candidate embeddings are kept in
    ``output_dir/.cache/<task>.candidates.pt`` (documents take no think tokens): a rerun with another K,
    or after a crash in the queries, does not encode them again.
    ``progress``: called with one line per task (default: the module logger at INFO).

    ``scoring`` (default ``correct``, or what ``python -m tte_flash.mmeb --scoring`` set): ``vlm2vec`` scores by
    VLM2Vec's procedure, ``both`` computes both (``score`` and ``aggregate`` the correct one; each task's
    ``scores`` and the summary's ``aggregates`` both); see :func:`evaluate_task` and docs/mmeb.md. A scoring
    other than ``correct`` is part of the fingerprint (its score files are not another scoring's).
    ``prompts`` (default ``tte``, or what ``python -m tte_flash.mmeb --prompts`` set): ``vlm2vec`` joins the image
    tasks' instructions and texts as VLM2Vec does (:func:`load_task`); part of the fingerprint when not ``tte``.

    Guarded writes (:mod:`tte_flash.writing`): ``output_dir`` is locked while the run writes it (a second run
    into it gets an error naming the holder); the fingerprint holds the data root, and each score file and
    cache entry the digest of the task's inputs (:func:`task_digest`: texts, and each image's size and mtime),
    so another ``data_root`` or a changed file is never read back; score files carry their own SHA-256 and
    caches the SHA-256 of their embeddings (an edited or damaged one is reported and recomputed);
    ``overwrite`` recomputes everything, the cached candidates included."""
    scoring = scoring or _SCORING.get()
    _scorings(scoring)  # an unknown one fails before anything is written
    prompts = prompts or _PROMPTS.get()
    if prompts not in PROMPTS:
        raise ValueError(f"unknown prompts {prompts!r}; choose one of {PROMPTS}")
    eval_kwargs = {**eval_kwargs, "prompts": prompts}
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise FileNotFoundError(f"--data_root {data_root} is not a folder")
    several = isinstance(think_tokens, (list, tuple))
    budgets = list(dict.fromkeys(think_tokens)) if several else [think_tokens]
    fingerprints = {k: {**(fingerprint or {}), "data_root": str(data_root.resolve()), "think_tokens": k,
                        **{name: eval_kwargs.get(name) for name in ("mode", "max_cot_tokens", "num_frames", "limit")},
                        **({"scoring": scoring} if scoring != "correct" else {}),
                        **({"prompts": prompts} if prompts != "tte" else {})}
                    for k in budgets}
    selected = select_tasks(tasks)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with folder_lock(output_dir):  # one writer at a time: a second run into this folder is refused, never mixed
        summaries = _run_tasks(model, data_root, output_dir, selected, budgets, several, fingerprints,
                               overwrite, progress or logger.info, scoring, eval_kwargs)
    return summaries if several else summaries[think_tokens]


def _run_tasks(model, data_root: Path, output_dir, selected: list[Task], budgets: list, several: bool,
               fingerprints: dict, overwrite: bool, progress, scoring: str, eval_kwargs: dict) -> dict:
    """:func:`run_benchmark`'s work, under the folder lock: ``{K: summary}``."""
    primary, scorings = _scorings(scoring)
    folders = {k: results_folder(output_dir, k, several) for k in budgets}
    for task in selected:  # refuse another run's files before any work
        for k in budgets:
            _stored(score_path(folders[k], task), fingerprints[k], overwrite, warn=False)
    results = {k: {} for k in budgets}
    for number, task in enumerate(selected, 1):
        where = f"[{number}/{len(selected)}] {task.name}"
        todo = list(budgets)
        try:
            # the task's inputs are loaded even when every score is stored: a score is read back only when the
            # content it was computed from (texts, and each image's size and mtime) is still what is on disk
            data = load_task(task, data_root, num_frames=eval_kwargs.get("num_frames", 8),
                             limit=eval_kwargs.get("limit"), vlm2vec="vlm2vec" in scorings,
                             prompts=eval_kwargs["prompts"])
            digest = task_digest(data)
            for k in budgets:
                path = score_path(folders[k], task)
                stored = _stored(path, fingerprints[k], overwrite)
                if stored is not None and stored.get("inputs_sha256") != digest:
                    logger.warning("%s: the task's inputs under %s changed since it was scored: recomputing it",
                                   path, data_root)
                    stored = None
                if stored is None:
                    continue
                todo.remove(k)
                results[k][task.name] = {**stored, "status": "done", "resumed": True}
                progress(f"{where} K={k}: {task.metric} {stored['score']:.4f} (read back)")
            if not todo:
                continue
            cache_key = {k: v for k, v in fingerprints[todo[0]].items()
                         if k not in ("think_tokens", "mode", "max_cot_tokens", "scoring")}
            computed = evaluate_task(model, task, data_root, think_tokens=todo, cache_key=cache_key, scoring=scoring,
                                     cache=Path(output_dir) / ".cache" / f"{task.name}.candidates.pt", data=data,
                                     reuse_cache=not overwrite, **eval_kwargs)
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
            others = ", ".join(f"{name} {value:.4f}" if value is not None else f"{name} ERROR"
                               for name, value in result["scores"].items() if name != primary)
            if result["score"] is None:  # --scoring both, the correct scoring refused the task: not written
                reason = result["errors"][primary]
                results[k][task.name] = {**result, "status": "error", "reason": reason}
                progress(f"{where} K={k}: ERROR ({primary} scoring): {reason}; {others}")
                continue
            _write_score(score_path(folders[k], task), {**result, "fingerprint": fingerprints[k], "inputs_sha256": digest})
            results[k][task.name] = {**result, "status": "done", "resumed": False}
            progress(f"{where} K={k}: {task.metric} {result['score']:.4f}{f' ({others})' if others else ''} "
                     f"({result['num_pred']} queries, {result['num_candidates']} candidates, "
                     f"{result['document_seconds'] + result['query_seconds']:.1f} s)")
    summaries = {}
    for k in budgets:
        summary = {"benchmark": "MMEB-V2", "fingerprint": fingerprints[k], "scoring": scoring,
                   "aggregate": aggregate(results[k], selected)}
        if len(scorings) > 1:
            summary["aggregates"] = {name: aggregate(results[k], selected, scoring=name) for name in scorings}
        summary["tasks"] = results[k]
        write_json_atomic(folders[k] / "summary.json", summary)
        atomic_write_bytes(folders[k] / "summary.md", (format_markdown(summary, selected) + "\n").encode("utf-8"))
        summaries[k] = summary
    return summaries


def results_folder(output_dir, think_tokens: int, several: bool) -> Path:
    """Where a run's results for one K go: with several K, ``output_dir/k<K>``; with one, ``output_dir`` itself,
    or its ``k<K>`` folder when an earlier run with several K made one (so its finished tasks are read back)."""
    nested = Path(output_dir) / f"k{think_tokens}"
    return nested if several or nested.is_dir() else Path(output_dir)


def task_score(entry: dict, scoring: str | None = None):
    """A task's main metric: ``score`` of a finished task (``scoring`` None), or its number under ``scoring``
    (``entry["scores"]``; a run of one scoring has it as ``score``). None where there is none."""
    if scoring is None or "scores" not in entry:
        done = entry.get("status") == "done" and (scoring is None or entry.get("scoring", "correct") == scoring)
        return entry.get("score") if done else None
    return entry["scores"].get(scoring)


def aggregate(results: dict, selected: list[Task], scoring: str | None = None) -> dict:
    """Mean main metric per category, per modality and overall, over finished tasks, with the counts: ``n``
    finished, ``selected`` asked for, ``of`` in the benchmark (78 overall). A mean over fewer tasks than the
    benchmark has (a ``--tasks`` subset, missing or failed tasks) is partial and says so; never padded with 0.
    ``scoring`` (``correct`` / ``vlm2vec``): that scoring's numbers (:func:`task_score`), default ``score``."""
    def mean(group, every):
        done = [v for v in (task_score(results.get(t.name, {}), scoring) for t in group) if v is not None]
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
    aggregated row as the paper lays it out, and the missing / failed tasks. Scores x 100. A run with
    ``scoring="both"``: one aggregated row per scoring, and per task both numbers and their difference."""
    agg, results = summary["aggregate"], summary["tasks"]
    aggregates = summary.get("aggregates") or {summary.get("scoring", "correct"): agg}
    both = len(aggregates) > 1
    setting = ", ".join(f"{k} {v}" for k, v in summary["fingerprint"].items() if v is not None)
    lines = ["# MMEB-V2", "", setting, "", "Scores x 100; `a (n/N)`: mean over the n of N tasks that finished.", ""]
    if both:
        lines[-1:] = [" ".join(["Scored both ways (docs/mmeb.md, \"Scoring: correct vs vlm2vec\"): `correct` (the",
                                "default) and `vlm2vec` (VLM2Vec's procedure, comparable with its leaderboard)."]), ""]
    header, rows = ["scoring"] if both else [], []
    for name, one in aggregates.items():
        row = ([name] if both else []) + [_cell(one["overall"])]
        for modality, categories in CATEGORIES.items():
            if modality not in one["modalities"]:
                continue
            for category in categories:
                if f"{modality}:{category}" in one["categories"]:
                    row.append(_cell(one["categories"][f"{modality}:{category}"]))
            row.append(_cell(one["modalities"][modality]))
        rows.append(row)
    header.append("Overall")
    for modality, categories in CATEGORIES.items():
        if modality in agg["modalities"]:
            header += [f"{modality} {category}" for category in categories if f"{modality}:{category}" in agg["categories"]]
            header.append(f"{modality} overall")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows), ""]
    names = list(aggregates)
    columns = ["category", "task", "metric", *(names if both else ["score"]), *(["vlm2vec - correct"] if both else []),
               "queries"]
    for modality in agg["modalities"]:
        lines += [f"## {modality}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for task in (t for t in selected if t.modality == modality):
            r = results[task.name]
            values = [task_score(r, name if both else None) for name in names]
            cells = [f"{100 * v:.1f}" if v is not None else r["status"].upper() for v in values]
            if both:
                cells.append(f"{100 * (values[1] - values[0]):+.1f}" if None not in values else "-")
            lines.append(f"| {task.category} | {task.name} | {task.metric} | {' | '.join(cells)} | {r.get('num_pred', '')} |")
        lines.append("")
    notes = [f"- {r['task']}: {note}" for r in results.values() if r["status"] == "done" for note in r.get("notes", [])]
    if notes:
        lines += ["## Notes (where a task's setup differs from VLM2Vec's run)", "", *notes, ""]
    problems = [r for r in results.values() if r["status"] != "done"]
    if problems:
        lines += ["## Not scored (left out of every mean)" if not both else
                  "## Not scored (left out of the correct means; a vlm2vec number is in the vlm2vec means)", ""]
        for r in problems:
            kept = [f"{name} {100 * v:.1f}" for name, v in (r.get("scores") or {}).items() if v is not None]
            lines.append(f"- {r['task']} ({r['status']}): {r['reason']}" + (f" ({', '.join(kept)})" if kept else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m tte_flash.mmeb --scoring {correct,vlm2vec,both} --model M --data_root DIR --output OUT [...]``:
    the MMEB-V2 run of ``python -m tte_flash.evaluate --benchmark mmeb-v2`` (every other option is its) scored
    the chosen way (docs/mmeb.md, "Scoring: correct vs vlm2vec"); ``--write_labels VLM2VEC_FILE --data_root
    DIR``: the class lists of the video classification tasks (see :func:`write_label_lists`)."""
    import argparse
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m tte_flash.mmeb",
        description="MMEB-V2 scored the chosen way: --scoring plus the options of python -m tte_flash.evaluate "
                    "--benchmark mmeb-v2 (--model, --data_root, --output, --tasks, ...); or --write_labels.",
        epilog="Any other option is passed to python -m tte_flash.evaluate --benchmark mmeb-v2 (see its --help).")
    parser.add_argument("--scoring", choices=(*SCORINGS, "both"), default="correct",
                        help="correct (default): graded qrels as given, pessimistic ties, a positive that is not a "
                             "listed candidate fails the task; vlm2vec: VLM2Vec's procedure, comparable with its leaderboard; "
                             "both: the two side by side in the summary")
    parser.add_argument("--prompts", choices=PROMPTS, default="tte",
                        help="tte (default): an image task's instruction and text joined by one space, as TTE-Flash "
                             "trains; vlm2vec: joined as VLM2Vec's parsers join them for Qwen2-VL (image token first, "
                             "QA/VG instructions on a new line, trailing newlines), for leaderboard comparisons")
    parser.add_argument("--write_labels", "--write-labels", default=None, metavar="VLM2VEC_FILE",
                        help="write labels.txt from VLM2Vec's src/data/eval_dataset/video_classification_utils.py")
    parser.add_argument("--data_root", "--data-root", default=None)
    parser.add_argument("--overwrite", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.data_root is None:
        parser.error("--data_root is required")
    if args.write_labels is None:  # an evaluation, by tte_flash.evaluate with this scoring
        if any(a == "--benchmark" or a.startswith("--benchmark=") for a in rest):
            parser.error("--benchmark is implied (mmeb-v2)")
        from . import evaluate
        token, prompts_token = _SCORING.set(args.scoring), _PROMPTS.set(args.prompts)
        try:
            return evaluate.main(["--benchmark", "mmeb-v2", "--data_root", args.data_root, *rest,
                                  *(["--overwrite"] if args.overwrite else [])])
        finally:
            _SCORING.reset(token)
            _PROMPTS.reset(prompts_token)
    if rest:
        parser.error(f"unrecognized arguments with --write_labels: {' '.join(rest)}")
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
