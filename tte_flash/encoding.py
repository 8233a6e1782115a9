"""Encoding at scale: inputs streamed in windows, batched by a token budget, embeddings in shards on disk.

How :meth:`TTEFlashModel.encode` runs (``stream_embeddings``):

1. Inputs are read lazily (a list, any iterable or generator, a ``datasets.Dataset``) in windows of a few
   batches' worth of inputs; each input is checked (``normalize_input``) as it is read.
2. Each input's length is estimated without decoding pixels (``TTEProcessor.estimate_length``: the text is
   tokenised, an image's size read from its header and passed through Qwen2-VL's resize rule).
3. A window is sorted longest first and cut into batches of at most ``batch_size`` inputs and
   ``max_batch_tokens`` tokens (padded: inputs x longest; packed: the sum); an input over the budget on its
   own is a batch of one.
4. A batch is preprocessed (images decoded, resized, patched) just before its forward pass and dropped
   after it; embeddings are put back in input order.

So peak memory is one window of raw inputs plus one batch of tensors, whatever the corpus size;
batching never changes an embedding (``tests/test_encoding.py``).

:func:`encode_to_shards` writes embeddings to a directory of ``.npy`` shards with resume
(``tte-flash encode --input corpus.jsonl --output embs/``); :func:`read_shards` reads them back.
Layout of the directory:

* ``manifest.json``: the settings (model, role, think tokens, dim, shard size, ...) and, once some
  process has read the input to its end, ``total``, ``num_shards`` and per shard its row count and the
  SHA-256 of its inputs: the source of truth :func:`read_shards` checks every file against;
* ``shard-00000.npy`` (float32, ``(count, dim)``) and ``shard-00000.json`` (``start``, ``count``, the SHA-256
  of the inputs it holds, the SHA-256 of the ``.npy`` bytes and of the settings). Both are written to a
  temporary name and renamed when complete, the ``.json`` last: a shard counts as done only when its ``.json``
  exists and its ``.npy`` has the stated SHA-256 and shape. Resuming skips done shards (checking that their
  inputs are unchanged: their JSON form, and the size and mtime of the image and video files they name) and
  redoes the rest; a damaged one (zeroed, empty, replaced, foreign) with a warning naming it.
* ``part=(i, n)``: this process encodes shards ``i, i + n, ...`` only, so ``n`` processes (one per device)
  fill one directory without touching each other's files.
* ``.writer.lock`` (and ``.writer-part-i-of-n.lock`` for parts): the folder lock
  (:func:`tte_flash.writing.folder_lock`); a second writer gets an error naming the holder, never a mix.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .processing import INPUT_KEYS, normalize_input
from .writing import (atomic_write_bytes, folder_lock, is_writer_file, remove_lock_files, remove_stale_temporaries,
                      sha256_bytes, sha256_json)

DEFAULT_MAX_BATCH_TOKENS = 16384  # tokens per batch (padded: inputs x longest input; packed: the sum)
# Inputs read ahead from an iterable and sorted by length together: this many batches' worth, at least
# MIN_WINDOW (a list, already in the caller's memory, is sorted whole). Only the raw inputs of a window are held;
# a bigger window pads less: at the tiny preset, windows of 256 / 512 / 1024 inputs encode 424 / 431 / 453
# inputs/s against 447-471 for the whole list sorted at once, and peak memory grows 3-4 MiB per 1k inputs
# with 512 against 5-8 with 1024 (benchmarks/encode_memory.py).
WINDOW_BATCHES = 16
MIN_WINDOW = 512
MANIFEST = "manifest.json"
FORMAT = "tte-flash-embeddings/1"


def show_progress(flag: bool | None, n_batches: int) -> bool:
    """sentence-transformers' habit: no bar unless asked for, or the package logs at INFO or below."""
    if flag is not None:
        return flag
    return n_batches > 1 and logging.getLogger("tte_flash").getEffectiveLevel() <= logging.INFO


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl, Windows)
        return None


def release_freed_memory():
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere). Without it glibc keeps
    the pages a window's images and tensors used, and the process's peak resident size crept up window after
    window: +5.3 MiB per 1k inputs at the tiny preset against +2.2 with it (``benchmarks/encode_memory.py``,
    windows of 256 inputs)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# ---------------------------------------------------------------------------------- reading inputs

def _is_dataset(inputs) -> bool:
    return type(inputs).__module__.startswith("datasets.") and hasattr(inputs, "column_names")


