"""MMEB-V2's tasks and how each is read from a local copy (VLM2Vec's layout, docs/mmeb.md): the registry of the
78 tasks with their categories, instructions and metric, and one loader per VLM2Vec parser producing queries,
candidates and graded relevance. Scoring and the benchmark runner are in :mod:`tte_flash.mmeb`."""
from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import itertools
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import iter_rows, load_rows
from .processing import IMAGE_PLACEHOLDER

logger = logging.getLogger("tte_flash.mmeb")


# ---------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Task:
    name: str          # VLM2Vec's dataset name (its yaml key and score file name)
    modality: str      # image | video | visdoc
    category: str      # meta-task the paper averages over
    parser: str        # loader below (VLM2Vec's dataset_parser)
    eval_type: str     # local: rank the query's own candidates; global: rank the whole pool
    annotation: tuple  # (dir under data_root, subset or None, split): where the test file lives
    media: str         # image_root / frame_root under data_root
    max_queries: int | None = None  # VLM2Vec's num_sample_per_subset: only the first N rows are evaluated

    @property
    def metric(self) -> str:
        return "ndcg_linear@5" if self.modality == "visdoc" else "hit@1"


CATEGORIES = {
    "image": ("CLS", "QA", "RET", "VG"),
    "video": ("CLS", "QA", "RET", "MRET"),
    "visdoc": ("VDRv1", "VDRv2", "VR", "OOD"),
}


def _image(category, parser, names):
    return [Task(n, "image", category, parser, "local", ("image-tasks", n, "test"), "image-tasks") for n in names]


def _video(category, parser, name, hf_dir, media, eval_type, subset=None, split="test", max_queries=None):
    return Task(name, "video", category, parser, eval_type, (f"video-tasks/{hf_dir}", subset, split),
                f"video-tasks/frames/{media}", max_queries)


def _visdoc(category, parser, name, hf_dir, media):
    return Task(name, "visdoc", category, parser, "global",
                (f"visdoc-tasks/{hf_dir}", None, "train" if parser == "visrag" else "test"), f"visdoc-tasks/{media}")


