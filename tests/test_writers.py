"""Guarded writes (issue 18, item 3): one writer per output folder, every shard / score / cache checked against
its content hash on read, the manifest checked against the files, no temporary file left by a failure."""
import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_mmeb import ORACLE, IdModel, _png, build_fixture

import tte_flash.encoding as encoding
import tte_flash.writing as writing
from tte_flash import mmeb
from tte_flash.cli import main as cli_main
from tte_flash.encoding import read_shards
from tte_flash.writing import FolderLockedError, atomic_write_bytes, folder_lock

DOCS = [f"document {i} " + "y" * (i % 7) for i in range(23)]


@pytest.fixture(scope="module")
def expected(tiny_model):
    return tiny_model.encode_document(DOCS)


@pytest.fixture
def shards(tiny_model, tmp_path):
    """A finished folder of 23 document embeddings in shards of 5."""
    out = tmp_path / "embs"
    tiny_model.encode_to_shards(DOCS, out, role="document", shard_size=5)
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name)


# ---------------------------------------------------------------------------------- one writer at a time

HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("writing", sys.argv[1])
writing = importlib.util.module_from_spec(spec)
spec.loader.exec_module(writing)
with writing.folder_lock(sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_in_another_process(folder: Path) -> subprocess.Popen:
    """A process that holds ``folder``'s lock until killed (tte_flash.writing loaded alone: no torch import)."""
    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, writing.__file__, str(folder)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_one_never_blocks(tiny_model, tmp_path, capsys):
    out = tmp_path / "embs"
    holder = hold_in_another_process(out)
    try:
        with pytest.raises(FolderLockedError) as refused:
            tiny_model.encode_to_shards(DOCS, out, role="document", shard_size=5)
        message = str(refused.value)
        assert str(out) in message and f"pid {holder.pid}" in message and socket.gethostname() in message
        assert not list(out.glob("shard-*")) and not (out / encoding.MANIFEST).exists()  # nothing written
        assert cli_main(["encode", "a text", "--model", "tiny-instruct", "--output", str(out)]) == 2
        assert f"is being written by pid {holder.pid}" in capsys.readouterr().err
        with pytest.raises(FolderLockedError, match=f"pid {holder.pid}"):
            mmeb.run_benchmark(IdModel(ORACLE), tmp_path, out, tasks=["ImageNet-1K"])
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: no cleanup ran; its lock file stays behind
        holder.wait()
    assert (out / writing.LOCK).exists()
    result = tiny_model.encode_to_shards(DOCS, out, role="document", shard_size=5)  # the OS released the lock
    assert result["encoded_now"] == 23


class Gated:
    """The tiny model, whose document encoding waits until the test lets it go (a writer caught mid-run)."""

    def __init__(self, model):
        self.model, self.entered, self.go = model, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode_document(self, items, **kwargs):
        self.entered.set()
        assert self.go.wait(60)
        return self.model.encode_document(items, **kwargs)


def test_two_writers_of_other_inputs_never_mix(tiny_model, expected, tmp_path):
    out, other = tmp_path / "embs", [f"other input {i}" for i in range(23)]
    gated, errors = Gated(tiny_model), []

    def first():
        try:
            gated.encode_to_shards = lambda *a, **k: encoding.encode_to_shards(gated, *a, **k)
            gated.encode_to_shards(DOCS, out, role="document", shard_size=5)
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)
    thread = threading.Thread(target=first)
    thread.start()
    assert gated.entered.wait(60)  # the first writer is encoding shard 0
    with pytest.raises(FolderLockedError, match=f"being written by pid {os.getpid()}"):
        tiny_model.encode_to_shards(other, out, role="document", shard_size=5)
    gated.go.set()
    thread.join(60)
    assert not errors
    np.testing.assert_allclose(read_shards(out), expected, atol=1e-6)  # the first writer's inputs, only them
    with pytest.raises(ValueError, match="shard 0 was made from other inputs"):  # and after it: refused too
        tiny_model.encode_to_shards(other, out, role="document", shard_size=5)


