"""Preparing a local MMEB-V2 copy (tte_flash.mmeb_prepare): Hub sources, what is missing, the MMEB_Test_Instruct
layouts, downloads (a fake Hub: no network here) and safe unpacking."""
import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tte_flash import mmeb_data, mmeb_prepare
from tte_flash.mmeb_data import TASKS

ROOT = Path(__file__).resolve().parent.parent
IMAGE_ROW = {"qry_inst": "<|image_1|> Represent the given image for classification", "qry_text": "",
             "qry_img_path": "ImageNet-1K/val/a.png", "tgt_inst": "", "tgt_text": ["cat", "dog"], "tgt_img_path": ["", ""]}


def _parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _targz(members: dict) -> bytes:
    """A .tar.gz with ``{name: bytes}``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _png_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (200, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


def test_hub_sources_are_the_documented_ones():
    documented = {}
    for line in (ROOT / "docs/mmeb.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[2] in TASKS:
            documented[cells[2]] = cells[7]
    assert len(documented) == 78
    assert {name: mmeb_prepare.hub_source(task) for name, task in TASKS.items()} == documented


def test_an_empty_root_misses_every_test_file_and_the_media(tmp_path):
    pieces = mmeb_prepare.missing_pieces(tmp_path, list(TASKS.values()))
    tests = {p.task for p in pieces if p.what == "test file"}
    media = {p.task for p in pieces if p.what == "media"}
    assert tests == set(TASKS)
    assert media == {t.name for t in TASKS.values() if t.modality != "visdoc"}  # pages may be in the corpus file
    by_task = {(p.task, p.what): p for p in pieces}
    assert by_task["ImageNet-1K", "test file"].hint == ("hf download ziyjiang/MMEB_Test_Instruct --repo-type dataset "
                                                        "--include 'ImageNet-1K/*' --local-dir DATA_ROOT/image-tasks")
    assert by_task["MVBench", "media"].patterns == tuple(f"video-tasks/frames/video_qa.tar.gz-0{i}" for i in range(5))
    assert by_task["HMDB51", "media"].local_dir == "video-tasks/frames/video_cls"


@pytest.mark.parametrize("layout", ["image-tasks/ImageNet-1K/test-00000-of-00001.parquet",  # the repo into image-tasks/
                                    "image-tasks/ImageNet-1K/ImageNet-1K/test-00000-of-00001.parquet",  # into the task folder
                                    "image-tasks/ImageNet-1K/test/0000.parquet",  # the Hub's parquet conversion
                                    "image-tasks/ImageNet-1K/ImageNet-1K/test/0000.parquet"])
def test_mmeb_test_instruct_layouts_are_found(tmp_path, layout):
    _parquet(tmp_path / layout, [IMAGE_ROW])
    # the whole repository in the task's folder brings the other tasks' folders too: not ambiguous
    _parquet(tmp_path / "image-tasks/ImageNet-1K/N24News/test-00000-of-00001.parquet", [{"x": 1}])
    files = mmeb_data.annotation_files(tmp_path, TASKS["ImageNet-1K"])
    assert files == [tmp_path / layout]
    assert mmeb_data.read_rows(files)[0]["qry_img_path"] == "ImageNet-1K/val/a.png"


class FakeHub:
    """snapshot_download against an in-memory Hub: {repo: {path: bytes}}; records the calls."""

    def __init__(self, repos):
        self.repos, self.calls = repos, []

    def __call__(self, repo_id, repo_type=None, local_dir=None, allow_patterns=None):
        import fnmatch
        assert repo_type == "dataset"
        self.calls.append((repo_id, tuple(allow_patterns or ()), Path(local_dir)))
        if repo_id not in self.repos:
            raise OSError(f"404 {repo_id}")
        for path, data in self.repos[repo_id].items():
            if allow_patterns is None or any(fnmatch.fnmatch(path, p) for p in allow_patterns):
                target = Path(local_dir) / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        return str(local_dir)


def _parquet_bytes(rows):
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def test_download_fetches_only_what_is_missing_and_unpacks_as_vlm2vec(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    video_qa = _targz({"video_qa/MVBench/clip1/0001.png": _png_bytes()})
    parts = [video_qa[i * len(video_qa) // 5:(i + 1) * len(video_qa) // 5] for i in range(5)]
    hub = FakeHub({
        "ziyjiang/MMEB_Test_Instruct": {"ImageNet-1K/test-00000-of-00001.parquet": _parquet_bytes([IMAGE_ROW]),
                                        "N24News/test-00000-of-00001.parquet": _parquet_bytes([IMAGE_ROW])},
        "TIGER-Lab/MMEB-V2": {"image-tasks/mmeb_v1.tar.gz": _targz({"MMEB/ImageNet-1K/val/a.png": _png_bytes()}),
                              **{f"video-tasks/frames/video_qa.tar.gz-0{i}": p for i, p in enumerate(parts)}},
        "VLM2Vec/MVBench": {"action_sequence/train-00000-of-00001.parquet": _parquet_bytes([{"q": 1}])},
    })
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    rc = mmeb_prepare.main(["--data_root", str(tmp_path), "--tasks", "ImageNet-1K", "MVBench"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "2 of 2 tasks complete" in out
    assert (tmp_path / "image-tasks/ImageNet-1K/val/a.png").is_file()  # MMEB/* moved up
    assert not (tmp_path / "image-tasks/MMEB").exists()
    assert not (tmp_path / "image-tasks/N24News").exists()  # only the chosen task's folder was fetched
    assert (tmp_path / "video-tasks/frames/video_qa/MVBench/clip1/0001.png").is_file()  # 5 parts joined
    assert mmeb_data.read_rows(mmeb_data.annotation_files(tmp_path, TASKS["ImageNet-1K"]))[0]["tgt_text"] == ["cat", "dog"]
    calls = len(hub.calls)
    assert mmeb_prepare.main(["--data_root", str(tmp_path), "--tasks", "ImageNet-1K", "MVBench"]) == 0
    assert len(hub.calls) == calls  # complete: nothing fetched again


def test_failed_or_offline_downloads_name_what_is_missing(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    hub = FakeHub({})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert mmeb_prepare.main(["--data_root", str(tmp_path), "--tasks", "MSR-VTT", "--no_media"]) == 1
    captured = capsys.readouterr()
    assert "download failed: VLM2Vec/MSR-VTT (test file of MSR-VTT): OSError: 404 VLM2Vec/MSR-VTT" in captured.err
    assert "MSR-VTT: test file missing -> hf download VLM2Vec/MSR-VTT" in captured.out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = len(hub.calls)
    assert mmeb_prepare.main(["--data_root", str(tmp_path), "--tasks", "video:RET"]) == 1
    assert len(hub.calls) == calls  # offline: no attempt
    out = capsys.readouterr().out
    assert "0 of 5 tasks complete" in out and "no download attempted" in out
    assert mmeb_prepare.main(["--data_root", str(tmp_path), "--tasks", "NoSuchTask"]) == 2


def test_an_archive_reaching_outside_its_folder_is_refused(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    evil = _targz({"../../escaped.txt": b"x", "MMEB/ImageNet-1K/a.png": _png_bytes()})
    hub = FakeHub({"TIGER-Lab/MMEB-V2": {"image-tasks/mmeb_v1.tar.gz": evil},
                   "ziyjiang/MMEB_Test_Instruct": {"ImageNet-1K/test-00000-of-00001.parquet": _parquet_bytes([IMAGE_ROW])}})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    root = tmp_path / "data"
    assert mmeb_prepare.main(["--data_root", str(root), "--tasks", "ImageNet-1K"]) == 1
    assert not (tmp_path / "escaped.txt").exists() and not (root / "escaped.txt").exists()
    assert "OutsideDestinationError" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- VLM2Vec's prompt joining

def _image_task_root(root: Path):
    """One row per image parser, in MMEB_Test_Instruct's columns."""
    for name in ("a.png", "b.png", "c.png"):
        path = root / "image-tasks" / "imgs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (28, 28), (10, 20, 30)).save(path)
    inst = "<|image_1|> Represent the given image with the following question:"
    rows = {
        "ImageNet-1K": {"qry_inst": "<|image_1|> Represent the given image for classification\n", "qry_text": "",
                        "qry_img_path": "imgs/a.png", "tgt_inst": "", "tgt_text": ["cat", "dog"], "tgt_img_path": ["", ""]},
        "OK-VQA": {"qry_inst": inst, "qry_text": "What is it?", "qry_img_path": "imgs/a.png", "tgt_inst": "",
                   "tgt_text": ["a cat", "a dog"], "tgt_img_path": ["", ""]},
        "MSCOCO_t2i": {"qry_inst": "Find me an everyday image that matches the given caption:", "qry_text": "A cat.",
                       "qry_img_path": "", "tgt_inst": "<|image_1|> Represent the given image.",
                       "tgt_text": [""], "tgt_img_path": ["imgs/b.png"]},
        "CIRR": {"qry_inst": "<|image_1|> Given an image, find a similar everyday image with the described changes:",
                 "qry_text": "make it red", "qry_img_path": "imgs/a.png", "tgt_inst": "<|image_1|> Represent the given image.",
                 "tgt_text": ["", ""], "tgt_img_path": ["imgs/b.png", "imgs/c.png"]},
        "MSCOCO": {"qry_inst": "<|image_1|> Select the portion of the image that isolates the object:",
                   "qry_text": "\"the cat\"", "qry_img_path": "imgs/a.png", "tgt_inst": "<|image_1|> Represent the given cropped image of the object.",
                   "tgt_text": ["the cat"], "tgt_img_path": ["imgs/c.png"]},
    }
    for task, row in rows.items():
        _parquet(root / "image-tasks" / task / "test-00000-of-00001.parquet", [row])


