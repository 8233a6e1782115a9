"""Training rows checked before the first step (issue 18): a bad row fails the run at the start, named by
file, line (or row) and column, instead of crashing it mid-run after a checkpoint.

:func:`validate_rows` checks every row of a training set:

* every column of the MMEB-train layout has its type (``qry``/``pos_text``/``qry_cot``: text; ``*_path``:
  a path; ``neg_*``: one value or a list of them), so ``qry=123`` or ``qry_cot=5`` is an error, not a crash
  or a silently dropped trace;
* the query and the positive target are not empty, hard-negative lists agree in length, and every media
  path exists (``tte_flash.data.train_example``, the function the dataset uses);
* every image is opened: its header (a 0x0 image is an error) and, cheaply, its end: PNG chunks are read
  to the end (``Image.verify``: CRCs, no decoding), a JPEG must end with its end-of-image marker. Each
  distinct file is checked once, on a few threads (the work is I/O). ``decode=True`` decodes every image
  instead (slower; catches a corrupt middle too). A folder of video frames must hold frames, a video file
  must not be empty;
* ``needs_trace``: every row has a ``qry_cot`` trace.

All problems are collected; the error lists the first :data:`SHOWN` of them and counts the rest.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from .data import train_example
from .media import IMAGE_EXTENSIONS

logger = logging.getLogger("tte_flash.train")

TEXT_COLUMNS = ("qry", "pos_text", "qry_cot")
PATH_COLUMNS = ("qry_image_path", "qry_video_path", "pos_image_path", "pos_video_path")
LIST_COLUMNS = ("neg_text", "neg_image_path", "neg_video_path")
# where each input of train_example's output comes from: (example key, media key) -> column
MEDIA_COLUMNS = {("query", "image"): "qry_image_path", ("query", "video"): "qry_video_path",
                 ("positive", "image"): "pos_image_path", ("positive", "video"): "pos_video_path",
                 ("negatives", "image"): "neg_image_path", ("negatives", "video"): "neg_video_path"}
SHOWN = 10  # problems listed in the error
JPEG_TAIL = 64 * 1024  # bytes at the end of a JPEG searched for its end-of-image marker


class TrainingDataError(ValueError):
    """Training rows that cannot be trained on, each named by file, line (or row) and column."""


class RowLocator:
    """Names rows loaded from several files: ``locate(i)`` is ``"train.jsonl line 201"`` for the i-th row
    of the data set (0-based). JSONL lines are counted as the reader does (blank lines skipped); a JSON array
    or a Parquet file is named by row."""

    def __init__(self):
        self.files: list[tuple[str, int]] = []  # (path, index of its first row)
        self._lines: dict[str, list[int] | None] = {}

    def add(self, path, start: int) -> None:
        """Rows from ``start`` on (until the next file's start) come from ``path``."""
        self.files.append((os.fspath(path), start))

    def locate(self, index: int) -> str:
        path, start = next((p, s) for p, s in reversed(self.files) if s <= index)
        number = index - start + 1
        lines = self._line_numbers(path)
        if lines is None or number > len(lines):
            return f"{path} row {number}"
        return f"{path} line {lines[number - 1]}"

    def _line_numbers(self, path: str) -> list[int] | None:
        """The line of each row of a JSONL file (read once, only when an error is reported)."""
        if path not in self._lines:
            lines = None
            if Path(path).suffix.lower() in (".jsonl", ".json"):
                with open(path, "rb") as handle:
                    numbered = [n for n, line in enumerate(handle, 1) if line.strip()]
                with open(path, "rb") as handle:
                    head = handle.read(4096).lstrip().lstrip(b"\xef\xbb\xbf").lstrip()
                lines = None if path.lower().endswith(".json") and head.startswith(b"[") else numbered
            self._lines[path] = lines
        return self._lines[path]


class RowName:
    """The name of one row (:meth:`RowLocator.locate`), worked out only when it is printed: a data set's
    items carry one, and the file is read for line numbers only if an error names the row."""
    __slots__ = ("locate", "index")

    def __init__(self, locate, index: int):
        self.locate, self.index = locate, index

    def __str__(self) -> str:
        return self.locate(self.index)


def column_problems(row: dict) -> list[tuple[str, str]]:
    """(column, problem) for each column of ``row`` whose value has the wrong type, and for an empty query
    or positive target."""
    problems = []

    def describe(value) -> str:
        return f"{type(value).__name__} {value!r:.60}"
    for column in TEXT_COLUMNS + PATH_COLUMNS:
        value = row.get(column)
        if value is not None and not isinstance(value, str):
            kind = "text (a str)" if column in TEXT_COLUMNS else "a path (a str)"
            problems.append((column, f"must be {kind} or empty, got {describe(value)}"))
    for column in LIST_COLUMNS:
        value = row.get(column)
        items = value if isinstance(value, (list, tuple)) else [value]
        bad = [(i, v) for i, v in enumerate(items) if v is not None and not isinstance(v, str)]
        if bad:
            where = f" (element {bad[0][0]})" if isinstance(value, (list, tuple)) else ""
            problems.append((column, f"must be a str, a list of str, or empty, got {describe(bad[0][1])}{where}"))
    for role, columns in (("query", ("qry", "qry_image_path", "qry_video_path")),
                          ("positive target", ("pos_text", "pos_image_path", "pos_video_path"))):
        if not any(isinstance(row.get(c), str) and row[c].strip() for c in columns) and \
                not any(c == p for c in columns for p, _ in problems):
            problems.append((columns[0], f"the {role} is empty: {', '.join(columns)} hold no text, image or video"))
    return problems


def _column_in(row: dict, message: str) -> str | None:
    """The first column named in ``message``, or whose (non-empty) value it quotes (a missing file)."""
    columns = TEXT_COLUMNS + PATH_COLUMNS + LIST_COLUMNS
    named = [c for c in columns if f"'{c}'" in message]
    if named:
        return named[0]
    for column in PATH_COLUMNS + LIST_COLUMNS[1:]:
        value = row.get(column)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and item.strip() and item in message:
                return column
    return None


def media_of(example: dict):
    """(column, path) of each image/video path in a ``train_example`` output."""
    inputs = [("query", example["query"]), ("positive", example["positive"])]
    inputs += [("negatives", item) for item in example["negatives"]]
    for role, item in inputs:
        for key in ("image", "video"):
            if isinstance(item.get(key), str):
                yield MEDIA_COLUMNS[role, key], key, item[key]


def image_problem(path: str, decode: bool = False) -> str | None:
    """Why the image file at ``path`` cannot be trained on, or None: header, size, and (cheaply) its end;
    ``decode``: every pixel."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            fmt = img.format
            if decode:
                img.load()
            else:
                img.verify()  # PNG: every chunk to the end, CRCs checked (no decompression); others: the header
    except Exception as err:  # PIL raises many types for unreadable files
        return f"cannot be read as an image ({type(err).__name__}: {err})"
    if not width or not height:
        return f"is {width}x{height} pixels (empty)"
    if fmt == "JPEG" and not decode:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - JPEG_TAIL))
            if b"\xff\xd9" not in handle.read():
                return "is truncated (the JPEG has no end-of-image marker)"
    return None


def video_problem(path: str) -> str | None:
    """Why a video path cannot be trained on (a frames folder without frames, an empty file), or None."""
    if os.path.isdir(path):
        if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in Path(path).iterdir()):
            return f"is a folder without frames (no {'/'.join(IMAGE_EXTENSIONS)} files)"
    elif os.path.getsize(path) == 0:
        return "is an empty file (0 bytes)"
    return None


def validate_rows(rows: list[dict], locate, image_root, *, decode: bool = False, needs_trace: str | None = None,
                  workers: int = 8, allow_outside_root: bool = False) -> None:
    """Check every training row (see the module docstring); :class:`TrainingDataError` lists the problems,
    each as ``"<file> line <n>, column '<col>': <problem>"``. ``locate(i)`` names the i-th row.
    ``needs_trace``: the option that needs a ``qry_cot`` trace in every row (None: traces are optional)."""
    start = time.perf_counter()
    problems: list[tuple[int, str | None, str]] = []  # (row index, column, problem)
    media: dict[tuple[str, str], tuple[int, str]] = {}  # (kind, path) -> first (row, column) that uses it
    for index, row in enumerate(rows):
        found = column_problems(row)
        problems += [(index, column, problem) for column, problem in found]
        if found:
            continue
        try:
            example = train_example(row, image_root, allow_outside_root)
        except (ValueError, OSError, TypeError) as err:  # ragged negatives, a missing file, a path outside the root
            problems.append((index, _column_in(row, str(err)), str(err)))
            continue
        if needs_trace and example["cot"] is None:
            problems.append((index, "qry_cot", f"no reasoning trace, and {needs_trace} needs one in every row"))
        for column, kind, path in media_of(example):
            media.setdefault((kind, path), (index, column))

    def check(key):
        kind, path = key
        return image_problem(path, decode) if kind == "image" else video_problem(path)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for key, problem in zip(media, pool.map(check, media)):
            if problem is not None:
                index, column = media[key]
                problems.append((index, column, f"{key[0]} {key[1]} {problem}"))
    if problems:
        problems.sort(key=lambda p: p[0])
        lines = [f"{locate(index)}{f', column {column!r}' if column else ''}: {problem}"
                 for index, column, problem in problems[:SHOWN]]
        rows_bad = len({index for index, _, _ in problems})
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise TrainingDataError(f"{len(problems)} problem{'s' * (len(problems) > 1)} in {rows_bad} of {len(rows)} "
                                "training rows (nothing was trained; fix or drop these rows):\n  "
                                + "\n  ".join(lines) + more)
    logger.info("checked %d training rows and %d media files in %.1fs", len(rows), len(media),
                time.perf_counter() - start)