def test_parts_of_one_split_share_a_folder_every_other_writer_is_refused(tmp_path):
    with folder_lock(tmp_path, part=(0, 2)):
        with folder_lock(tmp_path, part=(1, 2)) as lock:  # the other part of the same split: side by side
            with lock.briefly():
                pass
        for part in ((0, 1), (0, 3), (2, 3)):  # a whole run, or another split: their shards overlap part 0/2's
            with pytest.raises(FolderLockedError, match=r"part 0/2 of another run, pid \d+ on host"):
                with folder_lock(tmp_path, part=part):
                    pass
        with pytest.raises(FolderLockedError, match="this run clears the folder"):
            with folder_lock(tmp_path, part=(1, 2), overwrite=True):
                pass
        with pytest.raises(FolderLockedError, match="is being written by pid"):  # the same part twice
            with folder_lock(tmp_path, part=(0, 2)):
                pass
    with folder_lock(tmp_path):
        with pytest.raises(FolderLockedError, match="is being written by pid"):  # a whole run holds it all
            with folder_lock(tmp_path, part=(1, 2)):
                pass
    with folder_lock(tmp_path):  # every lock above was released
        pass


def test_devices_overwrite_clears_only_a_folder_no_one_writes(shards):
    from tte_flash.cli import _clear_for_overwrite
    with folder_lock(shards, part=(0, 2)):  # a part of another run is writing: --devices --overwrite refused
        with pytest.raises(FolderLockedError, match="this run clears the folder"):
            _clear_for_overwrite(shards)
    assert len(list(shards.glob("shard-*"))) == 10 and (shards / "manifest.json").exists()
    _clear_for_overwrite(shards)
    assert not list(shards.glob("shard-*")) and not (shards / "manifest.json").exists()


# ---------------------------------------------------------------------------------- shards checked on read and resume

def test_a_zeroed_or_empty_shard_is_an_error_on_read_and_redone_on_resume(tiny_model, shards, expected, caplog):
    np.save(shards / "shard-00002.npy", np.zeros((5, 64), dtype=np.float32))  # same shape, same size
    (shards / "shard-00004.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"incomplete: shards \[2, 4\] of 5 are missing or damaged "
                                         r"\(shard-00002.npy does not match its record's SHA-256"):
        read_shards(shards)
    with caplog.at_level(logging.WARNING, logger="tte_flash.encoding"):
        again = tiny_model.encode_to_shards(DOCS, shards, role="document", shard_size=5)
    assert again["encoded_now"] == 5 + 3
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "shard-00002.npy does not match" in warned and "shard-00004.npy is empty (0 bytes)" in warned
    np.testing.assert_allclose(read_shards(shards), expected, atol=1e-6)


def test_foreign_files_are_reported_and_redone_never_a_crash(tiny_model, shards, expected, caplog):
    (shards / "shard-00001.json").write_text("[1, 2]")
    (shards / "shard-00003.npy").write_text("not an array, same name")
    (shards / "shard-00000.json").write_bytes(b"\xff\xfe binary")
    with pytest.raises(ValueError, match=r"shards \[0, 1, 3\].*shard-00000.json is not a shard record"):
        read_shards(shards)
    with caplog.at_level(logging.WARNING, logger="tte_flash.encoding"):
        assert tiny_model.encode_to_shards(DOCS, shards, role="document", shard_size=5)["encoded_now"] == 15
    for name in ("shard-00000.json is not a shard record", "shard-00001.json is not a shard record",
                 "shard-00003.npy does not match"):
        assert name in caplog.text
    np.testing.assert_allclose(read_shards(shards), expected, atol=1e-6)
    (shards / "manifest.json").write_text("[1, 2]")  # a foreign manifest: an error, --overwrite replaces it
    with pytest.raises(ValueError, match="not a manifest tte-flash wrote"):
        tiny_model.encode_to_shards(DOCS, shards, role="document", shard_size=5)
    assert tiny_model.encode_to_shards(DOCS, shards, role="document", shard_size=5, overwrite=True)["total"] == 23


def test_the_manifest_is_checked_against_the_files(tiny_model, shards, tmp_path):
    path = shards / "manifest.json"
    manifest = json.loads(path.read_text())
    assert (manifest["total"], manifest["num_shards"], len(manifest["shards"])) == (23, 5, 5)
    path.write_text(json.dumps({**manifest, "num_shards": 4}))  # lowered: never 20 of 23 rows without a word
    with pytest.raises(ValueError, match=r"does not add up \(num_shards 4, 5 shards listed holding 23 rows"):
        read_shards(shards)
    consistent = {**manifest, "num_shards": 4, "total": 20, "shards": manifest["shards"][:4]}
    path.write_text(json.dumps(consistent))  # lowered everywhere: the files it no longer lists give it away
    with pytest.raises(ValueError, match=r"holds shard files its manifest.json does not list \(shard-00004.json, "
                                         r"shard-00004.npy; it lists 4\)"):
        read_shards(shards)
    path.write_text(json.dumps(manifest))
    other = tmp_path / "other"  # another run's shard (same settings, other inputs) copied in
    tiny_model.encode_to_shards([f"x{i}" for i in range(23)], other, role="document", shard_size=5)
    for suffix in ("npy", "json"):
        shutil.copy(other / f"shard-00001.{suffix}", shards / f"shard-00001.{suffix}")
    with pytest.raises(ValueError, match="shard-00001.json records other inputs than manifest.json"):
        read_shards(shards)
    with pytest.raises(ValueError, match="shard 1 was made from other inputs"):
        tiny_model.encode_to_shards(DOCS, shards, role="document", shard_size=5)