TASKS: dict[str, Task] = {t.name: t for t in [
    *_image("CLS", "image_cls", ["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365",
                                 "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"]),
    *_image("QA", "image_qa", ["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA",
                               "VizWiz", "GQA", "TextVQA"]),
    *_image("RET", "image_i2t", ["MSCOCO_i2t", "VisualNews_i2t"]),
    *_image("RET", "image_t2i", ["VisDial", "MSCOCO_t2i", "VisualNews_t2i", "WebQA", "EDIS", "Wiki-SS-NQ"]),
    *_image("RET", "image_i2i_vg", ["CIRR", "NIGHTS", "OVEN", "FashionIQ"]),
    *_image("VG", "image_i2i_vg", ["MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"]),
    _video("CLS", "ssv2", "SmthSmthV2", "SmthSmthV2", "video_cls/SSv2", "local", max_queries=1000),
    _video("CLS", "video_cls", "HMDB51", "HMDB51", "video_cls/HMDB51", "global"),
    _video("CLS", "video_cls", "UCF101", "UCF101", "video_cls/UCF101", "global"),
    _video("CLS", "video_cls", "K700", "Kinetics-700", "video_cls/K700", "global"),
    _video("CLS", "video_cls", "Breakfast", "Breakfast", "video_cls/Breakfast", "global"),
    _video("RET", "msrvtt", "MSR-VTT", "MSR-VTT", "video_ret/MSR-VTT", "global", subset="test_1k"),
    _video("RET", "msvd", "MSVD", "MSVD", "video_ret/MSVD", "global"),
    _video("RET", "didemo", "DiDeMo", "DiDeMo", "video_ret/DiDeMo", "global"),
    _video("RET", "youcook2", "YouCook2", "YouCook2", "video_ret/YouCook2", "global", split="val"),
    _video("RET", "vatex", "VATEX", "VATEX", "video_ret/VATEX", "global"),
    _video("MRET", "moment_retrieval", "QVHighlight", "QVHighlight", "video_mret/QVHighlight", "local"),
    _video("MRET", "moment_retrieval", "Charades-STA", "Charades-STA", "video_mret/Charades_STA", "local"),
    _video("MRET", "momentseeker", "MomentSeeker", "MomentSeeker", "video_mret/MomentSeeker", "local"),
    _video("QA", "videomme", "Video-MME", "Video-MME", "video_qa/Video-MME", "local"),
    _video("QA", "nextqa", "NExTQA", "NExTQA", "video_qa/NExTQA", "local", subset="MC"),
    _video("QA", "egoschema", "EgoSchema", "EgoSchema", "video_qa/EgoSchema", "local", subset="Subset"),
    _video("QA", "mvbench", "MVBench", "MVBench", "video_qa/MVBench", "local", split="train"),
    _video("QA", "activitynetqa", "ActivityNetQA", "ActivityNetQA", "video_qa/ActivityNetQA", "local"),
    *[_visdoc("VDRv1", "vidore", f"ViDoRe_{n}", hf, f"ViDoRe_{n}") for n, hf in [
        ("arxivqa", "arxivqa_test_subsampled_beir"), ("docvqa", "docvqa_test_subsampled_beir"),
        ("infovqa", "infovqa_test_subsampled_beir"), ("tabfquad", "tabfquad_test_subsampled_beir"),
        ("tatdqa", "tatdqa_test_beir"), ("shiftproject", "shiftproject_test_beir"),
        *[(f"syntheticDocQA_{d}", f"syntheticDocQA_{d}_test_beir")
          for d in ("artificial_intelligence", "energy", "government_reports", "healthcare_industry")]]],
    *[_visdoc("VDRv2", "vidore", f"ViDoRe_{n}", hf, n) for n, hf in [
        ("esg_reports_human_labeled_v2", "esg_reports_human_labeled_v2"),
        ("biomedical_lectures_v2_multilingual", "biomedical_lectures_v2"),
        ("economics_reports_v2_multilingual", "economics_reports_v2"),
        ("esg_reports_v2_multilingual", "esg_reports_v2")]],
    *[_visdoc("VR", "visrag", f"VisRAG_{n}", f"VisRAG-Ret-Test-{n}", f"VisRAG_{n}")
      for n in ("ArxivQA", "ChartQA", "MP-DocVQA", "SlideVQA", "InfoVQA", "PlotQA")],
    _visdoc("OOD", "vidore", "ViDoSeek-page", "ViDoSeek-page", "ViDoSeek-page"),
    _visdoc("OOD", "vidore", "ViDoSeek-doc", "ViDoSeek", "ViDoSeek-doc"),
    _visdoc("OOD", "vidore", "MMLongBench-page", "MMLongBench", "MMLongBench-page"),
    _visdoc("OOD", "vidore", "MMLongBench-doc", "MMLongBench-doc", "MMLongBench-doc"),
]}

# Query instructions of the video classification tasks (VLM2Vec video_classification_utils.py).
VIDEO_CLS_INSTRUCTION = {
    "K700": "Recognize the category of the video content.",
    "SmthSmthV2": "What actions or object interactions are being performed by the person in the video?",
    "UCF101": "What activities or sports are being performed by the person in the video?",
    "HMDB51": "What actions or objects interactions are the person in the video doing?",
    "Breakfast": "Recognize the breakfast type that the person is cooking in the video.",
}
VIDEO_RET_INSTRUCTION = {
    "MSR-VTT": "Find a video that contains the following visual content:",
    "MSVD": "Find the video snippet that corresponds to the given summary:",
    "DiDeMo": "Find a video that includes the following described scenes:",
    "YouCook2": "Find a video that demonstrates the following action while making a recipe:",
    "VATEX": "Select a video that fits the description provided:",
}
VIDEO_TARGET = "Understand the content of the provided video."
VIDEO_QA_PROMPT = ("Given a video and a question, select the most accurate answer from the provided candidates. "
                   "Return only the exact text of your chosen answer. Question:")
MOMENT_QUERY = "Find the clip that corresponds to the described scene in the given video:"
DOC_QUERY = "Find a document image that matches the given query:"
DOC_TARGET = "Understand the content of the provided document image."
MVBENCH_SUBSETS = ("episodic_reasoning", "action_sequence", "action_prediction", "action_antonym",
                   "fine_grained_action", "unexpected_action", "object_existence", "object_interaction",
                   "object_shuffle", "moving_direction", "action_localization", "scene_transition", "action_count",
                   "moving_count", "moving_attribute", "state_change", "fine_grained_pose", "character_order",
                   "egocentric_navigation", "counterfactual_inference")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