def iter_inputs(inputs) -> Iterable:
    """The raw inputs of a list (as it is), an iterable or a ``datasets.Dataset`` (whose rows keep only the
    columns ``text``/``image``/``video``/``instruction``; ``None`` cells are dropped), read lazily."""
    if isinstance(inputs, (list, tuple)):
        return inputs  # in memory already: stream_embeddings sorts it whole
    if _is_dataset(inputs):
        if inputs.column_names is None:  # a streaming dataset that does not know its columns yet
            return ({k: v for k, v in row.items() if k in INPUT_KEYS and v is not None} for row in inputs)
        columns = [c for c in inputs.column_names if c in INPUT_KEYS]
        if not set(columns) & {"text", "image", "video"}:
            raise ValueError(f"the dataset has no text, image or video column (columns: {inputs.column_names}); "
                             "rename one with dataset.rename_column")
        return ({c: row[c] for c in columns if row[c] is not None} for row in inputs)
    try:
        return iter(inputs)
    except TypeError:
        raise ValueError(f"inputs must be one input or a list / iterable of inputs, got {type(inputs).__name__}") \
            from None


def read_windows(items: Iterable, window: int, instruction: str | None = None) -> Iterator[list[tuple[int, dict]]]:
    """Consecutive windows of ``(index, input dict)``, each input checked as it is read."""
    numbered = enumerate(items)
    while True:
        chunk = list(itertools.islice(numbered, window))
        if not chunk:
            return
        checked = [(i, normalize_input(x, i)) for i, x in chunk]
        if instruction is not None:
            checked = [(i, {**x, "instruction": instruction}) for i, x in checked]
        yield checked


# ---------------------------------------------------------------------------------- batching

def plan_batches(lengths: list[int], batch_size: int, max_batch_tokens: int | None, packed: bool) -> list[list[int]]:
    """Indices into ``lengths`` grouped longest first: each group has at most ``batch_size`` members and at
    most ``max_batch_tokens`` tokens (packed: the sum of lengths; padded: members x the longest); an input
    longer than the budget is a group of its own. Ties keep input order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current, longest, total = [], [], 0, 0
    for i in order:
        length = lengths[i]
        cost = total + length if packed else max(longest, length) * (len(current) + 1)
        if current and (len(current) == batch_size or (max_batch_tokens is not None and cost > max_batch_tokens)):
            batches.append(current)
            current, longest, total = [], 0, 0
        current.append(i)
        longest, total = max(longest, length), total + length
    if current:
        batches.append(current)
    return batches


def stream_embeddings(items: Iterable, *, estimate: Callable[[dict, int], int],
                      encode_batch: Callable[[list[tuple[int, dict]]], torch.Tensor], batch_size: int,
                      max_batch_tokens: int | None, packed: bool, instruction: str | None = None,
                      progress=None) -> Iterator[torch.Tensor]:
    """Embeddings of ``items`` window by window, in input order: ``(window, dim)`` float32 tensors.

    ``estimate(input, index)`` is an input's length in tokens (cheap, no pixels decoded);
    ``encode_batch([(index, input), ...])`` preprocesses and embeds one batch, returning ``(n, dim)``.
    A list or tuple is one window (its inputs are in memory already); other iterables are read
    ``max(MIN_WINDOW, WINDOW_BATCHES * batch_size)`` inputs at a time.
    """
    window = max(MIN_WINDOW, WINDOW_BATCHES * batch_size)
    if isinstance(items, (list, tuple)):
        window = max(window, len(items))
    for chunk in read_windows(items, window, instruction):
        lengths = [estimate(item, index) for index, item in chunk]
        out = None
        for batch in plan_batches(lengths, batch_size, max_batch_tokens, packed):
            vectors = encode_batch([chunk[i] for i in batch])
            out = vectors.new_empty(len(chunk), vectors.shape[1]) if out is None else out
            out[batch] = vectors
            if progress is not None:
                progress.update(len(batch))
        del chunk
        release_freed_memory()
        yield out


# ---------------------------------------------------------------------------------- shards on disk

log = logging.getLogger("tte_flash.encoding")
_SHARD_RE = re.compile(r"^shard-(\d+)\.(npy|json)$")


def _atomic_write_bytes(path: Path, write: Callable[[object], None] | bytes):
    atomic_write_bytes(path, write)


def _write_json(path: Path, data: dict):
    _atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def _shard_paths(output: Path, index: int) -> tuple[Path, Path]:
    return output / f"shard-{index:05d}.npy", output / f"shard-{index:05d}.json"


def _json_default(value):
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError


def _file_stamp(path: str | os.PathLike) -> list:
    """What identifies a local file's content cheaply: its size and modification time (a folder of frames: each
    file's). A URL or a missing path: the path alone (loading it fails or fetches it, as encoding does)."""
    try:
        if os.path.isdir(path):
            return [os.fspath(path), [(e.name, e.stat().st_size, e.stat().st_mtime_ns)
                                      for e in sorted(os.scandir(path), key=lambda e: e.name) if e.is_file()]]
        stat = os.stat(path)
        return [os.fspath(path), stat.st_size, stat.st_mtime_ns]
    except (OSError, ValueError):
        return [os.fspath(path)]


