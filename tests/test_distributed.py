"""Encoding on a Ray cluster (tte_flash.distributed): the same shards, records and manifest as one process.

One test starts a local Ray cluster (2 CPUs, 2 model actors); the others run the actor and the driver's
stand-in model in this process, without Ray."""
import json
import time

import numpy as np
import pytest

from tte_flash.cli import main as cli_main
from tte_flash.cli import read_inputs
from tte_flash.distributed import _ClusterModel, _Encoder, input_digest
from tte_flash.encoding import encode_to_shards, read_shards, weights_fingerprint
from tte_flash.evaluate import load_model

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

MODEL = "tiny-instruct"  # pretrained weights: every process loads the same model (a random preset would not)


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)


def corpus(rng, n):
    """Texts of random length (some with an instruction), as Parquet rows with an extra column."""
    rows = []
    for i in range(n):
        text = " ".join(f"w{int(x)}" for x in rng.integers(0, 900, int(rng.integers(1, 40))))
        rows.append({"id": i, "text": text, "instruction": "Find the passage." if rng.random() < 0.3 else None})
    return rows


def shard_records(folder):
    """Each shard's .json record without the .npy's own SHA-256 (the vectors agree to 1e-6, not bit for bit)."""
    records = []
    for path in sorted(folder.glob("shard-*.json")):
        record = json.loads(path.read_text())
        record.pop("array_sha256")
        records.append(record)
    return records


def in_process_stream(model, path, kind, rows_per_call):
    """What the cluster's stream gives, computed here: the file's rows in blocks through the Ray actor's code."""
    def start(role, kwargs):
        encoder = _Encoder(MODEL, role, kind, weights_fingerprint(model), model.config.text_config.hidden_size,
                           kwargs, None)
        for batch in pq.ParquetFile(path).iter_batches(batch_size=rows_per_call, columns=["text", "instruction"]):
            out = encoder(pa.Table.from_batches([batch]))
            yield from zip(out["embedding"], out["digest"], out["error"], out["worker"])
    return start


def test_stand_in_model_writes_the_single_process_shards_and_resumes(model, tmp_path, rng):
    rows = corpus(rng, int(rng.integers(40, 60)))
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    single = model.encode_to_shards(read_inputs([], str(path)), tmp_path / "one", role="document", shard_size=9,
                                    model_name=MODEL)
    # shards 0, 2, 4, ... already on disk (a part of an earlier run): the stand-in skips their rows
    model.encode_to_shards(read_inputs([], str(path)), tmp_path / "two", role="document", shard_size=9,
                           model_name=MODEL, part=(0, 2))
    stand_in = _ClusterModel(model, in_process_stream(model, path, "parquet", rows_per_call=7))
    manifest = encode_to_shards(stand_in, stand_in.counted(read_inputs([], str(path))), tmp_path / "two",
                                role="document", shard_size=9, model_name=MODEL)
    stand_in.finish(manifest["total"])
    assert manifest["encoded_now"] == sum(s["count"] for s in manifest["shards"][1::2])
    assert {k: v for k, v in manifest.items() if k != "encoded_now"} == \
        {k: v for k, v in single.items() if k != "encoded_now"}
    assert np.abs(read_shards(tmp_path / "two") - read_shards(tmp_path / "one")).max() <= 1e-6
    assert shard_records(tmp_path / "two") == shard_records(tmp_path / "one")


def test_stand_in_model_refuses_misaligned_rows_and_names_bad_inputs(model, tmp_path):
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": ["one", "two", "   ", "four"]}), path)
    stand_in = _ClusterModel(model, in_process_stream(model, path, "parquet", rows_per_call=3))
    with pytest.raises(ValueError, match=r"input 2: empty input"):  # the row's index in the file
        encode_to_shards(stand_in, stand_in.counted(read_inputs([], str(path))), tmp_path / "a",
                         role="document", shard_size=2, model_name=MODEL)
    assert len(list((tmp_path / "a").glob("shard-*.json"))) == 1  # the shard before it is kept

    def shifted(role, kwargs):  # a cluster that read the file from its second row
        rows = in_process_stream(model, path, "parquet", rows_per_call=3)(role, kwargs)
        next(rows)
        return rows
    stand_in = _ClusterModel(model, shifted)
    with pytest.raises(ValueError, match=r"input 0: the cluster read another input at row 1"):
        encode_to_shards(stand_in, stand_in.counted(read_inputs([], str(path))), tmp_path / "b",
                         role="document", shard_size=2, model_name=MODEL)
    other = _Encoder("tiny", "document", "parquet", weights_fingerprint(model), 128, {}, None)
    out = other(pa.table({"text": ["x"]}))
    assert out["error"][0].startswith("worker: a Ray worker loaded other weights for 'tiny'")
    assert input_digest({"image": b"\x00\x01"}) != input_digest({"image": b"\x00\x02"})


