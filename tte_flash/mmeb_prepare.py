"""Prepare a local copy of MMEB-V2 in the layout :mod:`tte_flash.mmeb` reads (docs/mmeb.md, "Layout of --data_root").

    python -m tte_flash.mmeb_prepare --data_root DATA_ROOT --check              # what is there, what is missing
    python -m tte_flash.mmeb_prepare --data_root DATA_ROOT --tasks ImageNet-1K MSR-VTT   # download what is missing

Each task needs its **test file** (a Hub dataset: ``ziyjiang/MMEB_Test_Instruct`` for the 36 image tasks, one
repository per video and visual-document task) and its **media** (the archives of ``TIGER-Lab/MMEB-V2``, unpacked
as VLM2Vec's ``experiments/public/data/download_data.sh`` unpacks them). With a network, what is missing is
downloaded with ``huggingface_hub.snapshot_download`` (only the files the chosen tasks need) and unpacked in
place; without one (``--check``, ``HF_HUB_OFFLINE=1``, or a failed download), every missing piece is named with
the command that fetches it, and the exit status is 1.

Nothing here runs code from a download: archives are unpacked with ``tarfile``'s ``data`` filter (no links
out of the folder, no devices, no absolute paths).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .mmeb_data import MissingTask, Task, annotation_files, select_tasks


MEDIA_REPO = "TIGER-Lab/MMEB-V2"
IMAGE_TEST_REPO = "ziyjiang/MMEB_Test_Instruct"  # what VLM2Vec's image parsers load (DATASET_HF_PATH)
# Hub repositories of the video / visual-document test files whose name is not the folder's (docs/mmeb.md)
HUB_EXCEPTIONS = {"YouCook2": "lmms-lab/YouCook2", "ViDoSeek-page": "VLM2Vec/ViDoSeek-page-fixed",
                  "ViDoSeek-doc": "VLM2Vec/ViDoSeek", "MMLongBench-page": "VLM2Vec/MMLongBench-page-fixed",
                  "MMLongBench-doc": "VLM2Vec/MMLongBench-doc"}
# The media archives of TIGER-Lab/MMEB-V2 and how VLM2Vec unpacks them: (files, folder to unpack into)
MEDIA_ARCHIVES = {
    "image": ((("image-tasks/mmeb_v1.tar.gz",), "image-tasks"),),
    "video_cls": ((("video-tasks/frames/video_cls.tar.gz",), "video-tasks/frames/video_cls"),),
    "video_ret": ((("video-tasks/frames/video_ret.tar.gz",), "video-tasks/frames/video_ret"),),
    "video_mret": ((("video-tasks/frames/video_mret.tar.gz",), "video-tasks/frames"),),
    "video_qa": ((tuple(f"video-tasks/frames/video_qa.tar.gz-0{i}" for i in range(5)), "video-tasks/frames"),),
}


def hub_source(task: Task) -> str:
    """The Hub dataset repository of ``task``'s test file."""
    if task.modality == "image":
        return IMAGE_TEST_REPO
    if task.name in HUB_EXCEPTIONS:
        return HUB_EXCEPTIONS[task.name]
    folder = task.annotation[0].split("/", 1)[1]
    if task.name.startswith("ViDoRe_"):
        return f"vidore/{folder}"
    if task.name.startswith("VisRAG_"):
        return f"openbmb/{folder}"
    return f"VLM2Vec/{folder}"


def media_group(task: Task) -> str | None:
    """The MMEB-V2 archive group holding ``task``'s media (None: visual documents, whose pages may also be the
    corpus file's ``image`` column)."""
    if task.modality == "image":
        return "image"
    if task.modality == "video":
        return task.media.split("/")[2]  # video-tasks/frames/<group>/<name>
    return None


@dataclass
class Missing:
    task: str
    what: str       # "test file" | "media"
    repo: str
    patterns: tuple  # allow_patterns of the download (None: the whole repository)
    local_dir: str   # relative to the data root
    hint: str        # the command that fetches it

    def line(self) -> str:
        return f"{self.task}: {self.what} missing -> {self.hint}"


def test_file_download(task: Task) -> Missing:
    repo = hub_source(task)
    if task.modality == "image":  # one repository, one config folder per task: fetch the task's folder only
        patterns, local = (f"{task.name}/*",), "image-tasks"
    else:
        patterns, local = None, task.annotation[0]
    include = f" --include '{patterns[0]}'" if patterns else ""
    return Missing(task.name, "test file", repo, patterns, local,
                   f"hf download {repo} --repo-type dataset{include} --local-dir DATA_ROOT/{local}")


