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
  process has read the input to its end, ``total``;
* ``shard-00000.npy`` (float32, ``(count, dim)``) and ``shard-00000.json`` (``start``, ``count`` and the
  SHA-256 of the inputs it holds). Both are written to a temporary name and renamed when complete, the
  ``.json`` last: a shard counts as done only when its ``.json`` exists and its ``.npy`` has the stated shape.
  Resuming skips done shards (checking that their inputs are unchanged) and redoes the rest.
* ``part=(i, n)``: this process encodes shards ``i, i + n, ...`` only, so ``n`` processes (one per device)
  fill one directory without touching each other's files.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
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

def _atomic_write_bytes(path: Path, write: Callable[[object], None]):
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, data: dict):
    _atomic_write_bytes(path, lambda h: h.write((json.dumps(data, indent=1, sort_keys=True) + "\n").encode()))


def _shard_paths(output: Path, index: int) -> tuple[Path, Path]:
    return output / f"shard-{index:05d}.npy", output / f"shard-{index:05d}.json"


def _json_default(value):
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError


class _Fingerprinted:
    """Yields the items of an iterator, counting them and hashing their JSON form (``sha256`` is None
    when some item has none, e.g. a PIL image: then a resumed shard's inputs cannot be checked)."""

    def __init__(self, items: Iterator):
        self.items, self.count, self._hash = items, 0, hashlib.sha256()

    def __iter__(self):
        for item in self.items:
            self.count += 1
            if self._hash is not None:
                try:
                    self._hash.update(json.dumps(item, sort_keys=True, default=_json_default).encode() + b"\n")
                except TypeError:
                    self._hash = None
            yield item

    @property
    def sha256(self) -> str | None:
        return None if self._hash is None else self._hash.hexdigest()


def _done_shard(output: Path, index: int, dim: int) -> dict | None:
    """The shard's record if it is complete (its .json written, its .npy of the stated shape), else None."""
    array_path, meta_path = _shard_paths(output, index)
    try:
        meta = json.loads(meta_path.read_text())
        shape = np.load(array_path, mmap_mode="r").shape
    except (OSError, ValueError):
        return None
    return meta if shape == (meta.get("count"), dim) else None