def test_an_image_changed_under_the_same_path_is_other_inputs(tiny_model, tmp_path):
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"img{i}.png")
        Image.new("RGB", (40, 30), (60 * i, 20, 20)).save(paths[-1])
    items = [{"image": str(p)} for p in paths]
    tiny_model.encode_to_shards(items, tmp_path / "embs", role="document", shard_size=2)
    Image.new("RGB", (40, 30), (255, 255, 255)).save(paths[3])
    os.utime(paths[3], ns=(1, 1))  # a different content, whatever the clock
    with pytest.raises(ValueError, match="shard 1 was made from other inputs"):
        tiny_model.encode_to_shards(items, tmp_path / "embs", role="document", shard_size=2)


# ---------------------------------------------------------------------------------- failures leave no temporary file

def full_disk_on(name: str, monkeypatch):
    """Writes to a file called ``name`` fail half-way with ENOSPC, as on a full disk."""
    real = writing.atomic_write_bytes

    def write(path, data):
        if Path(path).name != name:
            return real(path, data)

        def half(handle):
            payload = data if isinstance(data, bytes) else b"x" * 4096
            handle.write(payload[:len(payload) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, half)
    monkeypatch.setattr(encoding, "atomic_write_bytes", write)
    monkeypatch.setattr(writing, "atomic_write_bytes", write)


def test_a_full_disk_leaves_no_temporary_file_and_the_run_resumes(tiny_model, expected, tmp_path, monkeypatch):
    target = tmp_path / "scores.json"
    target.write_text("old")

    def half_then_full(handle):
        handle.write(b"new, half")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match=f"cannot write {target}: No space left on device"):
        atomic_write_bytes(target, half_then_full)
    assert target.read_text() == "old" and leftovers(tmp_path) == []
    out = tmp_path / "embs"
    full_disk_on("shard-00002.npy", monkeypatch)
    with pytest.raises(OSError) as full:
        tiny_model.encode_to_shards(DOCS, out, role="document", shard_size=5)
    assert full.value.errno == errno.ENOSPC and "shard-00002.npy" in str(full.value)
    assert leftovers(out) == [] and sorted(p.name for p in out.glob("shard-*.json")) == \
        ["shard-00000.json", "shard-00001.json"]
    monkeypatch.undo()
    assert tiny_model.encode_to_shards(DOCS, out, role="document", shard_size=5)["encoded_now"] == 13
    np.testing.assert_allclose(read_shards(out), expected, atol=1e-6)