def select_tasks(names=None) -> list[Task]:
    """Tasks by name, modality (``image``/``video``/``visdoc``) or ``modality:category``; all by default."""
    if not names:
        return list(TASKS.values())
    chosen = []
    for name in names:
        if name in TASKS:
            picked = [TASKS[name]]
        else:
            modality, _, category = name.partition(":")
            picked = [t for t in TASKS.values() if t.modality == modality and (not category or t.category == category)]
        if not picked:
            folded = {t.lower(): t for t in TASKS}
            close = [folded[m] for m in difflib.get_close_matches(name.lower(), list(folded), n=3, cutoff=0.6)]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown MMEB-V2 task {name!r}{hint}: give a task name (e.g. ImageNet-1K, MSR-VTT, "
                             f"ViDoRe_arxivqa), a modality (image, video, visdoc) or modality:category (e.g. video:QA)")
        chosen += [t for t in picked if t not in chosen]
    return chosen


# ---------------------------------------------------------------------------------------- loading

class MissingTask(Exception):
    """The task's test file is not under data_root: reported, never scored as 0."""


@dataclass
class TaskData:
    queries: list[dict]                 # model inputs
    relevance: list[dict]               # per query: {candidate key: grade > 0}
    candidates: dict                    # candidate key -> model input (every candidate of the task)
    local: list[list] | None            # per query: its candidate keys (local tasks); None: rank all candidates
    notes: list[str]                    # what differs from VLM2Vec's run, if anything
    # VLM2Vec's view of the labels (its ``label_name`` / ``rel_scores``), for ``--scoring vlm2vec``; None: the
    # keys of ``relevance`` with binary grades. label_ids: per query [(the id as VLM2Vec holds it, our key)].
    label_ids: list[list[tuple]] | None = None
    grades: list[list] | None = None
    # load_task(vlm2vec=True): positives that are not among the listed candidates, kept as VLM2Vec keeps them
    misses: list[str] = field(default_factory=list)  # queries counted wrong (an MVBench answer no option has): why
    added: list[str] = field(default_factory=list)   # labels added to the pool (a label labels.txt lacks): why


def annotation_files(data_root, task: Task, part: str | None = None) -> list[Path]:
    """The test file(s) of ``task`` (``part``: ``queries``/``qrels``/``corpus`` of a visdoc task)."""
    directory, subset, split = task.annotation
    base = Path(data_root) / directory / (part or subset or "")
    # base/<task>: a multi-config repository (ziyjiang/MMEB_Test_Instruct) downloaded whole into the task's folder
    folders = [base, base / "data", base / split, base / task.name]
    if not (part or subset) and base.is_dir():  # one config folder of another name (e.g. a Hub download)
        configs = [d for d in base.iterdir() if d.is_dir() and any(d.glob(f"{split}-*.parquet"))]
        folders += configs if len(configs) == 1 else []
    for folder in folders:
        for pattern in (f"{split}-*.parquet", f"{split}.parquet", f"{split}.jsonl", f"{split}.json"):
            files = sorted(folder.glob(pattern)) if folder.is_dir() else []
            if files:
                return files
    for folder in (base / split, base / task.name / split):  # the Hub's parquet conversion: <split>/0000.parquet
        files = sorted(folder.glob("[0-9]*.parquet")) if folder.is_dir() else []
        if files:
            return files
    raise MissingTask(f"no test file for {task.name}: expected {base}/{split}-*.parquet (or {split}.jsonl) "
                      f"under --data_root (docs/mmeb.md lists each task's path)")


def read_rows(files) -> list[dict]:
    return [row for f in files for row in load_rows(f)]


