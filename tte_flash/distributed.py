"""Encoding a corpus on a cluster with Ray Data: the same shards and manifest as ``tte-flash encode``.

    python -m tte_flash.distributed --model ckpt --input corpus.parquet --output embs/ --role document
    tte-flash ray-encode ...                                  # the same command

How it runs:

1. Ray Data reads the input file in parallel: Parquet with ``ray.data.read_parquet`` (only the
   ``text``/``image``/``video``/``instruction`` columns), JSONL with a Ray datasource that parses lines with
   ``tte_flash.data.json_values`` (the package's one JSONL parser: a line may be a JSON string, as in
   ``tte-flash encode``, which pyarrow's JSON reader cannot hold).
2. ``map_batches`` sends blocks of rows to a pool of model actors (:class:`_Encoder`): one actor per GPU
   (``num_gpus=1``) on a GPU cluster, CPU actors otherwise. Each actor loads the checkpoint once and embeds
   its rows with ``encode_query`` / ``encode_document`` (the same token-budget batching as one process).
3. The driver runs ``tte_flash.encoding.encode_to_shards`` itself, on the input read by the same reader
   as ``tte-flash encode``, with :class:`_ClusterModel` standing in for the model: its config and weights
   are the driver's copy of the checkpoint (for the manifest's settings and weights fingerprint) and its
   ``encode_*`` take the cluster's vectors, in input order (Ray Data's ``preserve_order``). So the shards,
   their records and the manifest are written by the same code as ``tte-flash encode``'s, and only on the
   driver: the output directory need not be shared with the workers.

Every row's input is checked against the driver's (a digest per row): a row the cluster read otherwise is an
error, never a misplaced vector. An input an actor cannot embed (an empty row, a missing image) is reported
by the driver as ``input N: ...`` with its index in the file, after the shards before it are written, as
``tte-flash encode`` does. Each actor checks that it loaded the same weights as the driver (a random preset
such as ``tiny`` is not the same model twice).

A rerun on the same ``--output`` keeps complete shards (their inputs checked, as ``tte-flash encode`` does)
and writes the rest; the cluster still embeds the rows of kept shards (Ray Data streams the file without row
numbers), so an interrupted run costs a full pass; ``tte-flash encode`` on the same directory resumes shard
by shard instead. tte-flash must be installed on every node, the model must be one every node can load (a
preset, a Hub id or a directory at the same path), and the input file must be readable at the same path on
every node (a shared file system: Ray runs read tasks anywhere; the driver reads it too). Needs
``pip install 'tte-flash[distributed]'`` (Ray Data).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

# rows of an actor call (one map_batches batch): enough for encode's token-budget batching to sort by
# length within (encoding.MIN_WINDOW), few enough to spread a small corpus over the actors
ROWS_PER_CALL = 512
JSONL_BLOCK_ROWS = 4096  # rows of a JSONL block read by one Ray read task
WORKER_FAILED = "worker: "  # an actor's error about itself (it could not load the model), not about a row


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError("encoding on a Ray cluster needs Ray Data: pip install 'tte-flash[distributed]' "
                          "(or pip install 'ray[data]')") from None
    return ray


# ---------------------------------------------------------------------------------- rows and digests

def input_digest(item) -> str:
    """A short hash of one input as read from the file (bytes are hashed, not dumped): the driver and the
    actors compute it on their own reads, so a vector is never written against another input."""
    def default(value):
        if isinstance(value, (bytes, bytearray)):
            return {"sha256": hashlib.sha256(value).hexdigest()}
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise TypeError(f"cannot digest {type(value).__name__}")
    text = json.dumps(item, sort_keys=True, default=default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _batch_inputs(batch, kind: str) -> tuple[list, list[str | None]]:
    """The inputs of one Ray block (a pyarrow table) as ``tte-flash encode`` reads them, and the read error
    of each row (None: read well)."""
    from .data import parquet_input
    if kind == "parquet":
        rows = batch.to_pylist()
        return [parquet_input(row) for row in rows], [None] * len(rows)
    texts, errors = batch.column("input").to_pylist(), batch.column("error").to_pylist()
    return [None if t is None else json.loads(t) for t in texts], errors


@functools.cache
def _jsonl_datasource():
    """A Ray datasource of JSONL inputs (a class made once, when Ray is imported): each line parsed by
    ``tte_flash.data.json_values``, as a column ``input`` (the value as JSON) beside ``error``."""
    import pyarrow as pa
    from ray.data.datasource import FileBasedDatasource

    from .data import json_values

    class JsonLinesInputs(FileBasedDatasource):
        def _read_stream(self, f, path: str):
            inputs, errors = [], []
            for _, _, value, error in json_values(io.BufferedReader(f, 1 << 20), path):  # f has no readline
                inputs.append(None if error else json.dumps(value))
                errors.append(error)
                if len(inputs) == JSONL_BLOCK_ROWS:
                    yield pa.table({"input": pa.array(inputs, pa.string()), "error": pa.array(errors, pa.string())})
                    inputs, errors = [], []
            if inputs:
                yield pa.table({"input": pa.array(inputs, pa.string()), "error": pa.array(errors, pa.string())})

    return JsonLinesInputs


# ---------------------------------------------------------------------------------- the model actor

class _Encoder:
    """A Ray Data actor: loads the checkpoint once, then embeds blocks of rows.

    Returns per row its vector (``embedding``; zeros where it failed), the digest of its input, an error
    message (``""``: none) and the actor (``host:pid``). A failed call is redone row by row, so that an error
    lands on its own row; an actor that could not load the model reports that on every row."""

    def __init__(self, model: str, role: str, kind: str, weights: str, dim: int, encode_kwargs: dict,
                 device: str | None):
        from .encoding import weights_fingerprint
        from .evaluate import load_model
        self.kind, self.kwargs, self.dim, self.failure = kind, encode_kwargs, dim, None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        try:
            self.model = load_model(model, device=device)
            loaded = weights_fingerprint(self.model)
            if loaded != weights:
                raise ValueError(f"a Ray worker loaded other weights for {model!r} than the driver (fingerprint "
                                 f"{loaded} vs {weights}): a random preset, or a path holding another checkpoint there")
        except (ValueError, OSError, ImportError) as err:  # reported with the rows: Ray would hand the driver its
            self.failure = f"{WORKER_FAILED}{err}"         # own error, with this message inside a traceback
            return
        self.encode = self.model.encode_query if role == "query" else self.model.encode_document

    def __call__(self, batch) -> dict:
        from .processing import normalize_input
        inputs, errors = _batch_inputs(batch, self.kind)
        vectors = np.zeros((len(inputs), self.dim), np.float32)
        if self.failure is not None:
            return self._result(vectors, [""] * len(inputs), [self.failure] * len(inputs))
        good = []
        for i, item in enumerate(inputs):
            if errors[i] is None:
                try:
                    normalize_input(item)
                    good.append(i)
                except ValueError as err:
                    errors[i] = str(err).removeprefix("input 0: ")
        try:
            vectors[good] = self._embed([inputs[i] for i in good])
        except (ValueError, OSError):  # find the row at fault
            for i in good:
                try:
                    vectors[i] = self._embed([inputs[i]])
                except (ValueError, OSError) as err:
                    errors[i] = str(err).removeprefix("input 0: ")
        digests = ["" if error else input_digest(item) for item, error in zip(inputs, errors)]
        return self._result(vectors, digests, [error or "" for error in errors])

    def _embed(self, inputs: list) -> np.ndarray:
        if not inputs:
            return np.zeros((0, self.dim), np.float32)
        return self.encode(inputs, convert_to_numpy=True, show_progress_bar=False, **self.kwargs)

    def _result(self, vectors: np.ndarray, digests: list[str], errors: list[str]) -> dict:
        return {"embedding": vectors, "digest": np.array(digests, dtype=object),
                "error": np.array(errors, dtype=object), "worker": np.array([self.worker] * len(vectors), dtype=object)}


# ---------------------------------------------------------------------------------- the driver

class _ClusterModel:
    """The model as ``encode_to_shards`` sees it: the driver's copy for ``config`` and the weights
    fingerprint (every other attribute too), and ``encode_query``/``encode_document`` that return the
    cluster's vectors of the inputs they are given.

    The inputs reach ``encode_to_shards`` through :meth:`counted`, which records the index in the file of the
    input it last handed out; ``encode_to_shards`` reads them lazily, so the first input of an ``encode``
    call tells where its rows start (rows of kept shards are skipped in the cluster's stream)."""

    def __init__(self, model, start_stream):
        self._model, self._start_stream = model, start_stream
        self._rows, self._signature = None, None
        self._index, self.taken = -1, 0
        self.rows_per_worker = Counter()  # rows written, by the actor (host:pid) that embedded them

    def __getattr__(self, name):
        return getattr(self._model, name)

    def counted(self, items) -> Iterator:
        for self._index, item in enumerate(items):
            yield item

    def encode_query(self, items, **kwargs):
        return self._encode("query", items, kwargs)

    def encode_document(self, items, **kwargs):
        return self._encode("document", items, kwargs)

    def _encode(self, role: str, items, kwargs: dict) -> np.ndarray:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("convert_to_numpy", "show_progress_bar")}
        if self._rows is None:  # the cluster starts at the first shard to write, with encode_to_shards' arguments
            self._rows, self._signature = self._start_stream(role, kwargs), (role, kwargs)
        elif (role, kwargs) != self._signature:
            raise RuntimeError(f"encode_to_shards changed its arguments between shards: {self._signature} -> "
                               f"{(role, kwargs)}")
        vectors = []
        for local, item in enumerate(items):
            vector, digest, error, worker = self._row(self._index)
            self.rows_per_worker[worker] += 1
            if error:
                raise ValueError(error.removeprefix(WORKER_FAILED) if error.startswith(WORKER_FAILED) else
                                 f"input {local}: {error}")
            if digest != input_digest(item):
                raise ValueError(f"input {local}: the cluster read another input at row {self._index + 1} than "
                                 f"tte-flash's reader (digest {digest} vs {input_digest(item)}); was the file changed?")
            vectors.append(vector)
        if not vectors:
            return np.zeros((0, self._model.config.text_config.hidden_size), np.float32)
        return np.stack(vectors).astype(np.float32, copy=False)

    def _row(self, index: int):
        """Row ``index`` of the cluster's stream (rows before it, of shards already on disk, are dropped)."""
        while True:
            row = next(self._rows, None)
            if row is None:
                raise ValueError(f"the cluster read {self.taken} rows, tte-flash's reader more (row {index + 1}); "
                                 "was the file changed?")
            self.taken += 1
            if self.taken - 1 == index:
                return row
            if self.taken - 1 > index:
                raise RuntimeError(f"row {index + 1} asked for after row {self.taken}: inputs read out of order")

    def close(self):
        """Stop the cluster's stream (Ray Data stops its tasks when its iterator is closed)."""
        if self._rows is not None:
            self._rows.close()

    def finish(self, total: int):
        """After the last shard: when the cluster's stream reached row ``total``, it must end there."""
        if self._rows is not None and self.taken == total and next(self._rows, None) is not None:
            raise ValueError(f"the cluster read more rows than tte-flash's reader ({total}); was the file changed?")