def test_a_single_npy_output_keeps_its_work_on_failure(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": f"passage {i}"}) for i in range(8)]
    corpus.write_text("\n".join(lines[:7] + [json.dumps({"text": "x", "imag": "y.png"})]) + "\n")
    out = tmp_path / "all.npy"
    args = ["encode", "--input", str(corpus), "--model", "tiny-instruct", "--role", "document", "--output", str(out),
            "--shard_size", "3"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "input 7: unknown keys ['imag']" in err and f"finished shards are kept in {out}.partial" in err
    assert not out.exists() and len(list((tmp_path / "all.npy.partial").glob("shard-*.json"))) == 2
    written = []
    real_write = encoding._write_shard
    monkeypatch.setattr(encoding, "_write_shard", lambda output, index, *a: (written.append(index),
                                                                            real_write(output, index, *a)))
    corpus.write_text("\n".join(lines) + "\n")
    full_disk_on("all.npy", monkeypatch)  # then the disk fills up as the .npy is written
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "kept in" in err and "Traceback" not in err
    assert written == [2] and not out.exists() and leftovers(tmp_path) == []
    monkeypatch.setattr(writing, "atomic_write_bytes", atomic_write_bytes)
    assert cli_main(args) == 0
    assert written == [2] and not (tmp_path / "all.npy.partial").exists()  # resumed: nothing encoded again
    from tte_flash import TTEFlashModel
    expected = TTEFlashModel.from_preset("tiny-instruct").encode_document([f"passage {i}" for i in range(8)])
    np.testing.assert_allclose(np.load(out), expected, atol=1e-6)


# ---------------------------------------------------------------------------------- MMEB-V2 results and caches

@pytest.fixture(scope="module")
def mmeb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmeb_v2")
    build_fixture(root)
    return root


TASKS = ["ImageNet-1K", "MSCOCO_t2i"]


def test_an_mmeb_cache_zeroed_or_permuted_and_an_edited_score_are_recomputed(mmeb_root, tmp_path, caplog):
    first = mmeb.run_benchmark(IdModel(ORACLE), mmeb_root, tmp_path, tasks=TASKS, think_tokens=[0])[0]
    cache = tmp_path / ".cache" / "ImageNet-1K.candidates.pt"
    stored = torch.load(cache, weights_only=True)
    assert stored["rows"] == 9 and len(stored["sha256"]) == 64
    for damage in (lambda e: e[torch.randperm(len(e), generator=torch.Generator().manual_seed(0))],
                   torch.zeros_like):
        torch.save({**stored, "embeddings": damage(stored["embeddings"])}, cache)
        model = IdModel(ORACLE)
        with caplog.at_level(logging.WARNING, logger="tte_flash.mmeb"):
            again = mmeb.run_benchmark(model, mmeb_root, tmp_path, tasks=TASKS, think_tokens=[0, 4])[4]
        assert model.document_calls == 1 and f"ignoring the embedding cache {cache}" in caplog.text
        assert "do not match their SHA-256" in caplog.text and again["aggregate"] == first["aggregate"]
        shutil.rmtree(tmp_path / "k4")  # K=4 computed afresh next time
        caplog.clear()
    score = tmp_path / "k0" / "image" / "ImageNet-1K_score.json"
    edited = json.loads(score.read_text())
    score.write_text(json.dumps({**edited, "score": 5.0, "hit@1": 5.0}))
    model = IdModel(ORACLE)
    with caplog.at_level(logging.WARNING, logger="tte_flash.mmeb"):
        again = mmeb.run_benchmark(model, mmeb_root, tmp_path, tasks=TASKS, think_tokens=[0])[0]
    assert caplog.text.count(f"{score} does not match the SHA-256 written in it") == 1
    assert again["tasks"]["ImageNet-1K"]["score"] == pytest.approx(2 / 3) and model.query_budgets == [0]
    assert again["aggregate"] == first["aggregate"] and leftovers(tmp_path) == []
    model = IdModel(ORACLE)  # --overwrite recomputes everything, the cached candidates included
    mmeb.run_benchmark(model, mmeb_root, tmp_path, tasks=TASKS, think_tokens=[0], overwrite=True)
    assert model.document_calls == 2


def test_mmeb_results_follow_the_data_root_and_its_content(mmeb_root, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(mmeb_root / "image-tasks" / "ImageNet-1K", root / "image-tasks" / "ImageNet-1K")
    out = tmp_path / "out"
    first = mmeb.run_benchmark(IdModel(ORACLE), root, out, tasks=["ImageNet-1K"])
    assert first["tasks"]["ImageNet-1K"]["score"] == pytest.approx(2 / 3)
    assert first["fingerprint"]["data_root"] == str(root.resolve())
    other = tmp_path / "other-data"  # another --data_root into the same --output: never read back
    shutil.copytree(root, other)
    with pytest.raises(ValueError, match="another model or setting"):
        mmeb.run_benchmark(IdModel(ORACLE), other, out, tasks=["ImageNet-1K"])
    _png(root / "image-tasks" / "ImageNet-1K" / "q1.png", 11)  # query 1 now shows its positive: same path
    model = IdModel(ORACLE)
    with caplog.at_level(logging.WARNING, logger="tte_flash.mmeb"):
        again = mmeb.run_benchmark(model, root, out, tasks=["ImageNet-1K"])
    assert "inputs under" in caplog.text and "changed since it was scored" in caplog.text
    assert again["tasks"]["ImageNet-1K"]["score"] == pytest.approx(1.0) and not again["tasks"]["ImageNet-1K"]["resumed"]
    assert model.document_calls == 0  # the candidates (label texts) did not change: their cache still holds


def test_a_full_disk_during_an_mmeb_run_is_one_line(mmeb_root, tmp_path, monkeypatch, capsys):
    from tte_flash import evaluate
    full_disk_on("summary.json", monkeypatch)
    monkeypatch.setattr(mmeb, "atomic_write_bytes", writing.atomic_write_bytes)  # the failing one
    args = ["--benchmark", "mmeb-v2", "--model", "tiny", "--data_root", str(mmeb_root), "--output", str(tmp_path),
            "--tasks", "ImageNet-1K", "--batch_size", "4"]
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert leftovers(tmp_path) == []