def frames(folder, num_frames: int | None) -> list[str]:
    """Frame files of a folder in natural order, ``num_frames`` of them spread evenly (VLM2Vec's
    ``process_video_frames``: all when there are fewer)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"frame folder not found: {folder}")
    names = sorted((f for f in os.listdir(folder) if f.lower().endswith(FRAME_SUFFIXES)),
                   key=lambda n: [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", n)])
    if not names:
        raise FileNotFoundError(f"no frames (.jpg/.jpeg/.png) in {folder}")
    if num_frames and num_frames <= len(names):
        names = [names[i] for i in np.linspace(0, len(names) - 1, num_frames, dtype=int)]
    return [str(folder / n) for n in names]


def _media(path) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"media file not found: {path}")
    return str(path)


def _text(*parts) -> str:
    return " ".join(p.replace("<|image_1|>", "").strip() for p in parts if p and p.strip())


def _vlm2vec_query(task: Task, row: dict) -> str:
    """The query text of an image task as VLM2Vec's parsers join it for a Qwen2-VL backbone (its
    ``process_input_text`` + ``.replace(" \\n", "\\n") + "\\n"``), with ``<|image_1|>`` where its image token goes."""
    inst, text = row["qry_inst"] or "", row["qry_text"] or ""
    if task.parser == "image_t2i":  # no query image: the instruction keeps its own image token, if any
        return inst + " " + text + "\n"
    inst = inst.replace("<|image_1|>", "")
    if task.parser in ("image_qa", "image_i2i_vg"):  # these instructions start on a new line
        inst = "\n" + inst.strip()
    prompt = IMAGE_PLACEHOLDER + " " + inst + (" " + text if text else "")
    return prompt.replace(" \n", "\n") + "\n"


def _vlm2vec_candidate(task: Task, tgt_inst: str, caption: str) -> str:
    """An image candidate's text as VLM2Vec joins it (image_t2i / image_i2i_vg targets)."""
    tgt_inst = (tgt_inst or "").replace("<|image_1|>", "")
    if caption.strip():
        return (IMAGE_PLACEHOLDER + " " + tgt_inst + " " + caption).replace(" \n", "\n") + "\n"
    joined = (IMAGE_PLACEHOLDER + " " + tgt_inst).replace(" \n", "\n")
    return joined + "\n" if task.parser == "image_t2i" else joined  # i2i_vg omits it ("consistent with v1")


def _require(rows, columns, task):
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise ValueError(f"{task.name}: the test file lacks column(s) {missing} (has {sorted(rows[0])})")


def load_task(task: Task, data_root, num_frames: int = 8, limit: int | None = None, vlm2vec: bool = False,
              prompts: str = "tte") -> TaskData:
    """Queries, candidates and relevance of one task, read from ``data_root`` in VLM2Vec's layout.

    A query whose positive is not among the listed candidates (a video classification label missing from
    labels.txt, an MVBench answer not among the options) is a ``ValueError`` that fails the task, unless
    ``vlm2vec=True`` (for ``--scoring vlm2vec``): then the query is kept as VLM2Vec keeps it. VLM2Vec's pool
    of a global task starts with every query's own candidate names (``generate_cand_dataset``), so a
    missing video label becomes one more candidate (``TaskData.added``); an MVBench answer no option has is
    a query counted wrong (``TaskData.misses``). A warning and the task's notes give their number.

    ``prompts="vlm2vec"`` joins the image tasks' instructions and texts as VLM2Vec's parsers do for a Qwen2-VL
    backbone (image token first, QA/VG instructions on a new line, a trailing newline); the default ``"tte"``
    joins instruction and text with one space (what the TTE-Flash recipes train on). Other modalities: same."""
    if prompts not in ("tte", "vlm2vec"):
        raise ValueError(f"prompts must be 'tte' or 'vlm2vec', not {prompts!r}")
    loader = globals()[f"_load_{task.parser}"]
    limit = min(x for x in (limit, task.max_queries) if x) if (limit or task.max_queries) else None
    if loader in (_load_video_cls, _load_video_qa):
        data = loader(task, Path(data_root), num_frames, limit, vlm2vec=vlm2vec)
    elif loader is _load_image:
        data = loader(task, Path(data_root), num_frames, limit, prompts=prompts)
    else:
        data = loader(task, Path(data_root), num_frames, limit)
    for found, what in ((data.misses, "scored as misses: their answer is none of their options"),
                        (data.added, "have a label the label list lacks: added to the candidates")):
        if found:
            logger.warning("%s: %d of %d queries %s, as VLM2Vec does (the correct scoring fails the task); first: %s",
                           task.name, len(found), len(data.queries), what, found[0])
            data.notes.append(f"{len(found)} of {len(data.queries)} queries {what}, as VLM2Vec does "
                              f"(first: {found[0]})")
    return data


def _head(rows, limit):
    return rows[:limit] if limit else rows