def weights_fingerprint(model) -> str:
    """A short hash of the model's weights (64 evenly spaced values of every tensor, exact bytes): the same
    checkpoint on any device gives the same value; another checkpoint, or a random preset loaded again, not."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().flatten()
        sample = flat[::max(1, flat.numel() // 64)][:64].float().cpu().numpy()
        digest.update(f"{name}{tuple(tensor.shape)}".encode() + sample.tobytes())
    return digest.hexdigest()[:16]


def _check_settings(output: Path, settings: dict, overwrite: bool):
    path = output / MANIFEST
    if path.is_file():
        try:
            previous = json.loads(path.read_text()).get("settings")
        except ValueError:
            previous = None  # a manifest is written atomically, so this is not ours: say so below
        if previous != settings and not overwrite:
            diff = ", ".join(f"{k}: {(previous or {}).get(k)!r} there, {v!r} now" for k, v in settings.items()
                             if (previous or {}).get(k) != v)
            raise ValueError(f"{output} holds embeddings made with other settings ({diff}); use another --output "
                             "directory or overwrite=True (--overwrite)")
        if overwrite:
            for stale in itertools.chain(output.glob("shard-*.npy"), output.glob("shard-*.json"), [path]):
                stale.unlink()
    # a temporary file alone is another part writing the manifest right now
    elif output.exists() and any(".tmp-" not in p.name for p in output.iterdir()):
        raise ValueError(f"{output} is not empty and has no {MANIFEST}: not an embeddings directory; "
                         "choose an empty or new directory")


def encode_to_shards(model, inputs, output: str | os.PathLike, *, role: str = "query", shard_size: int = 10_000,
                     part: tuple[int, int] = (0, 1), overwrite: bool = False, show_progress_bar: bool | None = None,
                     model_name: str | None = None, **encode_kwargs) -> dict:
    """Embed ``inputs`` (list, iterable, ``datasets.Dataset``) into ``.npy`` shards of ``shard_size`` rows
    under ``output``, resuming where a previous run stopped. Returns the manifest.

    ``role``: ``"query"`` (``encode_query``) or ``"document"`` (``encode_document``); ``encode_kwargs`` go to
    it (``think_tokens``, ``batch_size``, ``max_length``, ``instruction``, ...). ``part=(i, n)``: encode only
    shards ``i, i + n, ...`` (run n processes, one per device, on the same directory). ``model_name``
    (default: the checkpoint's path) is recorded in the manifest; a rerun with other settings is an error.
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
    _check_settings(output, settings, overwrite)
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    manifest_path = output / MANIFEST
    fresh = not manifest_path.is_file()
    if fresh:
        _write_json(manifest_path, {"settings": settings})
    items, total, encoded = iter(iter_inputs(inputs)), 0, 0
    for index in itertools.count():
        first = next(items, _END)
        if first is _END:
            break
        shard = _Fingerprinted(itertools.chain([first], itertools.islice(items, shard_size - 1)))
        done = _done_shard(output, index, dim)
        if index % workers != worker or done is not None:
            for _ in shard:
                pass
            if done is not None and None not in (done.get("sha256"), shard.sha256) and done["sha256"] != shard.sha256:
                raise ValueError(f"{output}: shard {index} was made from other inputs than inputs {total}.."
                                 f"{total + shard.count - 1} now; use another --output directory or --overwrite")
        else:
            try:
                vectors = encode(iter(shard), think_tokens=think_tokens, convert_to_numpy=True,
                                 show_progress_bar=show_progress_bar, **encode_kwargs)
            except ValueError as err:  # "input i: ..." counts within the shard: name the input of the whole run
                message = re.sub(r"^input (\d+):", lambda m: f"input {int(m.group(1)) + total}:", str(err))
                raise ValueError(message) from None
            array_path, meta_path = _shard_paths(output, index)
            _atomic_write_bytes(array_path, lambda h: np.save(h, vectors.astype(np.float32, copy=False)))
            _write_json(meta_path, {"index": index, "start": total, "count": shard.count, "sha256": shard.sha256})
            encoded += shard.count
        total += shard.count
        if shard.count < shard_size:
            break
    if total == 0:
        if fresh:  # leave nothing behind for an empty input
            manifest_path.unlink(missing_ok=True)
            if created and not any(output.iterdir()):
                output.rmdir()
        raise ValueError("nothing to encode: the input is empty")
    manifest = {"settings": settings, "total": total, "num_shards": -(-total // shard_size)}
    _write_json(manifest_path, manifest)
    return {**manifest, "encoded_now": encoded}


_END = object()


def read_shards(output: str | os.PathLike) -> np.ndarray:
    """All embeddings of a shard directory as one ``(total, dim)`` array, in input order; a clear error
    when some shard is missing (a run still going, or stopped: rerun it to resume)."""
    output = Path(output)
    try:
        manifest = json.loads((output / MANIFEST).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST} in {output}: not an embeddings directory") from None
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict):
        raise ValueError(f"{output / MANIFEST} is not a manifest tte-flash wrote (unreadable JSON or other content)")
    settings = manifest["settings"]
    if "total" not in manifest:
        raise ValueError(f"{output} is incomplete: no run has reached the end of the input yet (rerun to resume)")
    num_shards = manifest["num_shards"]
    missing = [i for i in range(num_shards) if _done_shard(output, i, settings["dim"]) is None]
    if missing:
        raise ValueError(f"{output} is incomplete: shards {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                         f"of {num_shards} are missing (rerun the same command to resume)")
    return np.concatenate([np.load(_shard_paths(output, i)[0]) for i in range(num_shards)])
