"""Data rows (DESIGN.md §7): MMEB-train / MMEB-eval rows from JSONL or Parquet, as model inputs.

Every JSONL/Parquet file of the package is read by :func:`iter_rows`, lazily (Parquet in pyarrow record
batches, JSONL line by line): training and evaluation rows (:func:`load_rows`, a list for random access),
MMEB-V2 files, ``tte-flash encode --input`` (:func:`iter_encode_inputs`) and the Ray Data path
(``tte_flash.distributed``, which parses JSONL lines with :func:`json_values`).

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
from typing import Iterator

TRAIN_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
# Parquet rows turned into Python objects at a time: pyarrow decodes one row group's column chunks, then
# hands out this many rows per batch, so memory is one row group's bytes, not the file's.
PARQUET_BATCH_ROWS = 256
# what ``encode`` reads from a row (tte_flash.processing.INPUT_KEYS, in a fixed order)
INPUT_COLUMNS = ("text", "image", "video", "instruction")


# ---------------------------------------------------------------------------------- the one reader

def file_format(path) -> str:
    """``"parquet"`` for ``.parquet``/``.pq``, ``"json"`` for ``.jsonl``/``.json``; ``ValueError`` otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in JSON_SUFFIXES:
        return "json"
    raise ValueError(f"unsupported data file {path}: expected .jsonl, .json or .parquet")


def iter_rows(path, columns=None, *, strings: bool = False, format: str | None = None) -> Iterator:
    """The rows of a JSONL, JSON-array or Parquet file as dicts, read lazily: the one reader of the package
    (training and evaluation rows, ``tte-flash encode --input``, MMEB-V2 files, the Ray Data path).

    * JSONL: one JSON object a line, blank lines skipped, read line by line; a ``.json`` file whose first
      character is ``[`` is one array of rows (parsed whole).
    * Parquet: pyarrow record batches of ``PARQUET_BATCH_ROWS`` rows (``ParquetFile.iter_batches``), so
      memory holds one row group, whatever the file's size.

    ``columns``: keep only these keys (Parquet reads only these columns; absent ones are left out, not
    an error). ``strings``: a JSONL line may also hold a JSON string, yielded as the str (the bare text
    inputs of ``tte-flash encode``). ``format``: ``"json"`` or ``"parquet"`` (default: by suffix).
    The file is checked (exists, format, Parquet footer) when this is called; a bad line or row raises
    ``ValueError`` naming the file and the line (``corpus.jsonl:8: not JSON (...)``) when it is reached.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    kind = format or file_format(path)
    if kind == "parquet":
        return _parquet_rows(path, open_parquet(path), columns)
    if kind != "json":
        raise ValueError(f"format must be 'json' or 'parquet', got {kind!r}")
    return _json_rows(path, columns, strings)


def _json_rows(path: Path, columns, strings: bool) -> Iterator:
    with open(path, "rb") as handle:
        for where, number, value, error in json_values(handle, path):
            if error is not None:
                raise ValueError(error)
            if isinstance(value, dict):
                yield value if columns is None else {c: value[c] for c in columns if c in value}
            elif strings and isinstance(value, str):
                yield value
            else:
                wanted = "an object (a row) or a string" if strings else "an object (a row)"
                raise ValueError(f"{path}: {where} {number} is a JSON {type(value).__name__}, not {wanted}")


def json_values(handle, name) -> Iterator[tuple[str, int, object, str | None]]:
    """``(where, number, value, error)`` for each value of a binary file handle holding JSONL (``where`` is
    ``"line"``, blank lines skipped) or, when ``name`` ends in ``.json`` and the text starts with ``[``, one
    array (``"row"``). A line that is not UTF-8 or not JSON gives ``value=None`` and ``error``, a message
    naming ``name`` and the line, and reading goes on; :func:`iter_rows` raises it. Any object with
    ``readline``/``read`` works (an open file, a pyarrow ``NativeFile`` of a remote file system)."""
    number, first = 1, handle.readline()
    while first and not first.strip():  # leading blank lines
        number, first = number + 1, handle.readline()
    if first.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
        first = first[3:]
    if str(name).lower().endswith(".json") and first.lstrip().startswith(b"["):
        yield from _json_array(first + handle.read(), name, number)
        return
    line = first
    while line:
        if line.strip():
            yield ("line", number, *_parse_line(line, name, number))
        number, line = number + 1, handle.readline()


def _parse_line(line: bytes, name, number: int) -> tuple[object, str | None]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"{name}:{number}: not UTF-8 text (byte 0x{line[err.start]:02x} at column {err.start + 1})"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, f"{name}:{number}: not JSON ({err.msg}, column {err.colno})"


def _json_array(data: bytes, name, first_line: int):
    try:
        rows = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        yield "row", 1, None, f"{name}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        return
    except json.JSONDecodeError as err:
        yield "row", 1, None, f"{name}:{err.lineno + first_line - 1}: not JSON ({err.msg}, column {err.colno})"
        return
    for number, row in enumerate(rows if isinstance(rows, list) else [rows], 1):
        yield "row", number, row, None


def open_parquet(path):
    """A ``pyarrow.parquet.ParquetFile`` (only the footer is read); clear errors when pyarrow is missing or
    the file is not Parquet."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install 'tte-flash[parquet]' (or pip install pyarrow)"
                          ) from None
    try:
        return pq.ParquetFile(path)
    except (ValueError, OSError) as err:  # pyarrow.ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None


