"""Data rows (DESIGN.md §7): MMEB-train / MMEB-eval rows from JSONL or Parquet, as model inputs.

* Training rows: ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``; optional ``neg_text``,
  ``neg_image_path`` (a str or a list: one or several hard negatives), ``qry_cot`` (the reasoning
  trace; a row without one trains the contrastive loss only) and ``*_video_path`` columns.
* Evaluation rows: ``qry_text``, ``qry_img_path``, ``tgt_text`` (list), ``tgt_img_path`` (list, or one
  str for every candidate), positive first; optional ``qry_video_path`` / ``tgt_video_path``.

Media paths are relative to an image root; an empty string (or null) means no image. Texts are passed
unchanged: the processor handles MMEB's ``<|image_1|>`` placeholder. Images stay paths, loaded by the
processor; a missing file is reported here, with its full path, before any model work.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

TRAIN_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")


def load_rows(path, required_columns=()) -> list[dict]:
    """All rows of a JSONL (``.jsonl``/``.json``, one object a line; a ``.json`` array also works) or
    Parquet file, as dicts. Raises ``FileNotFoundError`` / ``ValueError`` naming the file and the line
    or row at fault; a required column counts as missing only where the key is absent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        rows = _read_json_rows(path)
    elif suffix in PARQUET_SUFFIXES:
        rows = _read_parquet_rows(path)
    else:
        raise ValueError(f"unsupported data file {path}: expected .jsonl, .json or .parquet")
    if not rows:
        raise ValueError(f"no rows in {path}")
    for number, row in enumerate(rows, 1):
        missing = [c for c in required_columns if c not in row]
        if missing:
            names = ", ".join(repr(c) for c in missing)
            raise ValueError(f"{path}: required column{'s' if len(missing) > 1 else ''} {names} "
                             f"{'are' if len(missing) > 1 else 'is'} missing (first in row {number}; that row "
                             f"has columns {sorted(row)})")
    return rows


def _read_json_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):  # one array of rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: bad JSON at line {err.lineno} ({err.msg})") from None
        numbered = list(enumerate(rows, 1))
        where = "row"
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: bad JSON on line {number} ({err.msg})") from None
        where = "line"
    for number, row in numbered:
        if not isinstance(row, dict):
            raise ValueError(f"{path}: {where} {number} is a JSON {type(row).__name__}, not an object (a row)")
    return [row for _, row in numbered]


def _read_parquet_rows(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow (or pip install 'tte-flash[train]')"
                          ) from None
    return pq.read_table(path).to_pylist()


def resolve_media(image_root, rel_path) -> str | None:
    """``image_root / rel_path`` as a str, or None for no media (None or ""). The file (or frames
    folder) must exist: ``FileNotFoundError`` names the full path."""
    if rel_path is None or (isinstance(rel_path, str) and not rel_path.strip()):
        return None
    full = os.path.join(os.fspath(image_root), os.fspath(rel_path)) if image_root else os.fspath(rel_path)
    if not os.path.exists(full):
        root = f" (image_root={os.fspath(image_root)!r})" if image_root else " (no image_root given)"
        raise FileNotFoundError(f"media file not found: {full}{root}")
    return full


def make_input(text, image_path=None, video_path=None, image_root=None, instruction=None) -> dict:
    """A model input dict with only the keys present: ``text``, ``image`` / ``video`` (resolved paths),
    ``instruction``. ``ValueError`` if nothing is left (no text, image or video)."""
    item = {}
    if instruction:
        item["instruction"] = instruction
    if isinstance(text, str) and text:
        item["text"] = text
    elif text is not None and not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}: {text!r}")
    for key, rel in (("image", image_path), ("video", video_path)):
        full = resolve_media(image_root, rel)
        if full is not None:
            item[key] = full
    if not any(k in item for k in ("text", "image", "video")):
        raise ValueError("empty input: no text, image or video")
    return item


def train_example(row: dict, image_root) -> dict:
    """A training row as ``{"query", "positive", "negatives", "cot"}``: input dicts, a (possibly empty)
    list of hard-negative input dicts, and the trace (None when missing or blank)."""
    query = make_input(row.get("qry"), row.get("qry_image_path"), row.get("qry_video_path"), image_root)
    positive = make_input(row.get("pos_text"), row.get("pos_image_path"), row.get("pos_video_path"), image_root)
    texts, images, videos = _aligned(row, ("neg_text", "neg_image_path", "neg_video_path"))
    negatives = [make_input(t, i, v, image_root) for t, i, v in zip(texts, images, videos) if t or i or v]
    cot = row.get("qry_cot")
    if cot is not None and not isinstance(cot, str):  # never silently dropped
        raise ValueError(f"column 'qry_cot' must be text (the reasoning trace) or empty, got {type(cot).__name__} "
                         f"{cot!r:.60}")
    cot = cot.strip() if cot is not None and cot.strip() else None
    return {"query": query, "positive": positive, "negatives": negatives, "cot": cot}


def eval_example(row: dict, image_root) -> tuple[dict, list[dict]]:
    """An evaluation row as ``(query_input, [candidate inputs])``, the positive first."""
    query = make_input(row.get("qry_text"), row.get("qry_img_path"), row.get("qry_video_path"), image_root)
    texts, images, videos = _aligned(row, ("tgt_text", "tgt_img_path", "tgt_video_path"))
    if not texts:
        raise ValueError("evaluation row has no candidates (tgt_text / tgt_img_path are empty)")
    candidates = [make_input(t, i, v, image_root) for t, i, v in zip(texts, images, videos)]
    return query, candidates


def _aligned(row: dict, columns: tuple[str, ...]) -> tuple[list, ...]:
    """Columns that each hold a str/None or a list, as equal-length lists (a str or an empty list is
    broadcast); ``ValueError`` when two lists disagree in length."""
    values = {}
    for column in columns:
        value = row.get(column)
        if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
            values[column] = None
        elif isinstance(value, (list, tuple)):
            values[column] = list(value)
        else:
            values[column] = [value]
    lengths = {c: len(v) for c, v in values.items() if v is not None and len(v) > 1}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"columns {sorted(lengths)} hold lists of different lengths {lengths}")
    n = max((len(v) for v in values.values() if v is not None), default=0)
    return tuple(v if v is not None and len(v) == n else (v or [None]) * n for v in values.values())