def _load_image(task, root, num_frames, limit, prompts="tte"):
    """MMEB image rows (qry_inst, qry_text, qry_img_path, tgt_inst, tgt_text, tgt_img_path), positive first."""
    rows = _head(read_rows(annotation_files(root, task)), limit)
    _require(rows, ("qry_inst", "qry_text", "qry_img_path", "tgt_text"), task)
    media = root / task.media
    queries, relevance, local, candidates = [], [], [], {}
    for row in rows:
        query = {"text": _vlm2vec_query(task, row) if prompts == "vlm2vec" else _text(row["qry_inst"], row["qry_text"])}
        if task.parser != "image_t2i":
            query["image"] = _media(media / row["qry_img_path"])
        texts, paths = list(row["tgt_text"]), list(row.get("tgt_img_path") or [])
        keys = []
        if task.parser in ("image_cls", "image_qa", "image_i2t"):  # text candidates, named by their text
            for text in texts:
                candidates.setdefault(text, {"text": text})
                keys.append(text)
        else:  # image candidates (with the target instruction and, where given, a caption)
            captions = texts if texts and texts[0].strip() else [""] * len(paths)
            if len(captions) != len(paths):
                raise ValueError(f"{task.name}: a row has {len(paths)} tgt_img_path but {len(captions)} tgt_text")
            for path, caption in zip(paths, captions):
                key = path if task.parser == "image_t2i" else f"{path}:{caption.strip(chr(34))}"
                text = _vlm2vec_candidate(task, row.get("tgt_inst"), caption) if prompts == "vlm2vec" else \
                    _text(row.get("tgt_inst") or "", caption) or None
                candidates.setdefault(key, {"text": text, "image": _media(media / path)})
                keys.append(key)
        queries.append(query)
        local.append(keys)
        relevance.append({keys[0]: 1})
    for item in candidates.values():
        if item.get("text") is None:
            item.pop("text")
    return TaskData(queries, relevance, candidates, local, [])


_load_image_cls = _load_image_qa = _load_image_i2t = _load_image_t2i = _load_image_i2i_vg = _load_image


def _load_video_cls(task, root, num_frames, limit, vlm2vec=False):
    """video_id, pos_text; every query ranks every label of the task (labels.txt/json, else those in the file)."""
    directory = Path(root) / task.annotation[0]
    all_rows = read_rows(annotation_files(root, task))
    rows = _head(all_rows, limit)
    _require(rows, ("video_id", "pos_text"), task)
    notes = []
    label_file = next((directory / n for n in ("labels.json", "labels.txt") if (directory / n).is_file()), None)
    if label_file is not None:
        text = label_file.read_text(encoding="utf-8")
        labels = json.loads(text) if label_file.suffix == ".json" else [x for x in text.splitlines() if x.strip()]
    else:
        labels = list(dict.fromkeys(str(r["pos_text"]) for r in all_rows))
        notes.append(f"label set: the {len(labels)} labels of the test file ({directory}/labels.txt absent); "
                     f"VLM2Vec ranks its fixed list of every class")
    candidates = {label: {"text": label} for label in labels}
    queries, relevance, missed = [], [], []
    for row in rows:
        label = str(row["pos_text"])
        if label not in candidates:
            problem = f"{task.name}: label {label!r} of video {row['video_id']} is not in {label_file}"
            if not vlm2vec:
                raise ValueError(problem)
            missed.append(problem)
            candidates[label] = {"text": label}  # VLM2Vec's pool: the queries' labels, then the label list
        queries.append({"text": VIDEO_CLS_INSTRUCTION[task.name],
                        "video": frames(root / task.media / str(row["video_id"]), num_frames)})
        relevance.append({label: 1})
    return TaskData(queries, relevance, candidates, None, notes, added=missed)


def _load_ssv2(task, root, num_frames, limit):
    """video_id, pos_text, neg_text (the query's candidate labels)."""
    rows = _head(read_rows(annotation_files(root, task)), limit)
    _require(rows, ("video_id", "pos_text", "neg_text"), task)
    queries, relevance, local, candidates = [], [], [], {}
    for row in rows:
        queries.append({"text": VIDEO_CLS_INSTRUCTION[task.name],
                        "video": frames(root / task.media / str(row["video_id"]), num_frames)})
        keys = [str(t) for t in row["neg_text"]]
        candidates.update({k: {"text": k} for k in keys})
        local.append(keys)
        relevance.append({str(row["pos_text"]): 1})
    return TaskData(queries, relevance, candidates, local, [])