def _media_stamps(item) -> list:
    """Size and mtime of every local file an input reads (its image, video file or frames), so a shard's input
    hash changes when an image is replaced under the same path. Empty for text (the hash of a text-only input
    is its JSON form alone) and for inputs the encoder will refuse anyway."""
    try:
        checked = normalize_input(item)
    except (ValueError, TypeError):
        return []
    stamps = []
    for key in ("image", "video"):
        media = checked.get(key)
        for one in media if isinstance(media, (list, tuple)) else [media]:
            if isinstance(one, os.PathLike) or (isinstance(one, str) and not one.startswith(("http://", "https://"))):
                stamps.append(_file_stamp(one))
    return stamps


class _Fingerprinted:
    """Yields the items of an iterator, counting them and hashing their JSON form and the size and mtime of
    the local files they read (``sha256`` is None when some item has no JSON form, e.g. a PIL image: then a
    resumed shard's inputs cannot be checked)."""

    def __init__(self, items: Iterator):
        self.items, self.count, self._hash = items, 0, hashlib.sha256()

    def __iter__(self):
        for item in self.items:
            self.count += 1
            if self._hash is not None:
                try:
                    self._hash.update(json.dumps(item, sort_keys=True, default=_json_default).encode() + b"\n")
                    stamps = _media_stamps(item)
                    if stamps:
                        self._hash.update(json.dumps(stamps).encode() + b"\n")
                except TypeError:
                    self._hash = None
            yield item

    @property
    def sha256(self) -> str | None:
        return None if self._hash is None else self._hash.hexdigest()


_RECORD_KEYS = ("index", "start", "count", "sha256", "array_sha256", "settings_sha256")


def _shard_record(output: Path, index: int, settings_id: str) -> tuple[dict | None, str | None]:
    """A shard's ``.json`` record (``None`` when there is none) and what is wrong with it (``None``: nothing),
    without reading the array."""
    array_path, meta_path = _shard_paths(output, index)
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        return None, (f"{array_path.name} has no record {meta_path.name} (a write was interrupted)"
                      if array_path.exists() else None)
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        return None, f"{meta_path.name} is not a shard record tte-flash wrote ({type(err).__name__})"
    if not isinstance(meta, dict) or any(k not in meta for k in _RECORD_KEYS) or meta["index"] != index:
        return None, f"{meta_path.name} is not a shard record of this version of tte-flash (no content hash)"
    if meta["settings_sha256"] != settings_id:
        return None, f"{meta_path.name} was written by a run with other settings"
    return meta, None


def _npy_header(data: bytes) -> tuple[tuple, np.dtype]:
    """The shape and dtype an ``.npy`` file's header states (nothing else read)."""
    handle = io.BytesIO(data)
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(handle)
    return shape, dtype


def _load_shard(output: Path, index: int, dim: int, settings_id: str,
                load: bool = True) -> tuple[dict | None, np.ndarray | None, str | None]:
    """``(record, array, problem)`` of shard ``index``: the record (and with ``load`` its array) when the
    ``.npy`` bytes have the SHA-256 and the ``(count, dim)`` float32 shape the record states; else ``problem``
    says what is wrong (``None`` with no record and no array: the shard was never written)."""
    meta, problem = _shard_record(output, index, settings_id)
    if meta is None:
        return None, None, problem
    array_path = _shard_paths(output, index)[0]
    try:
        data = array_path.read_bytes()
    except OSError as err:
        return None, None, f"{array_path.name} cannot be read ({err.strerror or err})"
    if not data:
        return None, None, f"{array_path.name} is empty (0 bytes)"
    if sha256_bytes(data) != meta["array_sha256"]:
        return None, None, f"{array_path.name} does not match its record's SHA-256 (damaged or replaced)"
    try:
        shape, dtype = _npy_header(data)
    except (ValueError, EOFError) as err:
        return None, None, f"{array_path.name} is not an .npy array ({err})"
    if shape != (meta["count"], dim) or dtype != np.float32:
        return None, None, f"{array_path.name} holds {dtype} {shape}, not float32 ({meta['count']}, {dim})"
    return meta, np.load(io.BytesIO(data), allow_pickle=False) if load else None, None