def test_vlm2vec_prompt_joining_of_the_image_tasks(tmp_path):
    _image_task_root(tmp_path)
    # what VLM2Vec's image parsers build for a Qwen2-VL backbone (its image token written as <|image_1|>), by hand
    expected = {
        "ImageNet-1K": ("<|image_1|>  Represent the given image for classification\n\n", {"cat": "cat", "dog": "dog"}),
        "OK-VQA": ("<|image_1|>\nRepresent the given image with the following question: What is it?\n",
                   {"a cat": "a cat", "a dog": "a dog"}),
        "MSCOCO_t2i": ("Find me an everyday image that matches the given caption: A cat.\n",
                       {"imgs/b.png": "<|image_1|>  Represent the given image.\n"}),
        "CIRR": ("<|image_1|>\nGiven an image, find a similar everyday image with the described changes: make it red\n",
                 {"imgs/b.png:": "<|image_1|>  Represent the given image.",
                  "imgs/c.png:": "<|image_1|>  Represent the given image."}),
        "MSCOCO": ("<|image_1|>\nSelect the portion of the image that isolates the object: \"the cat\"\n",
                   {"imgs/c.png:the cat": "<|image_1|>  Represent the given cropped image of the object. the cat\n"}),
    }
    for task, (query, candidates) in expected.items():
        data = mmeb_data.load_task(TASKS[task], tmp_path, prompts="vlm2vec")
        assert data.queries[0]["text"] == query, task
        assert {k: v["text"] for k, v in data.candidates.items()} == candidates, task
        ours = mmeb_data.load_task(TASKS[task], tmp_path)  # the default joins with one space, no image token
        assert "\n" not in ours.queries[0]["text"] and "<|image_1|>" not in ours.queries[0]["text"]
        assert [q.get("image") for q in ours.queries] == [q.get("image") for q in data.queries]
    with pytest.raises(ValueError, match="prompts must be"):
        mmeb_data.load_task(TASKS["OK-VQA"], tmp_path, prompts="gme")


def test_prompts_option_of_the_runner(tmp_path, capsys):
    import json

    import torch

    from tte_flash import mmeb
    _image_task_root(tmp_path / "data")
    common = ["--model", "tiny", "--data_root", str(tmp_path / "data"), "--tasks", "OK-VQA", "CIRR", "--batch_size", "4"]
    args = [*common, "--output", str(tmp_path / "out")]
    torch.manual_seed(0)
    assert mmeb.main(["--prompts", "vlm2vec", *args]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["fingerprint"]["prompts"] == "vlm2vec"
    assert {r["status"] for r in summary["tasks"].values()} == {"done"}
    capsys.readouterr()
    torch.manual_seed(0)  # the same weights, the default prompts: another setting, refused, nothing overwritten
    assert mmeb.main(args) == 2 and "another model or setting" in capsys.readouterr().err
    torch.manual_seed(0)
    assert mmeb.main([*common, "--output", str(tmp_path / "tte")]) == 0
    default = json.loads((tmp_path / "tte" / "summary.json").read_text())
    assert "prompts" not in default["fingerprint"]  # fingerprints of earlier runs are unchanged