def parquet_columns(path) -> list[str]:
    """The column names of a Parquet file, from its footer (no rows are read)."""
    return list(open_parquet(path).schema_arrow.names)


def _parquet_rows(path: Path, parquet, columns) -> Iterator[dict]:
    names = parquet.schema_arrow.names
    wanted = None if columns is None else [c for c in columns if c in names]
    if wanted == []:  # none of the columns exist: empty rows, one per row of the file
        yield from ({} for _ in range(parquet.metadata.num_rows))
        return
    done = 0
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted)
    while True:
        try:
            batch = next(batches, None)
            rows = None if batch is None else batch.to_pylist()
        except (ValueError, OSError) as err:  # a corrupt page, bytes that are not UTF-8 in a string column
            raise ValueError(f"{path}: cannot read rows from row {done + 1} on ({err})") from None
        if rows is None:
            return
        done += len(rows)
        yield from rows


def parquet_input_columns(path) -> list[str]:
    """The columns of a Parquet file that ``encode`` reads (``text``/``image``/``video``/``instruction``);
    ``ValueError`` when it has no text, image or video column."""
    names = parquet_columns(path)
    columns = [c for c in INPUT_COLUMNS if c in names]
    if not set(columns) & {"text", "image", "video"}:
        raise ValueError(f"{path} has no text, image or video column (columns: {names})")
    return columns


def parquet_input(row: dict) -> dict:
    """A Parquet row (of :func:`parquet_input_columns`) as an ``encode`` input: empty (None) cells dropped; an
    image or video cell in Hugging Face ``datasets``' layout ``{"bytes": ..., "path": ...}`` becomes the image's
    bytes (else its path) or the video's path (else its bytes)."""
    item = {}
    for key, value in row.items():
        if isinstance(value, dict) and key in ("image", "video") and set(value) <= {"bytes", "path"}:
            first, second = ("bytes", "path") if key == "image" else ("path", "bytes")
            value = value.get(first) or value.get(second)
        if value is not None:
            item[key] = value
    return item


def iter_encode_inputs(path) -> Iterator:
    """What ``tte-flash encode --input FILE`` embeds, read lazily: a Parquet file's input columns
    (:func:`parquet_input`), otherwise JSONL lines that are strings or input dicts (any suffix but
    ``.json``, whose text may also be one array)."""
    path = Path(path)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        columns = parquet_input_columns(path) if path.is_file() else None
        return (parquet_input(row) for row in iter_rows(path, columns))
    return iter_rows(path, strings=True, format="json")


def load_rows(path, required_columns=(), columns=None) -> list[dict]:
    """All rows of a JSONL (``.jsonl``/``.json``, one object a line; a ``.json`` array also works) or
    Parquet file, as dicts (a list, for random access), read through :func:`iter_rows`; ``columns``: keep only
    these (Parquet reads only them). Raises ``FileNotFoundError`` / ``ValueError`` naming the file and the
    line or row at fault; a required column counts as missing only where the key is absent."""
    rows = list(iter_rows(path, columns))
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