def _has_media(root: Path, task: Task) -> bool:
    if task.modality == "image":  # image-tasks/<task>/ holds the images beside the test file
        folder = root / "image-tasks" / task.name
        return folder.is_dir() and any(p.suffix.lower() != ".parquet" for p in folder.rglob("*") if p.is_file())
    folder = root / task.media
    return folder.is_dir() and any(folder.iterdir())


def missing_pieces(data_root, tasks: list[Task], media: bool = True) -> list[Missing]:
    """What each task lacks under ``data_root`` (an empty list: everything is there)."""
    root = Path(data_root)
    out = []
    for task in tasks:
        parts = ("queries", "qrels", "corpus") if task.modality == "visdoc" else (None,)
        try:
            for part in parts:
                annotation_files(root, task, part)
        except MissingTask:
            out.append(test_file_download(task))
        group = media_group(task)
        if media and group and not _has_media(root, task):
            files, into = MEDIA_ARCHIVES[group][0]
            out.append(Missing(task.name, "media", MEDIA_REPO, files, into,
                               f"hf download {MEDIA_REPO} {' '.join(files)} --repo-type dataset "
                               f"--local-dir DATA_ROOT, then unpack into DATA_ROOT/{into}"))
    return out


def _safe_extract(archive: tarfile.TarFile, into: Path):
    into.mkdir(parents=True, exist_ok=True)
    archive.extractall(into, filter="data")  # refuses absolute paths, links out of `into`, devices


class _Joined:
    """Several split archive parts read as one stream (``cat part-00 part-01 ... | tar -xz``)."""

    def __init__(self, paths):
        self.files = [open(p, "rb") for p in paths]

    def read(self, n=-1):
        out = bytearray()
        while self.files and (n < 0 or len(out) < n):
            chunk = self.files[0].read(-1 if n < 0 else n - len(out))
            if chunk:
                out += chunk
            else:
                self.files.pop(0).close()
        return bytes(out)

    def close(self):
        for f in self.files:
            f.close()


def unpack(root: Path, files, into: str):
    """Unpack downloaded MMEB-V2 archive parts as VLM2Vec's download script does."""
    paths = [root / f for f in files]
    stream = _Joined(paths)
    try:
        with tarfile.open(fileobj=stream, mode="r|gz") as archive:
            _safe_extract(archive, root / into)
    finally:
        stream.close()
    nested = root / into / "MMEB"  # image-tasks: VLM2Vec's `mv MMEB/* .`, merged into what is there
    if into == "image-tasks" and nested.is_dir():
        for item in nested.iterdir():
            if item.is_dir():
                shutil.copytree(item, root / into / item.name, dirs_exist_ok=True)
            else:
                shutil.copy2(item, root / into / item.name)
        shutil.rmtree(nested)


def download(root: Path, pieces: list[Missing]) -> list[str]:
    """Fetch ``pieces`` (grouped: one call per repository and folder); returns the errors, one line each."""
    from huggingface_hub import snapshot_download

    errors, done = [], set()
    for piece in pieces:
        key = (piece.repo, piece.patterns, piece.local_dir)
        if key in done:
            continue
        done.add(key)
        try:
            if piece.what == "media":
                snapshot_download(piece.repo, repo_type="dataset", allow_patterns=list(piece.patterns),
                                  local_dir=root)
                unpack(root, piece.patterns, piece.local_dir)
            else:
                snapshot_download(piece.repo, repo_type="dataset", local_dir=root / piece.local_dir,
                                  allow_patterns=list(piece.patterns) if piece.patterns else None)
        except Exception as error:  # a network or Hub error: name it, go on with the others
            errors.append(f"{piece.repo} ({piece.what} of {piece.task}): {type(error).__name__}: {error}")
    return errors


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tte_flash.mmeb_prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--data_root", "--data-root", required=True)
    parser.add_argument("--tasks", nargs="+", default=None, help="task names or modalities (default: all 78)")
    parser.add_argument("--check", action="store_true", help="only say what is missing (no download)")
    parser.add_argument("--no_media", "--no-media", action="store_true", help="test files only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        tasks = select_tasks(args.tasks)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    root = Path(args.data_root)
    pieces = missing_pieces(root, tasks, media=not args.no_media)
    if pieces and not args.check and not _offline():
        root.mkdir(parents=True, exist_ok=True)
        for line in download(root, pieces):
            print(f"download failed: {line}", file=sys.stderr)
        pieces = missing_pieces(root, tasks, media=not args.no_media)
    complete = len(tasks) - len({p.task for p in pieces})
    print(f"{complete} of {len(tasks)} tasks complete under {root}")
    for piece in pieces:
        print(f"  {piece.line()}")
    if pieces and (args.check or _offline()):
        print("(no download attempted: --check or HF_HUB_OFFLINE=1)")
    return 1 if pieces else 0


if __name__ == "__main__":
    sys.exit(main())
