"""MMEB-eval protocol: rank each row's candidates by similarity to its query; Hit@1 and NDCG@5.

    python -m tte_flash.evaluate --model runs/tiny --data data/eval.jsonl --image_root data \\
        --think_tokens 0 4 16 --output results.json [--mode explicit-cot --max_cot_tokens 128]
    python -m tte_flash.evaluate --benchmark mmeb-v2 --model runs/tiny --data_root MMEB_V2 --output DIR

The second form runs the 78 MMEB-V2 tasks of a local copy (:mod:`tte_flash.mmeb`, docs/mmeb.md); the
rest of this page is about the first, one file of MMEB-eval rows.

Each row (``qry_text``, ``qry_img_path``, ``tgt_text``, ``tgt_img_path``; positive first) gives one
query, encoded with ``think_tokens`` K (``mode="latent"``) or through a generated trace
(``mode="explicit-cot"``), and its candidates, encoded as documents. Identical candidates across rows
are encoded once, and once for all (mode, K) runs. Relevance is binary, the positive in column 0.

**Ties are broken pessimistically**: the positive ranks below every candidate with an equal score,
so a model that gives all candidates one score gets Hit@1 = 0, not 1 (``ties="expected"`` gives the
mean over random tie orders; the shortcut baselines use it, so they are never understated). VLM2Vec's
``argmax`` instead credits the positive on an exact tie (it is candidate 0); scores can differ only there.
NDCG@k with one relevant candidate at rank r is ``1/log2(r + 1)`` if r <= k else 0 (IDCG = 1).
**NaN or inf is an error, never a rank** (:func:`tte_flash.ranking.check_finite`): a checkpoint with non-finite
weights is refused when it loads, and a NaN or inf embedding or score stops the run with a message naming the
inputs or rows (the CLI: exit status 2).

The output JSON is ``{"runs": [{dataset, mode, think_tokens, metrics: {"hit@1", "ndcg@5"}, shortcut_best,
...}], "shortcuts": {...}, ...}``, the form ``tte_flash.card`` reads. Shortcut baselines
(:func:`tte_flash.synthetic.shortcut_metrics`: answer priors, query-mention and colour rules) are
reported beside every score; the rules live with the synthetic data, not here.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from .data import EVAL_COLUMNS, eval_example, load_rows
from .ranking import (TIES, NonFiniteScoresError, check_finite, hit_at_k, ndcg_at_k,  # noqa: F401
                      nonfinite_context, pad_scores, ranks)  # (re-exported: evaluate's metrics)

logger = logging.getLogger("tte_flash.evaluate")


MODES = ("latent", "explicit-cot")
BENCHMARKS = ("mmeb-file", "mmeb-v2")


# ---------------------------------------------------------------------------------------- evaluation

def evaluate(model, rows_or_path, image_root=None, think_tokens=0, mode: str = "latent", max_cot_tokens: int = 128,
             batch_size: int = 32, shortcut: bool = True, dataset: str | None = None, limit: int | None = None,
             show_progress_bar: bool | None = None, allow_outside_image_root: bool = False) -> dict:
    """Evaluate one (mode, K) on MMEB-eval rows (a list, or a JSONL/Parquet path).

    ``image_root`` defaults to the data file's folder (for rows: paths are used as they are); media paths
    outside it are an error unless ``allow_outside_image_root``.
    Returns ``{dataset, mode, think_tokens, n, metrics: {"hit@1", "ndcg@5"}, seconds,
    queries_per_second, ...}`` plus ``shortcuts`` / ``shortcut_best`` when ``shortcut``.
    """
    result = evaluate_many(model, rows_or_path, image_root, think_tokens=[think_tokens], modes=[mode],
                           max_cot_tokens=max_cot_tokens, batch_size=batch_size, shortcut=shortcut, dataset=dataset,
                           limit=limit, show_progress_bar=show_progress_bar,
                           allow_outside_image_root=allow_outside_image_root)
    return {**result["runs"][0], **({"shortcuts": result["shortcuts"]} if "shortcuts" in result else {})}


def evaluate_many(model, rows_or_path, image_root=None, think_tokens=(0,), modes=("latent",),
                  max_cot_tokens: int = 128, batch_size: int = 32, shortcut: bool = True,
                  dataset: str | None = None, limit: int | None = None, show_progress_bar: bool | None = None,
                  reasoner=None, allow_outside_image_root: bool = False) -> dict:
    """Every (mode, K) in ``modes`` x ``think_tokens`` on the same rows; candidates are encoded once.

    ``reasoner``: the model that generates the traces of ``explicit-cot`` runs (default: ``model``).

    Returns ``{dataset, n, n_documents, document_seconds, shortcuts, shortcut_best, runs: [...]}``.
    """
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    rows, image_root, dataset = _load(rows_or_path, image_root, dataset)
    rows = rows[:limit] if limit else rows
    queries, documents, index = _inputs(rows, image_root, allow_outside_image_root)
    start = time.perf_counter()
    with nonfinite_context("encoding the candidates (input i: the i-th unique candidate)"):
        doc_emb = model.encode_document(documents, batch_size=batch_size, convert_to_tensor=True,
                                        show_progress_bar=show_progress_bar)
    document_seconds = time.perf_counter() - start
    out = {"dataset": dataset, "n": len(rows), "n_documents": len(documents),
           "document_seconds": round(document_seconds, 4)}
    if shortcut:  # the rules live with the synthetic data (tte_flash.synthetic); the evaluator only reports them
        from .synthetic import shortcut_summary
        out.update(shortcut_summary(rows, image_root))
    chance = float(sum(1 / int((i >= 0).sum()) for i in index) / len(index))
    runs = []
    for mode in modes:
        for k in think_tokens:
            start = time.perf_counter()
            extra = {"reasoner": reasoner} if mode == "explicit-cot" and reasoner is not None else {}
            with nonfinite_context(f"encoding the queries ({mode}, K={k}; input i: evaluation row i + 1)"):
                q_emb = model.encode_query(queries, think_tokens=k, mode=mode, max_cot_tokens=max_cot_tokens,
                                           batch_size=batch_size, convert_to_tensor=True, **extra,
                                           show_progress_bar=show_progress_bar)
            query_seconds = time.perf_counter() - start
            scores = candidate_scores(model.similarity(q_emb, doc_emb), index)
            check_finite(scores, f"scores ({mode}, K={k})", names=range(1, len(rows) + 1), label="evaluation row",
                         padding=True)  # NaN or inf is an error naming the rows, never a rank
            run = {"dataset": dataset, "mode": mode, "think_tokens": k, "n": len(rows),
                   "metrics": {"hit@1": hit_at_k(scores, 1), "ndcg@5": ndcg_at_k(scores, 5)},
                   "chance": {"hit@1": chance}, "seconds": round(query_seconds + document_seconds, 4),
                   "query_seconds": round(query_seconds, 4),
                   "queries_per_second": round(len(rows) / max(query_seconds, 1e-9), 2)}
            if mode == "explicit-cot":
                run["max_cot_tokens"] = max_cot_tokens
            if shortcut:
                run["shortcut_best"], run["shortcut_best_name"] = out["shortcut_best"], out["shortcut_best_name"]
            runs.append(run)
    out["runs"] = runs
    return out


def embedding_spread(model, queries, documents, think_tokens: int = 0) -> dict:
    """Mean cosine between different queries, between different documents, and between queries and
    documents. All three near 1 means the embedder has collapsed (every input maps to one vector)."""
    q = model.encode_query(queries, think_tokens=think_tokens, convert_to_tensor=True, normalize_embeddings=True)
    d = model.encode_document(documents, convert_to_tensor=True, normalize_embeddings=True)

    def off_diagonal_mean(sim):
        return float((sim.sum() - sim.diagonal().sum()) / max(sim.numel() - len(sim), 1))
    return {"query_query": off_diagonal_mean(q @ q.T), "doc_doc": off_diagonal_mean(d @ d.T),
            "query_doc": float((q @ d.T).mean())}


def candidate_scores(similarity: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[n_queries, n_candidates] scores from a query x unique-document similarity matrix and each
    row's document indices (-1: padding, scored -inf)."""
    scores = similarity.gather(1, index.clamp(min=0)).double()
    return scores.masked_fill(index < 0, float("-inf"))