def _write_shard(output: Path, index: int, start: int, vectors: np.ndarray, inputs_sha256: str | None,
                 settings_id: str):
    """The ``.npy`` then its ``.json`` record (with the array's SHA-256), each whole or not at all."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(vectors, dtype=np.float32))
    data = buffer.getvalue()
    array_path, meta_path = _shard_paths(output, index)
    meta_path.unlink(missing_ok=True)  # a record never describes another array, even after a crash in between
    _atomic_write_bytes(array_path, data)
    _write_json(meta_path, {"index": index, "start": start, "count": len(vectors), "sha256": inputs_sha256,
                            "array_sha256": sha256_bytes(data), "settings_sha256": settings_id})


def weights_fingerprint(model) -> str:
    """A short hash of the model's weights (64 evenly spaced values of every tensor, exact bytes): the same
    checkpoint on any device gives the same value; another checkpoint, or a random preset loaded again, not."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().flatten()
        sample = flat[::max(1, flat.numel() // 64)][:64].float().cpu().numpy()
        digest.update(f"{name}{tuple(tensor.shape)}".encode() + sample.tobytes())
    return digest.hexdigest()[:16]


class OtherSettingsError(ValueError):
    """The output folder holds embeddings made with other settings (``overwrite=True`` replaces them)."""


def _read_manifest(path: Path) -> dict | None:
    """The manifest at ``path`` when it is one tte-flash wrote (a dict with ``settings``), else None."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("settings"), dict) else None


def _refuse_foreign_folder(output: Path):
    """A folder that is not empty and has no manifest is someone else's: refused before anything is written."""
    if output.is_dir() and not (output / MANIFEST).exists() and \
            any(not is_writer_file(p.name) for p in output.iterdir()):
        raise ValueError(f"{output} is not empty and has no {MANIFEST}: not an embeddings directory; "
                         "choose an empty or new directory")


def _check_settings(output: Path, settings: dict, overwrite: bool):
    """Refuse a folder of other settings (or someone else's); with ``overwrite``, clear it. Called under the
    folder lock."""
    path = output / MANIFEST
    if path.exists():
        previous = _read_manifest(path)
        if previous is None and not overwrite:
            raise ValueError(f"{path} is not a manifest tte-flash wrote (unreadable JSON or other content); use "
                             "another --output directory or overwrite=True (--overwrite)")
        previous = (previous or {}).get("settings")
        if previous is not None and previous != settings and not overwrite:
            diff = ", ".join(f"{k}: {previous.get(k)!r} there, {v!r} now" for k, v in settings.items()
                             if previous.get(k) != v)
            raise OtherSettingsError(f"{output} holds embeddings made with other settings ({diff}); use another --output "
                             "directory or overwrite=True (--overwrite)")
        if overwrite:  # no other writer is active (folder_lock with overwrite holds the folder whole)
            for stale in itertools.chain(output.glob("shard-*.npy"), output.glob("shard-*.json"), [path]):
                stale.unlink(missing_ok=True)
            remove_stale_temporaries(output)
    else:
        _refuse_foreign_folder(output)


def _check_same_inputs(output: Path, index: int, start: int, shard: _Fingerprinted, meta: dict | None):
    if meta is None:
        return
    same_hash = None in (meta["sha256"], shard.sha256) or meta["sha256"] == shard.sha256
    if meta["count"] != shard.count or not same_hash:
        raise ValueError(f"{output}: shard {index} was made from other inputs than inputs {start}.."
                         f"{start + shard.count - 1} now; use another --output directory or --overwrite")


def _record_manifest(output: Path, settings: dict, total: int, shards: list[dict]) -> dict:
    """Write the finished manifest: ``total`` rows in ``num_shards`` shards, each shard's row count and input
    hash (every part reads every input, so each part knows them all). Called under the folder lock; a
    manifest that another run finished with other inputs is an error (two runs of other inputs never mix)."""
    path = output / MANIFEST
    manifest = {"settings": settings, "total": total, "num_shards": len(shards), "shards": shards}
    previous = _read_manifest(path)
    if previous is not None and "shards" in previous and \
            (previous.get("total"), previous.get("shards")) != (total, shards):
        raise ValueError(f"{output}: another run recorded {previous.get('total')} inputs in {MANIFEST}, this run read "
                         f"{total} other ones; use another --output directory or --overwrite")
    _write_json(path, manifest)
    return manifest


def _remove_unused_folder(output: Path):
    """Remove a folder this run created when it holds no shard: its fresh manifest and lock files, then itself."""
    if any(_SHARD_RE.match(p.name) for p in output.iterdir()):
        return
    manifest = _read_manifest(output / MANIFEST)
    if manifest is not None and "total" not in manifest:
        (output / MANIFEST).unlink(missing_ok=True)
    remove_lock_files(output)
    try:
        output.rmdir()
    except OSError:  # something else is in it now: keep it
        pass


def encode_to_shards(model, inputs, output: str | os.PathLike, *, role: str = "query", shard_size: int = 10_000,
                     part: tuple[int, int] = (0, 1), overwrite: bool = False, show_progress_bar: bool | None = None,
                     model_name: str | None = None, **encode_kwargs) -> dict:
    """Embed ``inputs`` (list, iterable, ``datasets.Dataset``) into ``.npy`` shards of ``shard_size`` rows
    under ``output``, resuming where a previous run stopped. Returns the manifest.

    ``role``: ``"query"`` (``encode_query``) or ``"document"`` (``encode_document``); ``encode_kwargs`` go to
    it (``think_tokens``, ``batch_size``, ``max_length``, ``instruction``, ...). ``part=(i, n)``: encode only
    shards ``i, i + n, ...`` (run n processes, one per device, on the same directory). ``model_name``
    (default: the checkpoint's path) is recorded in the manifest; a rerun with other settings is an error.
    The folder is locked while this runs (:func:`tte_flash.writing.folder_lock`): another writer is refused
    with an error naming the holder. A shard that is damaged (its bytes do not match its record's SHA-256,
    empty, foreign) is reported with a warning and encoded again.
    """
    if role not in ("query", "document"):
        raise ValueError(f"role must be 'query' or 'document', got {role!r}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    worker, workers = part
    if not 0 <= worker < workers:
        raise ValueError(f"part must be (i, n) with 0 <= i < n, got {part}")
    if encode_kwargs.get("think_tokens") == "auto":
        raise ValueError("think_tokens='auto' is not supported when writing shards; pass an int")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"{output} is a file: shards go into a directory (or give an .npy path for one file)")
    encode = model.encode_query if role == "query" else model.encode_document
    think_tokens = encode_kwargs.pop("think_tokens", None)
    if think_tokens is None:  # what encode_query / encode_document would use
        explicit = encode_kwargs.get("mode") == "explicit-cot"
        think_tokens = model.config.default_think_tokens if role == "query" and not explicit else 0
    dim = encode_kwargs.get("truncate_dim") or model.config.text_config.hidden_size
    settings = {"format": FORMAT, "model": model_name or model.config.name_or_path,
                "weights": weights_fingerprint(model), "role": role, "think_tokens": think_tokens, "dim": dim, "shard_size": shard_size,
                **{k: encode_kwargs.get(k) for k in ("max_length", "instruction", "normalize_embeddings",
                                                     "truncate_dim", "mode")}}
    settings_id = sha256_json(settings)[:16]
    if not overwrite:
        _refuse_foreign_folder(output)
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    manifest_path, whole = output / MANIFEST, False
    try:
        with folder_lock(output, part, overwrite) as lock:
            whole = lock.whole
            with lock.briefly():
                _check_settings(output, settings, overwrite)
                if whole:  # no other writer can be active: temporary files here are those of killed writers
                    remove_stale_temporaries(output)
                if not manifest_path.is_file():
                    _write_json(manifest_path, {"settings": settings})
            total, encoded, shards = 0, 0, []
            items = iter(iter_inputs(inputs))
            for index in itertools.count():
                first = next(items, _END)
                if first is _END:
                    break
                shard = _Fingerprinted(itertools.chain([first], itertools.islice(items, shard_size - 1)))
                if index % workers != worker:  # another part's: only its inputs are compared, when it is done
                    for _ in shard:
                        pass
                    _check_same_inputs(output, index, total, shard, _shard_record(output, index, settings_id)[0])
                else:
                    meta, _, problem = _load_shard(output, index, dim, settings_id, load=False)
                    if meta is not None:
                        for _ in shard:
                            pass
                        _check_same_inputs(output, index, total, shard, meta)
                    else:
                        if problem is not None:
                            log.warning("%s: %s; encoding shard %d again", output, problem, index)
                        try:
                            vectors = encode(iter(shard), think_tokens=think_tokens, convert_to_numpy=True,
                                             show_progress_bar=show_progress_bar, **encode_kwargs)
                        except ValueError as err:  # "input i: ..." counts within the shard: name the run's input
                            message = re.sub(r"^input (\d+):", lambda m: f"input {int(m.group(1)) + total}:", str(err))
                            raise ValueError(message) from None
                        _write_shard(output, index, total, vectors, shard.sha256, settings_id)
                        encoded += shard.count
                shards.append({"count": shard.count, "sha256": shard.sha256})
                total += shard.count
                if shard.count < shard_size:
                    break
            if total == 0:
                raise ValueError("nothing to encode: the input is empty")
            with lock.briefly():
                manifest = _record_manifest(output, settings, total, shards)
    except BaseException:
        if created and whole:  # nothing of value and no other writer: leave nothing behind
            _remove_unused_folder(output)
        raise
    return {**manifest, "encoded_now": encoded}


_END = object()


def read_shards(output: str | os.PathLike) -> np.ndarray:
    """All embeddings of a shard directory as one ``(total, dim)`` array, in input order.

    The manifest is the source of truth and every file is checked against it: its row counts must add up
    to ``total``, every shard's ``.npy`` must have the SHA-256 and shape of its ``.json`` record, and every
    record the inputs the manifest lists; a shard file the manifest does not list is an error too. A clear
    error names what is missing or damaged (rerunning the same command resumes and redoes it)."""
    output = Path(output)
    path = output / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no {MANIFEST} in {output}: not an embeddings directory")
    manifest = _read_manifest(path)
    if manifest is None:
        raise ValueError(f"{path} is not a manifest tte-flash wrote (unreadable JSON or other content)")
    settings = manifest["settings"]
    if "total" not in manifest:
        raise ValueError(f"{output} is incomplete: no run has reached the end of the input yet (rerun to resume)")
    shards, total, num_shards = manifest.get("shards"), manifest.get("total"), manifest.get("num_shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "count" in s and "sha256" in s for s in shards):
        raise ValueError(f"{path} lists no shards (written by an older tte-flash, or edited): rerun the same "
                         "command to check every shard and record them")
    shard_size, dim = settings.get("shard_size"), settings.get("dim")
    counts = [s["count"] for s in shards]
    consistent = all(isinstance(n, int) and n >= 0 for n in (total, shard_size, *counts)) and shard_size > 0 and \
        num_shards == len(shards) == -(-total // shard_size) and sum(counts) == total and \
        all(c == shard_size for c in counts[:-1])
    if not consistent:
        raise ValueError(f"{path} does not add up (num_shards {num_shards}, {len(shards)} shards listed holding "
                         f"{sum(c for c in counts if isinstance(c, int))} rows, total {total}, shards of {shard_size}): "
                         "edited or damaged; rerun the command that made it with --overwrite")
    extra = sorted(p.name for p in output.iterdir()
                   if (m := _SHARD_RE.match(p.name)) and int(m.group(1)) >= num_shards)
    if extra:
        raise ValueError(f"{output} holds shard files its {MANIFEST} does not list ({', '.join(extra[:4])}"
                         f"{' ...' if len(extra) > 4 else ''}; it lists {num_shards}): the manifest was edited or "
                         "they are another run's; remove them or rerun with --overwrite")
    settings_id = sha256_json(settings)[:16]
    out, problems = np.empty((total, dim), dtype=np.float32), {}
    for index, entry in enumerate(shards):
        meta, array, problem = _load_shard(output, index, dim, settings_id, load=True)
        if meta is not None and (meta["count"], meta["sha256"], meta["start"]) != \
                (entry["count"], entry["sha256"], index * shard_size):
            meta, problem = None, f"{_shard_paths(output, index)[1].name} records other inputs than {MANIFEST}"
        if meta is None:
            problems[index] = problem or f"{_shard_paths(output, index)[0].name} is missing"
            continue
        out[index * shard_size:index * shard_size + len(array)] = array
    if problems:
        listed = list(problems)
        raise ValueError(f"{output} is incomplete: shards {listed[:10]}{' ...' if len(listed) > 10 else ''} of "
                         f"{num_shards} are missing or damaged ({'; '.join(list(problems.values())[:3])}); rerun "
                         "the same command to resume (it redoes them)")
    return out