def _vector_rows(dataset) -> Iterator[tuple[np.ndarray, str, str]]:
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        yield from zip(batch["embedding"], batch["digest"], batch["error"], batch["worker"])


def _plan_workers(ray, num_workers, num_gpus_per_worker, num_cpus_per_worker) -> tuple[int, float, float]:
    """(actors, GPUs per actor, CPUs per actor): one actor per GPU when the cluster has GPUs, else CPU actors
    that leave one CPU to Ray Data's read tasks."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if num_gpus_per_worker is None:
        num_gpus_per_worker = 1 if gpus else 0
    if num_workers is None:
        num_workers = max(1, int(gpus // num_gpus_per_worker)) if num_gpus_per_worker else max(1, int(cpus) - 1)
    if num_cpus_per_worker is None:
        num_cpus_per_worker = 1 if num_gpus_per_worker else max(0.25, (cpus - 1) / num_workers)
    return num_workers, num_gpus_per_worker, num_cpus_per_worker


def encode_with_ray(model: str, input_path, output, *, role: str = "query", shard_size: int = 10_000,
                    overwrite: bool = False, num_workers: int | None = None, num_gpus_per_worker: float | None = None,
                    num_cpus_per_worker: float | None = None, address: str | None = None,
                    rows_per_call: int = ROWS_PER_CALL, **encode_kwargs) -> dict:
    """Embed the rows of ``input_path`` (JSONL or Parquet, as ``tte-flash encode --input``) on a Ray cluster
    into shards under ``output``; returns the manifest (as ``encode_to_shards``), with ``rows_per_worker``: the rows
    of this run's shards by the actor (``host:pid``) that embedded them.

    ``model``: a preset name, Hub id or checkpoint directory that every node can read (each actor loads it;
    the driver loads it once too, for the manifest). ``encode_kwargs``: ``think_tokens``, ``batch_size``,
    ``max_batch_tokens``, ``max_length``, ``instruction``, ... as for ``encode_to_shards``. ``num_workers``:
    actors (default: one per GPU, else one per CPU but one); ``num_gpus_per_worker`` (default 1 on a GPU
    cluster, else 0), ``num_cpus_per_worker``. ``address``: a running cluster (``"auto"``, ``ray://...``);
    default: the one ``ray.init`` finds (``RAY_ADDRESS``) or a new local one, or the session already
    initialised in this process.
    """
    from .data import PARQUET_SUFFIXES, parquet_input_columns
    from .encoding import encode_to_shards, weights_fingerprint
    from .evaluate import load_model
    input_path = Path(input_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"input file not found: {input_path}")
    kind = "parquet" if input_path.suffix.lower() in PARQUET_SUFFIXES else "json"
    columns = parquet_input_columns(input_path) if kind == "parquet" else None  # checked before any model work
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    try:
        driver_model = load_model(model)
        workers, gpus, cpus = _plan_workers(ray, num_workers, num_gpus_per_worker, num_cpus_per_worker)
        weights = weights_fingerprint(driver_model)
        context = ray.data.DataContext.get_current()
        order = context.execution_options.preserve_order

        def start_stream(stream_role: str, kwargs: dict):
            context.execution_options.preserve_order = True  # vectors come back in input order
            path = str(input_path.resolve())
            # partitioning=None: no columns from hive-style folder names (lang=en/), which tte-flash encode never sees
            dataset = ray.data.read_parquet(path, partitioning=None).select_columns(columns) if kind == "parquet" else \
                ray.data.read_datasource(_jsonl_datasource()(path))
            # blocks of rows_per_call rows, so that every actor gets work (a file is read as few, big blocks)
            dataset = dataset.repartition(target_num_rows_per_block=rows_per_call).map_batches(
                _Encoder, batch_size=rows_per_call, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=workers), num_gpus=gpus, num_cpus=cpus,
                fn_constructor_kwargs={"model": model, "role": stream_role, "kind": kind, "weights": weights,
                                       "dim": kwargs.get("truncate_dim") or driver_model.config.text_config.hidden_size,
                                       "encode_kwargs": kwargs, "device": "cuda" if gpus else None})
            return _vector_rows(dataset)

        from .cli import read_inputs  # what `tte-flash encode --input` reads, by the same reader
        cluster = _ClusterModel(driver_model, start_stream)
        try:
            manifest = encode_to_shards(cluster, cluster.counted(read_inputs([], str(input_path))), output,
                                        role=role, shard_size=shard_size, overwrite=overwrite, model_name=model,
                                        **encode_kwargs)
            cluster.finish(manifest["total"])
            manifest["rows_per_worker"] = dict(cluster.rows_per_worker)
        except Exception as err:
            raise _user_error(err) from None
        finally:
            cluster.close()
            context.execution_options.preserve_order = order
        return manifest
    finally:
        if started:
            ray.shutdown()


def _user_error(err: BaseException) -> BaseException:
    """The first of ``err``'s causes raised by tte-flash's own code on a worker (a ``ValueError`` naming the
    file and line, an ``ImportError``, ...), without Ray's wrapping; else ``err`` itself."""
    seen, current = set(), err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__module__.split(".")[0] != "ray" and isinstance(current, (ValueError, OSError, ImportError)):
            return current
        current = getattr(current, "cause", None) or current.__cause__
    return err


# ---------------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    from .cli import add_encode_options, add_shard_options, encode_kwargs

    parser = argparse.ArgumentParser(prog="tte-flash ray-encode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", "--input_file", "--input-file", dest="input_file", required=True,
                        help="a JSONL file (strings or input dicts, one a line) or a .parquet file "
                             "(its text/image/video/instruction columns), as tte-flash encode --input")
    parser.add_argument("--model", required=True, help="a preset, Hub id or checkpoint directory every node can read")
    parser.add_argument("--output", required=True, help="a directory of .npy shards + manifest.json")
    add_encode_options(parser)
    add_shard_options(parser, overwrite_help="replace a shard directory made with other settings")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (auto, ray://head:10001); default: RAY_ADDRESS, else a new "
                             "local cluster")
    parser.add_argument("--num_workers", "--num-workers", type=int, default=None,
                        help="model actors (default: one per GPU, else one per CPU but one)")
    parser.add_argument("--num_gpus_per_worker", "--num-gpus-per-worker", type=float, default=None,
                        help="default 1 on a cluster with GPUs, else 0")
    parser.add_argument("--num_cpus_per_worker", "--num-cpus-per-worker", type=float, default=None)
    parser.add_argument("--rows_per_call", "--rows-per-call", type=int, default=ROWS_PER_CALL,
                        help="rows sent to an actor at a time (Ray Data's map_batches batch size)")
    args = parser.parse_args(argv)
    kwargs = encode_kwargs(args)
    try:
        manifest = encode_with_ray(args.model, args.input_file, args.output, role=args.role,
                                   shard_size=args.shard_size, overwrite=args.overwrite, address=args.address,
                                   num_workers=args.num_workers, num_gpus_per_worker=args.num_gpus_per_worker,
                                   num_cpus_per_worker=args.num_cpus_per_worker, rows_per_call=args.rows_per_call,
                                   **kwargs)
    except (ValueError, OSError, ImportError) as err:
        print(f"tte-flash ray-encode: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.output}: {manifest['total']} x {manifest['settings']['dim']} {args.role} embeddings in "
          f"{manifest['num_shards']} shards ({manifest['encoded_now']} written by this run; read them with "
          "tte_flash.read_shards)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