def _load(rows_or_path, image_root, dataset):
    if isinstance(rows_or_path, (str, os.PathLike)):
        path = Path(rows_or_path)
        rows = load_rows(path, EVAL_COLUMNS)
        image_root = path.parent if image_root is None else image_root
        if dataset is None:
            meta = path.parent / "meta.json"
            name = json.loads(meta.read_text()).get("name") if meta.is_file() else None
            dataset = name or path.stem
        return rows, image_root, dataset
    rows = list(rows_or_path)
    if not rows:
        raise ValueError("no evaluation rows")
    missing = [c for c in EVAL_COLUMNS[::2] if c not in rows[0]]
    if missing:
        raise ValueError(f"evaluation rows need columns {EVAL_COLUMNS}; the first row lacks {missing}")
    return rows, image_root, dataset or "eval"


def _inputs(rows, image_root, allow_outside_root: bool = False):
    """Query inputs, unique candidate inputs, and a [n_rows, max_candidates] index into them (-1 pads)."""
    queries, documents, keys, per_row = [], [], {}, []
    for number, row in enumerate(rows, 1):
        try:
            query, candidates = eval_example(row, image_root, allow_outside_root)
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"evaluation row {number}: {err}") from None
        queries.append(query)
        ids = []
        for item in candidates:
            key = json.dumps(item, sort_keys=True)
            if key not in keys:
                keys[key] = len(documents)
                documents.append(item)
            ids.append(keys[key])
        per_row.append(ids)
    width = max(len(ids) for ids in per_row)
    index = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, ids in enumerate(per_row):
        index[i, :len(ids)] = torch.tensor(ids)
    return queries, documents, index