_RET_COLUMNS = {  # parser: (video name column, caption column); a list of captions -> the first
    "msrvtt": ("video_id", "caption"), "msvd": ("video_id", "caption"), "didemo": ("video", "caption"),
    "youcook2": ("id", "sentence"), "vatex": ("videoID", "enCap")}


def _load_video_ret(task, root, num_frames, limit):
    """Text-to-video retrieval against every video of the test file."""
    rows = _head(read_rows(annotation_files(root, task)), limit)
    name_column, caption_column = _RET_COLUMNS[task.parser]
    _require(rows, (name_column, caption_column), task)
    queries, relevance, candidates = [], [], {}
    for row in rows:
        name = str(row[name_column])
        if task.parser == "didemo":
            name = os.path.splitext(os.path.basename(name))[0]
        caption = row[caption_column]
        caption = caption[0] if isinstance(caption, (list, tuple)) else caption
        queries.append({"text": _text(VIDEO_RET_INSTRUCTION[task.name], caption)})
        if name not in candidates:
            candidates[name] = {"text": VIDEO_TARGET, "video": frames(root / task.media / name, num_frames)}
        relevance.append({name: 1})
    return TaskData(queries, relevance, candidates, None, [])


_load_msrvtt = _load_msvd = _load_didemo = _load_youcook2 = _load_vatex = _load_video_ret


def _load_moment_retrieval(task, root, num_frames, limit):
    """query, video_path; frames in <frame_root>/<video>/query and one folder per clip ("positive*")."""
    rows = _head(read_rows(annotation_files(root, task)), limit)
    _require(rows, ("query", "video_path"), task)
    queries, relevance, local, candidates = [], [], [], {}
    for row in rows:
        folder = root / task.media / os.path.splitext(os.path.basename(row["video_path"]))[0]
        queries.append({"text": _text(MOMENT_QUERY, row["query"]), "video": frames(folder / "query", num_frames)})
        clips = sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "query")
        positives = [str(p) for p in clips if p.name.startswith("positive")]
        if not positives:
            raise FileNotFoundError(f"{task.name}: no positive* clip folder in {folder}")
        for clip in clips:
            candidates.setdefault(str(clip), {"text": VIDEO_TARGET, "video": frames(clip, num_frames)})
        local.append([str(c) for c in clips])
        relevance.append({positives[-1]: 1})  # VLM2Vec keeps the last positive* it lists
    return TaskData(queries, relevance, candidates, local, [])


def _load_momentseeker(task, root, num_frames, limit):
    """query, input_frames ("", *.mp4 or *.jpg), positive_frames / negative_frames ([{output_path}])."""
    rows = _head(read_rows(annotation_files(root, task)), limit)
    _require(rows, ("query", "input_frames", "positive_frames", "negative_frames"), task)
    base = root / task.media
    queries, relevance, local, candidates = [], [], [], {}

    def clip_dir(path):
        return base / "video_frames" / path.replace("/", "_").split(".mp4")[0]
    for row in rows:
        source = row["input_frames"] or ""
        if source.endswith(".mp4"):
            query = {"text": _text("Find the clip that corresponds to the given sentence and video segment:",
                                   row["query"]), "video": frames(clip_dir(source), None)}
        elif source.endswith(".jpg"):
            query = {"text": _text("Select the video clip that aligns with the given text and image:", row["query"]),
                     "image": _media(base / f"query_{source}")}
        else:
            query = {"text": _text("Find the clip that corresponds to the given text:", row["query"])}
        positives = [str(clip_dir(e["output_path"])) for e in row["positive_frames"]]
        keys = positives + [str(clip_dir(e["output_path"])) for e in row["negative_frames"]]
        for key in keys:
            candidates.setdefault(key, {"text": "Understand the content of the provided video clip.",
                                        "video": frames(key, None)})
        queries.append(query)
        local.append(keys)
        relevance.append({p: 1 for p in positives})
    return TaskData(queries, relevance, candidates, local, [])


def _options_block(question, options):
    """VLM2Vec's ``qa_template``: the question, then ``Options:`` and ``(A) ...`` lines."""
    return "\n".join([question, "Options:", *[f"({chr(65 + i)}) {o}" for i, o in enumerate(options)]])


def _strip_letter(option: str) -> str:
    """``"B. a dog"`` -> ``"a dog"`` (the candidate text VLM2Vec embeds for Video-MME and EgoSchema)."""
    return option[option.find(". "):].strip(". ")