def resolve_media(image_root, rel_path, allow_outside_root: bool = False) -> str | None:
    """``image_root / rel_path`` as a str, or None for no media (None or ""). The file (or frames
    folder) must exist: ``FileNotFoundError`` names the full path. With an ``image_root`` the path must stay
    inside it (``..`` parts and absolute paths included; ``ValueError`` naming the row's path and the root)
    unless ``allow_outside_root``; without one, paths are used as given."""
    if rel_path is None or (isinstance(rel_path, str) and not rel_path.strip()):
        return None
    full = os.path.join(os.fspath(image_root), os.fspath(rel_path)) if image_root else os.fspath(rel_path)
    if image_root and not allow_outside_root:
        _check_inside_root(image_root, rel_path, full)
    if not os.path.exists(full):
        root = f" (image_root={os.fspath(image_root)!r})" if image_root else " (no image_root given)"
        raise FileNotFoundError(f"media file not found: {full}{root}")
    return full


def _check_inside_root(image_root, rel_path, full: str) -> None:
    """``ValueError`` unless ``full`` lies inside ``image_root``: by its normalised path (``..`` parts, absolute
    paths) and, when the row's path has ``..`` parts, also with symlinks resolved (for the OS, ``link/..`` is
    the parent of the link's target). A symlinked folder inside the root is followed as usual."""
    root = os.path.abspath(os.fspath(image_root))

    def within(path: str, folder: str) -> bool:
        return os.path.commonpath([path, folder]) == folder
    inside = within(os.path.abspath(full), root)
    if inside and ".." in Path(os.fspath(rel_path)).parts:
        inside = within(os.path.realpath(full), os.path.realpath(root))
    if not inside:
        raise ValueError(f"media path {os.fspath(rel_path)!r} is outside the image root {root} (it resolves to "
                         f"{os.path.realpath(full)}); pass allow_outside_root=True (--allow_outside_image_root) "
                         "to allow paths outside the root")


def make_input(text, image_path=None, video_path=None, image_root=None, instruction=None,
               allow_outside_root: bool = False) -> dict:
    """A model input dict with only the keys present: ``text``, ``image`` / ``video`` (resolved paths,
    :func:`resolve_media`), ``instruction``. ``ValueError`` if nothing is left (no text, image or video)."""
    item = {}
    if instruction:
        item["instruction"] = instruction
    if isinstance(text, str) and text:
        item["text"] = text
    elif text is not None and not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}: {text!r}")
    for key, rel in (("image", image_path), ("video", video_path)):
        full = resolve_media(image_root, rel, allow_outside_root)
        if full is not None:
            item[key] = full
    if not any(k in item for k in ("text", "image", "video")):
        raise ValueError("empty input: no text, image or video")
    return item


def train_example(row: dict, image_root, allow_outside_root: bool = False) -> dict:
    """A training row as ``{"query", "positive", "negatives", "cot"}``: input dicts, a (possibly empty)
    list of hard-negative input dicts, and the trace (None when missing or blank). Media paths must stay
    inside ``image_root`` unless ``allow_outside_root`` (:func:`resolve_media`)."""
    outside = {"allow_outside_root": allow_outside_root}
    query = make_input(row.get("qry"), row.get("qry_image_path"), row.get("qry_video_path"), image_root, **outside)
    positive = make_input(row.get("pos_text"), row.get("pos_image_path"), row.get("pos_video_path"), image_root,
                          **outside)
    texts, images, videos = _aligned(row, ("neg_text", "neg_image_path", "neg_video_path"))
    negatives = [make_input(t, i, v, image_root, **outside) for t, i, v in zip(texts, images, videos) if t or i or v]
    cot = row.get("qry_cot")
    if cot is not None and not isinstance(cot, str):  # never silently dropped
        raise ValueError(f"column 'qry_cot' must be text (the reasoning trace) or empty, got {type(cot).__name__} "
                         f"{cot!r:.60}")
    cot = cot.strip() if cot is not None and cot.strip() else None
    return {"query": query, "positive": positive, "negatives": negatives, "cot": cot}


def eval_example(row: dict, image_root, allow_outside_root: bool = False) -> tuple[dict, list[dict]]:
    """An evaluation row as ``(query_input, [candidate inputs])``, the positive first; media paths inside
    ``image_root`` unless ``allow_outside_root`` (:func:`resolve_media`)."""
    outside = {"allow_outside_root": allow_outside_root}
    query = make_input(row.get("qry_text"), row.get("qry_img_path"), row.get("qry_video_path"), image_root, **outside)
    texts, images, videos = _aligned(row, ("tgt_text", "tgt_img_path", "tgt_video_path"))
    if not texts:
        raise ValueError("evaluation row has no candidates (tgt_text / tgt_img_path are empty)")
    candidates = [make_input(t, i, v, image_root, **outside) for t, i, v in zip(texts, images, videos)]
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