# ---------------------------------------------------------------------------------------- CLI

def load_model(name: str, device=None):
    """A preset (``tiny``, ``qwen2-vl-2b``: random init; ``tiny-instruct``: pretrained), a TTE-Flash
    checkpoint directory / Hub id, or a Qwen2-VL backbone directory (through ``from_backbone``)."""
    from .loading import read_local_config
    from .modeling import TTEFlashModel, available_presets
    config_path = Path(name) / "config.json"
    if name in available_presets():
        model = TTEFlashModel.from_preset(name)
        if not getattr(model.config, "backbone_name_or_path", None):
            logger.warning("preset %r has random weights: its embeddings and traces mean nothing. Pass a trained "
                           "checkpoint (a training/train.py output directory or a Hub id) as --model.", name)
    elif config_path.is_file() and read_local_config(name).get("model_type") == "qwen2_vl":
        model = TTEFlashModel.from_backbone(name)
    else:
        model = TTEFlashModel.from_pretrained(name)
    check_weights(model, name)
    return model.to(device) if device else model


def check_weights(model, name: str = "the model") -> None:
    """:class:`NonFiniteScoresError` if a weight of ``model`` is NaN or inf (naming the tensors): such a
    checkpoint gives NaN embeddings, which must never be scored. One ``isfinite().all()`` per tensor."""
    with torch.no_grad():
        bad = [pname for pname, tensor in model.state_dict().items()
               if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        total = len(model.state_dict())
        shown = ", ".join(bad[:5]) + (f", and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteScoresError(f"{name}: {len(bad)} of {total} weight tensors hold NaN or inf values ({shown}): "
                                   "a diverged training run or a corrupted checkpoint; its embeddings and scores "
                                   "would be NaN, so it is not evaluated", names=bad)


def _think_budget(value: str):
    return value if value == "auto" else int(value)


def format_table(result: dict) -> str:
    """The runs (one line per mode and K) and the shortcut baselines, as a text table."""
    lines = [f"{result['dataset']}: {result['n']} queries, {result['n_documents']} unique candidates",
             f"{'mode':18s} {'K':>5s} {'hit@1':>7s} {'ndcg@5':>7s} {'queries/s':>10s} {'ms/query':>9s}"]
    for run in result["runs"]:
        m, rate = run["metrics"], run["queries_per_second"]
        lines.append(f"{run['mode']:18s} {str(run['think_tokens']):>5s} {m['hit@1']:7.4f} {m['ndcg@5']:7.4f} "
                     f"{rate:10.1f} {1000 / rate if rate else float('inf'):9.2f}")
    if result["runs"]:
        lines.append(f"{'chance':24s} {result['runs'][0]['chance']['hit@1']:7.4f}")
    if result.get("shortcuts"):
        lines.append("no-reasoning shortcuts (ties broken at random):")
        for name, m in sorted(result["shortcuts"].items(), key=lambda kv: -kv[1]["hit@1"]):
            lines.append(f"  {name:22s} {m['hit@1']:7.4f} {m['ndcg@5']:7.4f}")
    return "\n".join(lines)


def _at_least_one(text: str) -> int:
    """argparse type: an integer >= 1 (0 or a negative count would silently change what is evaluated)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tte_flash.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a trained checkpoint directory or Hub id (or a preset: "
                                                        "random weights except tiny-instruct's backbone)")
    parser.add_argument("--benchmark", choices=BENCHMARKS, default="mmeb-file",
                        help="mmeb-file: one file of MMEB-eval rows (--data); mmeb-v2: every MMEB-V2 task of a local "
                             "copy (--data_root, --output; docs/mmeb.md)")
    parser.add_argument("--data", default=None, help="mmeb-file: MMEB-eval rows, JSONL or Parquet")
    parser.add_argument("--data_root", "--data-root", default=None,
                        help="mmeb-v2: the local MMEB-V2 copy (image-tasks/, video-tasks/, visdoc-tasks/)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="mmeb-v2: task names, modalities (image, video, visdoc) or modality:category "
                             "(e.g. video:QA); default all 78")
    parser.add_argument("--num_frames", "--num-frames", type=_at_least_one, default=8,
                        help="mmeb-v2: frames sampled per video (VLM2Vec: 8)")
    parser.add_argument("--overwrite", action="store_true",
                        help="mmeb-v2: recompute tasks whose score files hold another model's or setting's scores")
    parser.add_argument("--scoring", choices=("correct", "vlm2vec", "both"), default=None,
                        help="mmeb-v2: correct (default), vlm2vec (VLM2Vec's procedure, comparable with its "
                             "leaderboard) or both side by side (docs/mmeb.md, 'Scoring: correct vs vlm2vec')")
    parser.add_argument("--image_root", "--image-root", default=None, help="default: the data file's folder")
    parser.add_argument("--allow_outside_image_root", "--allow-outside-image-root", action="store_true",
                        help="mmeb-file: accept media paths outside --image_root (absolute paths, '..'); by default "
                             "they are an error")
    parser.add_argument("--think_tokens", "--think-tokens", nargs="+", type=_think_budget, default=None,
                        help="one or more budgets K (default: the model's default_think_tokens)")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=["latent"])
    parser.add_argument("--max_cot_tokens", "--max-cot-tokens", type=_at_least_one, default=128)
    parser.add_argument("--batch_size", "--batch-size", type=_at_least_one, default=32)
    parser.add_argument("--output", default=None, help="mmeb-file: write the results JSON here; mmeb-v2: the results "
                                                       "folder (per-task score files, summary.json, summary.md; "
                                                       "one k<K> sub-folder per K when several are given)")
    parser.add_argument("--dataset", default=None, help="name in the results (default: meta.json name or file stem)")
    parser.add_argument("--limit", type=_at_least_one, default=None, help="evaluate the first N rows only")
    parser.add_argument("--no_shortcut", "--no-shortcut", action="store_true", help="skip the shortcut baselines")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--reasoner", default=None,
                        help="explicit-cot: the model that writes the traces (a preset such as tiny-instruct, a "
                             "checkpoint or a Qwen2-VL backbone; default: --model itself)")
    args = parser.parse_args(argv)
    if args.benchmark == "mmeb-v2":
        return _main_mmeb_v2(args)
    if args.data is None:
        parser.error("--data is required (or pass --benchmark mmeb-v2 --data_root DIR)")
    if args.scoring not in (None, "correct"):
        parser.error("--scoring vlm2vec/both is for --benchmark mmeb-v2")
    try:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(args.model, device)
        budgets = args.think_tokens or [model.config.default_think_tokens]
        reasoner = load_model(args.reasoner, device) if args.reasoner else None
        result = evaluate_many(model, args.data, args.image_root, think_tokens=budgets, modes=args.mode,
                               max_cot_tokens=args.max_cot_tokens, batch_size=args.batch_size,
                               shortcut=not args.no_shortcut, dataset=args.dataset, limit=args.limit,
                               reasoner=reasoner, allow_outside_image_root=args.allow_outside_image_root)
    except (ValueError, OSError, ImportError) as err:  # OSError: a missing file, a full disk, a lock held
        print(f"tte_flash.evaluate: error: {err}", file=sys.stderr)
        return 2
    result = {"model": args.model, "data": str(args.data), "image_root": str(args.image_root or Path(args.data).parent),
              **result, "device": str(device), "versions": _versions()}
    print(format_table(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


def _main_mmeb_v2(args) -> int:
    from . import mmeb
    problems = [text for bad, text in (
        (args.data_root is None, "--data_root is required"), (args.output is None, "--output (a folder) is required"),
        (args.data is not None, "--data is for --benchmark mmeb-file; give the MMEB-V2 copy as --data_root"),
        (args.data_root is not None and not Path(args.data_root).is_dir(), f"--data_root {args.data_root} is not a folder"),
        (len(args.mode) > 1, "one --mode per run"),
        ("auto" in (args.think_tokens or []), "--think_tokens auto is not supported for mmeb-v2")) if bad]
    if problems:
        print(f"tte_flash.evaluate: error: --benchmark mmeb-v2: {'; '.join(problems)}", file=sys.stderr)
        return 2
    try:
        mmeb.select_tasks(args.tasks)  # a typo fails before the model loads
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(args.model, device)
        budgets = args.think_tokens or [model.config.default_think_tokens]
        think_tokens = budgets if len(budgets) > 1 else budgets[0]  # several: one results folder per K
        reasoner = load_model(args.reasoner, device) if args.reasoner else None
        fingerprint = {"model": args.model, "model_id": _model_id(args.model, model), "reasoner": args.reasoner}
        summary = mmeb.run_benchmark(model, args.data_root, args.output, tasks=args.tasks, fingerprint=fingerprint,
                                     overwrite=args.overwrite, think_tokens=think_tokens, mode=args.mode[0],
                                     max_cot_tokens=args.max_cot_tokens, batch_size=args.batch_size,
                                     num_frames=args.num_frames, limit=args.limit, reasoner=reasoner,
                                     scoring=args.scoring,
                                     progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (ValueError, OSError, ImportError) as err:  # OSError: a missing file, a full disk, a lock held
        print(f"tte_flash.evaluate: error: {err}", file=sys.stderr)
        return 2
    summaries = summary if isinstance(think_tokens, list) else {think_tokens: summary}
    for k, one in summaries.items():
        folder = mmeb.results_folder(args.output, k, isinstance(think_tokens, list))
        print((folder / "summary.md").read_text(encoding="utf-8"))
        print(f"wrote {folder / 'summary.json'} and per-task scores under {folder}/<modality>/")
    failed = any(r["status"] == "error" for one in summaries.values() for r in one["tasks"].values())
    return 1 if failed else 0


def _model_id(name: str, model) -> str:
    """A short hash of the model's config and a checksum of its weights (each tensor's sum and sum of
    squares): a resumed MMEB-V2 run reuses scores and embeddings only of the same model."""
    import hashlib
    parts = [json.dumps(model.config.to_dict(), sort_keys=True, default=str)]
    with torch.no_grad():
        for pname, param in model.state_dict().items():
            value = param.detach().double()
            parts.append(f"{pname}:{tuple(param.shape)}:{float(value.sum()):.10e}:{float((value * value).sum()):.10e}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _versions() -> dict:
    import transformers

    from . import __version__
    return {"tte_flash": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