# One multiple-choice row -> (frame folder, question text, option names, option texts, answer name).
# Options are named (and deduplicated) by their string as VLM2Vec names them; the texts are what is embedded.
def _videomme(r):
    options = list(r["options"])
    return r["videoID"], r["question"] + "\n" + "\n".join(options), options, [_strip_letter(o) for o in options], \
        options["ABCD".index(r["answer"])]


def _nextqa(r):
    options = [r[f"a{i}"] for i in range(5)]
    return str(r["video"]), _options_block(r["question"], options), options, options, options[int(r["answer"])]


def _egoschema(r):
    options = list(r["option"])
    return str(r["video_idx"]), r["question"] + " ".join(options), options, [_strip_letter(o) for o in options], \
        options[int(r["answer"])]


def _mvbench(r):
    options = [f"({chr(65 + i)}) {c}" for i, c in enumerate(r["candidates"])]
    answer = options[list(r["candidates"]).index(r["answer"])] if r["answer"] in r["candidates"] else r["answer"]
    return f"{r['subset']}/{r['video']}", _options_block(r["question"], list(r["candidates"])), options, options, answer


def _activitynetqa(r):
    return f"v_{r['video_name']}", r["question"] + "? (A) yes; (B) no.", ["yes", "no"], ["yes", "no"], r["answer"]


_QA_ROW = {  # parser: (row function, columns it reads)
    "videomme": (_videomme, ("videoID", "question", "options", "answer")),
    "nextqa": (_nextqa, ("video", "question", "answer", "a0", "a1", "a2", "a3", "a4")),
    "egoschema": (_egoschema, ("video_idx", "question", "option", "answer")),
    "mvbench": (_mvbench, ("video", "question", "candidates", "answer")),
    "activitynetqa": (_activitynetqa, ("video_name", "question", "answer")),
}


def _load_video_qa(task, root, num_frames, limit, vlm2vec=False):
    """Multiple-choice video QA: each query ranks its own options (Hit@1)."""
    if task.parser == "mvbench":  # one folder per subset; the subset names the frame folder
        files = [f for subset in MVBENCH_SUBSETS for f in _subset_files(root, task, subset)]
        if not files:
            raise MissingTask(f"no test file for {task.name}: expected {root / task.annotation[0]}/<subset>/"
                              f"{task.annotation[2]}-*.parquet for its 20 subsets")
        rows = [{**r, "subset": f.parent.name} for f in files for r in load_rows(f)]
    else:
        rows = read_rows(annotation_files(root, task))
    rows = _head(rows, limit)
    parse, columns = _QA_ROW[task.parser]
    _require(rows, columns, task)
    queries, relevance, local, candidates, missed = [], [], [], {}, []
    for row in rows:
        folder, question, names, texts, answer = parse(row)
        if answer not in names:
            problem = f"{task.name}: answer {answer!r} is not among the options {names}"
            if not vlm2vec:
                raise ValueError(problem)
            missed.append(problem)
        candidates.update({n: {"text": t} for n, t in zip(names, texts) if n not in candidates})
        queries.append({"text": _text(VIDEO_QA_PROMPT, question), "video": frames(root / task.media / folder, num_frames)})
        local.append(names)
        relevance.append({answer: 1})
    return TaskData(queries, relevance, candidates, local, [], misses=missed)


def _subset_files(root, task, subset):
    try:
        return annotation_files(root, dataclasses.replace(task, annotation=(task.annotation[0], subset,
                                                                             task.annotation[2])))
    except MissingTask:
        return []


_load_videomme = _load_nextqa = _load_egoschema = _load_mvbench = _load_activitynetqa = _load_video_qa