def test_without_ray_the_command_says_what_to_install(tmp_path, monkeypatch, capsys):
    import sys
    path = tmp_path / "corpus.jsonl"
    path.write_text('"a text"\n')
    monkeypatch.setitem(sys.modules, "ray", None)
    assert cli_main(["ray-encode", "--input", str(path), "--model", MODEL, "--output", str(tmp_path / "o")]) == 2
    assert "pip install 'tte-flash[distributed]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------- a local Ray cluster

@pytest.fixture(scope="module")
def local_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_cluster_writes_the_shards_of_tte_flash_encode(local_cluster, model, tmp_path, rng, capsys, monkeypatch):
    """Two CPU actors on a local cluster: vectors within 1e-6 of one process, the same manifest and shard
    records, a directory `tte-flash encode` accepts as its own; then JSONL inputs (strings and dicts, query
    role, think tokens) with a bad line: named by file and line, after the shards before it are written."""
    from tte_flash.distributed import encode_with_ray
    # Ray starts the pool's actors one by one and sends blocks to those already up: on 2 loaded cores the first
    # actor once embedded all 9 blocks while the second was still loading its model (CI, 2026-12-05). Wait for
    # both before any block goes out, so that "both actors embedded rows" tests the split, not the start-up race.
    monkeypatch.setattr(local_cluster.data.DataContext.get_current(), "wait_for_min_actors_s", 300)
    times = {"start": time.perf_counter()}
    rows = corpus(rng, int(rng.integers(180, 230)))
    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=int(rng.integers(40, 90)))
    manifest = encode_with_ray(MODEL, parquet, tmp_path / "ray", role="document", shard_size=64, num_workers=2,
                               rows_per_call=24)
    times["parquet on ray"] = time.perf_counter()
    single = model.encode_to_shards(read_inputs([], str(parquet)), tmp_path / "one", role="document",
                                    shard_size=64, model_name=MODEL)
    times["one process"] = time.perf_counter()
    assert len(manifest.pop("rows_per_worker")) == 2  # both actors embedded rows
    assert manifest == single
    assert json.loads((tmp_path / "ray" / "manifest.json").read_text()) == \
        json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert shard_records(tmp_path / "ray") == shard_records(tmp_path / "one")
    assert np.abs(read_shards(tmp_path / "ray") - read_shards(tmp_path / "one")).max() <= 1e-6
    assert cli_main(["encode", "--input", str(parquet), "--model", MODEL, "--role", "document",
                     "--output", str(tmp_path / "ray"), "--shard_size", "64"]) == 0
    assert "(0 encoded by this run" in capsys.readouterr().out
    times["cli resume"] = time.perf_counter()

    inputs = [r["text"] if r["instruction"] is None else {"text": r["text"], "instruction": r["instruction"]}
              for r in rows[:int(rng.integers(40, 60))]]
    lines = [json.dumps(x) for x in inputs]
    jsonl = tmp_path / "queries.jsonl"
    jsonl.write_text("\n".join(lines[:32] + ["{not json"] + lines[33:]) + "\n")
    with pytest.raises(ValueError, match=r"queries.jsonl:33: not JSON"):
        encode_with_ray(MODEL, jsonl, tmp_path / "q", shard_size=16, num_workers=2, rows_per_call=8, think_tokens=2)
    times["jsonl on ray"] = time.perf_counter()
    assert json.loads((tmp_path / "q" / "manifest.json").read_text())["settings"]["think_tokens"] == 2
    kept = np.concatenate([np.load(tmp_path / "q" / f"shard-0000{i}.npy") for i in range(2)])  # inputs 0-31
    assert not (tmp_path / "q" / "shard-00002.json").exists()
    assert np.abs(kept - model.encode_query(inputs[:32], think_tokens=2)).max() <= 1e-6
    names = ", ".join(f"{b}: {times[b] - times[a]:.1f} s" for a, b in zip(times, list(times)[1:]))
    print(f"ray test after the cluster started: {names}")