def _load_visdoc(task, root, num_frames, limit):
    """BEIR layout: queries (query-id, query), qrels (query-id, corpus-id, score), corpus (corpus-id[, image])."""
    queries_rows = read_rows(annotation_files(root, task, "queries"))
    qrels = read_rows(annotation_files(root, task, "qrels"))
    _require(queries_rows, ("query-id", "query"), task)
    _require(qrels, ("query-id", "corpus-id", "score"), task)
    graded: dict = {}
    raw: dict = {}  # per query: {corpus-id as read (int or str): our key}, in qrels order (VLM2Vec's label order)
    for row in qrels:
        if row["score"] > 0:
            per_query = graded.setdefault(str(row["query-id"]), {})
            per_query[str(row["corpus-id"])] = max(per_query.get(str(row["corpus-id"]), 0), row["score"])
            raw.setdefault(str(row["query-id"]), {}).setdefault(row["corpus-id"], str(row["corpus-id"]))
    candidates = _corpus_pages(annotation_files(root, task, "corpus"), root / task.media, task)
    queries, relevance, notes, label_ids, grades = [], [], [], [], []
    unjudged = 0
    for row in queries_rows:
        if str(row["query-id"]) not in graded:
            unjudged += 1
            continue
        queries.append({"text": _text(DOC_QUERY, row["query"])})
        relevance.append(graded[str(row["query-id"])])
        label_ids.append(list(raw[str(row["query-id"])].items()))
        grades.append([relevance[-1][key] for _, key in label_ids[-1]])
    if unjudged:
        notes.append(f"{unjudged} queries without a positive qrel skipped")
    if limit:
        queries, relevance, label_ids, grades = queries[:limit], relevance[:limit], label_ids[:limit], grades[:limit]
    return TaskData(queries, relevance, candidates, None, notes, label_ids=label_ids, grades=grades)


_load_vidore = _load_visrag = _load_visdoc


def _corpus_pages(files, media: Path, task: Task) -> dict:
    """``{corpus-id: page input}``, the corpus rows streamed (``tte_flash.data.iter_rows``): a row's image bytes
    are kept only when its page is not on disk as a file, so a corpus of page images (VisRAG ArxivQA: ~3 x 420 MB
    of Parquet) is never in memory whole."""
    pages = {}
    for file in files:
        rows = iter_rows(file)
        first = next(rows, None)
        if first is None:
            raise ValueError(f"no rows in {file}")
        _require([first], ("corpus-id",), task)
        for row in itertools.chain([first], rows):
            pages[str(row["corpus-id"])] = {"text": DOC_TARGET, "image": _page(media, task, row)}
    return pages


def _page(media: Path, task: Task, row):
    """The page image: ``<image_root>/<corpus-id>.png`` (VisRAG: a shortened name with an md5 tag, as
    VLM2Vec saves it), else the bytes in the corpus file's ``image`` column (read in memory)."""
    name = str(row["corpus-id"])
    if task.parser == "visrag":
        stem, ext = os.path.splitext(name)
        path = media / f"{stem[:50]}_{hashlib.md5(name.encode('utf-8')).hexdigest()[:8]}{ext}"
    else:
        path = media / f"{name}.png"
    if path.is_file():
        return str(path)
    image = row.get("image")
    if isinstance(image, dict) and image.get("bytes"):
        return image["bytes"]
    raise FileNotFoundError(f"{task.name}: page image not found: {path} (and the corpus row has no image bytes)")


def write_label_lists(vlm2vec_labels_file, data_root, overwrite: bool = False) -> dict[str, Path]:
    """Write ``video-tasks/<dir>/labels.txt`` for the four global video classification tasks from a copy
    of VLM2Vec's ``src/data/eval_dataset/video_classification_utils.py`` (read as data with ``ast``, never
    run): the class lists VLM2Vec ranks against. Returns ``{task: written file}``."""
    source = Path(vlm2vec_labels_file)
    tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
    lists, mapping = {}, None
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if isinstance(node.value, ast.List):
                lists[name] = ast.literal_eval(node.value)
            elif name == "VIDEOCLS_LABEL_MAPPING" and isinstance(node.value, ast.Dict):
                mapping = {ast.literal_eval(k): v.id for k, v in zip(node.value.keys, node.value.values)
                           if isinstance(v, ast.Name)}
    if mapping is None:
        raise ValueError(f"{source}: no VIDEOCLS_LABEL_MAPPING dict of label lists")
    written = {}
    for task in (t for t in TASKS.values() if t.parser == "video_cls"):
        hf_dir = task.annotation[0].split("/", 1)[1]
        if hf_dir not in mapping or mapping[hf_dir] not in lists:
            raise ValueError(f"{source}: no label list for {hf_dir} in VIDEOCLS_LABEL_MAPPING")
        path = Path(data_root) / task.annotation[0] / "labels.txt"
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists (pass overwrite=True / --overwrite to replace it)")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lists[mapping[hf_dir]]) + "\n", encoding="utf-8")
        written[task.name] = path
    return written
