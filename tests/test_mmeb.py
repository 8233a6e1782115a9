"""MMEB-V2 runner: the ranking metrics against hand computations, sklearn and pytrec_eval; every loader on
a tiny copy of the published layout (built here, on the fly); scores against an independent recomputation
from the fixture's own spec; resume, missing and broken tasks; the CLI with the real tiny model."""
import dataclasses
import hashlib
import json
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tte_flash import mmeb
from tte_flash.evaluate import main

# ---------------------------------------------------------------------------------------- metrics


def test_ranking_metrics_by_hand():
    # one relevant: rank 3 -> hit@1 0, ndcg@5 = 1/log2(4) = 0.5
    m = mmeb.ranking_metrics({"a": 0.9, "b": 0.5, "c": 0.4, "d": 0.1}, {"c": 1}, ks=(1, 5))
    assert m == {"hit@1": 0.0, "ndcg_linear@1": 0.0, "hit@5": 1.0, "ndcg_linear@5": 0.5}
    # graded: c (2) first, a (1) third -> dcg = 2 + 1/2, idcg = 2 + 1/log2(3)
    m = mmeb.ranking_metrics({"a": 0.3, "b": 0.5, "c": 0.9, "d": 0.1}, {"c": 2, "a": 1}, ks=(5,))
    assert m["ndcg_linear@5"] == pytest.approx(2.5 / (2 + 1 / math.log2(3)))
    # ties are pessimistic: all equal -> the relevant one is last
    assert mmeb.ranking_metrics(dict.fromkeys("abcdef", 0.0), {"a": 1}, ks=(1, 5)) == \
        {"hit@1": 0.0, "ndcg_linear@1": 0.0, "hit@5": 0.0, "ndcg_linear@5": 0.0}
    # a relevant key absent from the pool still counts in the ideal DCG (VLM2Vec does the same)
    m = mmeb.ranking_metrics({"a": 1.0, "b": 0.0}, {"a": 1, "zzz": 1}, ks=(5,))
    assert m["ndcg_linear@5"] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    with pytest.raises(ValueError, match="relevant"):
        mmeb.ranking_metrics({"a": 1.0}, {})


@pytest.mark.parametrize("seed", range(4))
def test_ranking_metrics_match_sklearn_and_trec_eval(seed):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(seed)
    n_queries, n_docs = 7, int(rng.integers(3, 13))
    scores = rng.normal(size=(n_queries, n_docs))  # continuous: no ties
    grades = rng.integers(0, 4, size=(n_queries, n_docs)) * (rng.random((n_queries, n_docs)) < 0.4)
    grades[np.arange(n_queries), rng.integers(0, n_docs, n_queries)] = rng.integers(1, 4, n_queries)  # >= 1 relevant
    ours = [mmeb.ranking_metrics({f"d{j}": scores[i, j] for j in range(n_docs)},
                                 {f"d{j}": int(grades[i, j]) for j in range(n_docs) if grades[i, j] > 0}, ks=(1, 5, 10))
            for i in range(n_queries)]
    for k in (1, 5, 10):
        expected = [sklearn_metrics.ndcg_score(grades[i:i + 1], scores[i:i + 1], k=k) for i in range(n_queries)]
        np.testing.assert_allclose([m[f"ndcg_linear@{k}"] for m in ours], expected, rtol=1e-9)
    hits = [float(grades[i, scores[i].argmax()] > 0) for i in range(n_queries)]
    assert [m["hit@1"] for m in ours] == hits
    qrels = {f"q{i}": {f"d{j}": int(grades[i, j]) for j in range(n_docs) if grades[i, j] > 0} for i in range(n_queries)}
    run = {f"q{i}": {f"d{j}": float(scores[i, j]) for j in range(n_docs)} for i in range(n_queries)}
    trec = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.5"}).evaluate(run)
    np.testing.assert_allclose([m["ndcg_linear@5"] for m in ours], [trec[f"q{i}"]["ndcg_cut_5"] for i in range(n_queries)],
                               rtol=1e-6)


def test_registry_is_the_78_tasks_of_the_paper():
    tasks = list(mmeb.TASKS.values())
    assert len(tasks) == 78
    counts = {m: sum(t.modality == m for t in tasks) for m in mmeb.CATEGORIES}
    assert counts == {"image": 36, "video": 18, "visdoc": 24}
    per_category = {(t.modality, t.category): 0 for t in tasks}
    for t in tasks:
        per_category[(t.modality, t.category)] += 1
    assert per_category == {("image", "CLS"): 10, ("image", "QA"): 10, ("image", "RET"): 12, ("image", "VG"): 4,
                            ("video", "CLS"): 5, ("video", "QA"): 5, ("video", "RET"): 5, ("video", "MRET"): 3,
                            ("visdoc", "VDRv1"): 10, ("visdoc", "VDRv2"): 4, ("visdoc", "VR"): 6, ("visdoc", "OOD"): 4}
    assert {t.metric for t in tasks if t.modality == "visdoc"} == {"ndcg_linear@5"}
    assert {t.metric for t in tasks if t.modality != "visdoc"} == {"hit@1"}
    assert [t.name for t in mmeb.select_tasks(["video:QA"])] == ["Video-MME", "NExTQA", "EgoSchema", "MVBench",
                                                                "ActivityNetQA"]
    with pytest.raises(ValueError, match="unknown MMEB-V2 task 'ImageNet1K'"):
        mmeb.select_tasks(["ImageNet1K"])


def test_aggregate_by_hand():
    selected = mmeb.select_tasks(["ImageNet-1K", "N24News", "OK-VQA", "MSR-VTT"])
    results = {"ImageNet-1K": {"status": "done", "score": 0.5}, "N24News": {"status": "done", "score": 0.25},
               "OK-VQA": {"status": "missing"}, "MSR-VTT": {"status": "done", "score": 1.0}}
    agg = mmeb.aggregate(results, selected)
    # "of": the benchmark's tasks in the group (MMEB-V2: image CLS 10, QA 10, 36 image tasks, 78 in all)
    assert agg["categories"]["image:CLS"] == {"score": 0.375, "n": 2, "selected": 2, "of": 10}
    assert agg["categories"]["image:QA"] == {"score": None, "n": 0, "selected": 1, "of": 10}  # missing: not a 0
    assert agg["modalities"]["image"] == {"score": 0.375, "n": 2, "selected": 3, "of": 36}
    assert agg["overall"] == {"score": pytest.approx(1.75 / 3), "n": 3, "selected": 4, "of": 78}


# ---------------------------------------------------------------------------------------- fixtures in the published layout

def _png(path, ident: int, size: int = 28):
    """A solid image whose red channel is ``ident`` (< 256; 0: carries no id); PNG whatever the suffix."""
    assert 0 <= ident < 256
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (ident, 40, 90)).save(path, format="PNG")
    return path


def _png_bytes(ident):
    import io
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (ident, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


def _frames(folder, ident, n=3):
    for i in range(n):
        _png(folder / f"{i:04d}.png", ident)


def _parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


class Spec:
    """What a task's fixture holds, in id space: per query its id, its pool (candidate ids) and the
    grades of the relevant ones. An independent account of what the loaders must produce."""

    def __init__(self):
        self.queries = []  # (query id, [pool ids], {id: grade})

    def add(self, query_id, pool, relevant):
        self.queries.append((query_id, list(pool), dict(relevant)))


def build_fixture(root):
    """One or two tasks of every loader, 2-4 queries each; query ids that point at a negative are 'wrong'."""
    specs = {}
    img = root / "image-tasks"

    def image_task(name, kind):
        spec, rows = Spec(), []
        for q in range(3):
            base = 10 * q + 1
            pool = [base, base + 1, base + 2]
            qid = pool[0] if q != 1 else pool[2]  # query 1 points at a negative
            if kind == "text-cands":  # cls / qa / i2t: image query, label texts
                _png(img / name / f"q{q}.png", qid)
                rows.append({"qry_inst": "<|image_1|> Represent the given image.", "qry_text": "",
                             "qry_img_path": f"{name}/q{q}.png", "tgt_inst": "",
                             "tgt_text": [f"label #{c}" for c in pool], "tgt_img_path": [""] * 3})
            elif kind == "t2i":  # text query, image candidates
                for c in pool:
                    _png(img / name / f"c{c}.png", c)
                rows.append({"qry_inst": "Find me an everyday image that matches the given caption:",
                             "qry_text": f"#{qid} a caption", "qry_img_path": "", "tgt_inst": "<|image_1|> Represent the image.",
                             "tgt_text": [""] * 3, "tgt_img_path": [f"{name}/c{c}.png" for c in pool]})
            elif kind == "i2i":  # image query, image candidates, no captions
                _png(img / name / f"q{q}.png", qid)
                for c in pool:
                    _png(img / name / f"c{c}.png", c)
                rows.append({"qry_inst": "<|image_1|> Retrieve an image.", "qry_text": "change it",
                             "qry_img_path": f"{name}/q{q}.png", "tgt_inst": "<|image_1|> Represent the image.",
                             "tgt_text": [""] * 3, "tgt_img_path": [f"{name}/c{c}.png" for c in pool]})
            else:  # matching: every candidate is the same image, told apart by its caption (key path:caption)
                _png(img / name / f"q{q}.png", qid)
                _png(img / name / "scene.png", 0)
                rows.append({"qry_inst": "<|image_1|> Select the portion of the image.", "qry_text": "",
                             "qry_img_path": f"{name}/q{q}.png", "tgt_inst": "<|image_1|> Represent the object.",
                             "tgt_text": [f'"#{c} object"' for c in pool], "tgt_img_path": [f"{name}/scene.png"] * 3})
            spec.add(qid, pool, {pool[0]: 1})
        _parquet(img / name / "test-00000-of-00001.parquet", rows)
        specs[name] = spec

    image_task("ImageNet-1K", "text-cands")
    image_task("OK-VQA", "text-cands")
    image_task("MSCOCO_i2t", "text-cands")
    image_task("MSCOCO_t2i", "t2i")
    image_task("CIRR", "i2i")
    image_task("RefCOCO-Matching", "matching")

    vt, frames = root / "video-tasks", root / "video-tasks" / "frames"
    # video classification, global over the label set: HMDB51 with labels.txt (one label never a positive)
    labels = [f"action_{i} #{100 + i}" for i in range(5)]
    (vt / "HMDB51").mkdir(parents=True)
    (vt / "HMDB51" / "labels.txt").write_text("\n".join(labels) + "\n")
    spec, rows = Spec(), []
    for q, (label_idx, seen_idx) in enumerate([(0, 0), (1, 3), (2, 2)]):  # query 1 looks like label 3
        _frames(frames / "video_cls" / "HMDB51" / f"v{q}", 100 + seen_idx)
        rows.append({"video_id": f"v{q}", "pos_text": labels[label_idx]})
        spec.add(100 + seen_idx, [100 + i for i in range(5)], {100 + label_idx: 1})
    _parquet(vt / "HMDB51" / "test-00000-of-00001.parquet", rows)
    specs["HMDB51"] = spec
    # UCF101 without labels.txt: the pool is the labels of the file
    spec, rows = Spec(), []
    for q, (label, seen) in enumerate([(120, 120), (121, 120), (122, 122)]):
        _frames(frames / "video_cls" / "UCF101" / f"u{q}", seen)
        rows.append({"video_id": f"u{q}", "pos_text": f"sport #{label}"})
        spec.add(seen, [120, 121, 122], {label: 1})
    _parquet(vt / "UCF101" / "test-00000-of-00001.parquet", rows)
    specs["UCF101"] = spec
    # SSv2: local candidates in neg_text, the positive not first
    spec, rows = Spec(), []
    for q in range(3):
        pool = [130 + 3 * q, 131 + 3 * q, 132 + 3 * q]
        seen = pool[1] if q == 1 else pool[2]  # query 1 looks like a negative
        _frames(frames / "video_cls" / "SSv2" / str(1000 + q), seen)
        rows.append({"video_id": 1000 + q, "pos_text": f"doing #{pool[2]}", "neg_text": [f"doing #{c}" for c in pool]})
        spec.add(seen, pool, {pool[2]: 1})
    _parquet(vt / "SmthSmthV2" / "test-00000-of-00001.parquet", rows)
    specs["SmthSmthV2"] = spec

    # text-to-video retrieval, global over the file's videos; one video has two captions
    def retrieval(name, media, file_dir, make_row, split="test"):
        spec, rows = Spec(), []
        videos = [(f"vid{name[:2]}{i}", 140 + i) for i in range(3)]
        for vid, ident in videos:
            _frames(frames / "video_ret" / media / vid, ident)
        for q, (vid_idx, said) in enumerate([(0, 140), (1, 142), (2, 142), (2, 142)]):  # query 1 names video 2
            vid = videos[vid_idx][0]
            rows.append(make_row(vid, f"#{said} a caption"))
            spec.add(said, [i for _, i in videos], {videos[vid_idx][1]: 1})
        _parquet(vt / file_dir / f"{split}-00000-of-00001.parquet", rows)
        specs[name] = spec

    retrieval("MSR-VTT", "MSR-VTT", "MSR-VTT/test_1k", lambda v, c: {"video_id": v, "video": f"{v}.mp4", "caption": c})
    retrieval("MSVD", "MSVD", "MSVD", lambda v, c: {"video_id": v, "video": f"{v}.avi", "caption": [c, "other"]})
    retrieval("DiDeMo", "DiDeMo", "DiDeMo", lambda v, c: {"video": f"videos/{v}.mp4", "caption": c})
    retrieval("YouCook2", "YouCook2", "YouCook2", lambda v, c: {"id": v, "video_path": f"x/{v}.mp4", "sentence": c},
              split="val")
    retrieval("VATEX", "VATEX", "VATEX", lambda v, c: {"videoID": v, "enCap": [c, "more"]})

    # moment retrieval: clips as frame folders next to the query's frames
    spec, rows = Spec(), []
    for q in range(2):
        base = frames / "video_mret" / "QVHighlight" / f"mv{q}"
        _frames(base / "query", 0)
        pool = [160 + 4 * q + i for i in range(4)]
        _frames(base / "positive_0", pool[0])
        for i, ident in enumerate(pool[1:]):
            _frames(base / f"negative_{i}", ident)
        said = pool[0] if q == 0 else pool[3]
        rows.append({"query": f"#{said} a moment", "video_path": f"/raw/mv{q}.mp4"})
        spec.add(said, pool, {pool[0]: 1})
    _parquet(vt / "QVHighlight" / "test-00000-of-00001.parquet", rows)
    specs["QVHighlight"] = spec
    # MomentSeeker: text, image and video queries; two positives in one row
    spec, rows = Spec(), []
    ms = frames / "video_mret" / "MomentSeeker"
    for q, source in enumerate(["", "img7.jpg", "src/clipq.mp4"]):
        pool = [180 + 4 * q + i for i in range(4)]
        for i, ident in enumerate(pool):
            _frames(ms / "video_frames" / f"m{q}_c{i}", ident)
        said = pool[1] if q != 1 else pool[3]
        text = "a moment" if source else f"#{said} a moment"
        if source.endswith(".jpg"):
            _png(ms / f"query_{source}", said)
        elif source:
            _frames(ms / "video_frames" / "src_clipq", said)
        rows.append({"query": text, "input_frames": source,
                     "positive_frames": [{"output_path": f"m{q}/c{i}.mp4"} for i in (0, 1)],
                     "negative_frames": [{"output_path": f"m{q}/c{i}.mp4"} for i in (2, 3)]})
        spec.add(said, pool, {pool[0]: 1, pool[1]: 1})
    _parquet(vt / "MomentSeeker" / "test-00000-of-00001.parquet", rows)
    specs["MomentSeeker"] = spec

    # video QA: the options are in the query text too (the fake model reads the query's first id only)
    def qa(name, media, file_dir, make_row, split="test", video_dir=lambda r, q: f"qa{q}", extra=()):
        spec, rows = Spec(), []
        for q in range(3):
            pool = [200 + 5 * q + i for i in range(4)]
            answer = q % 4
            said = pool[answer] if q != 2 else pool[(answer + 1) % 4]
            row = make_row(q, said, pool, answer)
            _frames(frames / "video_qa" / media / video_dir(row, q), 0)
            rows.append(row)
            spec.add(said, pool + list(extra), {pool[answer]: 1})
        _parquet(vt / file_dir / f"{split}-00000-of-00001.parquet", rows)
        specs[name] = spec

    qa("Video-MME", "Video-MME", "Video-MME", lambda q, s, p, a: {
        "videoID": f"qa{q}", "question": f"#{s} what?", "options": [f"{'ABCD'[i]}. #{c} thing" for i, c in enumerate(p)],
        "answer": "ABCD"[a], "question_id": str(q), "domain": "x", "sub_category": "y"})
    qa("NExTQA", "NExTQA", "NExTQA/MC", lambda q, s, p, a: {
        "video": f"qa{q}", "question": f"#{s} why?", "answer": a, "qid": q, "type": "CW",
        **{f"a{i}": f"#{c} reason" for i, c in enumerate(p)}, "a4": "#250 none"}, extra=(250,))
    qa("EgoSchema", "EgoSchema", "EgoSchema/Subset", lambda q, s, p, a: {
        "video_idx": f"qa{q}", "question": f"#{s} which?", "answer": str(a), "question_idx": str(q),
        "option": [f"{'ABCD'[i]}. #{c} act" for i, c in enumerate(p)]})
    qa("ActivityNetQA", "ActivityNetQA", "ActivityNetQA", lambda q, s, p, a: {
        "video_name": f"an{q}", "question": f"#{s} is it", "answer": "yes", "question_id": str(q)},
        video_dir=lambda r, q: f"v_an{q}")
    specs["ActivityNetQA"].queries = [(s, [YES, NO], {YES: 1}) for s in (YES, YES, NO)]
    rows = pq.read_table(vt / "ActivityNetQA" / "test-00000-of-00001.parquet").to_pylist()
    for row, said in zip(rows, (YES, YES, NO)):
        row["question"] = f"#{said} is it"
    _parquet(vt / "ActivityNetQA" / "test-00000-of-00001.parquet", rows)
    # MVBench: one file per subset, the subset from the folder
    spec = Spec()
    for s, subset in enumerate(("action_antonym", "object_shuffle")):
        rows = []
        for q in range(2):
            pool = [300 + 10 * s + 3 * q + i for i in range(3)]
            said = pool[1] if (s, q) != (1, 1) else pool[2]
            _frames(frames / "video_qa" / "MVBench" / subset / f"mv{q}.mp4", 0)
            rows.append({"question": f"#{said} which one?", "video": f"mv{q}.mp4",
                         "candidates": [f"#{c} option" for c in pool], "answer": f"#{pool[1]} option"})
            spec.add(said, pool, {pool[1]: 1})
        _parquet(vt / "MVBench" / subset / "train-00000-of-00001.parquet", rows)
    specs["MVBench"] = spec

    # visual documents (BEIR layout): queries / qrels / corpus, graded qrels, a query without a positive
    def visdoc(name, file_dir, media, split="test", page_name=lambda cid: f"{cid}.png", in_bytes=False, int_ids=True):
        spec = Spec()
        docs = [30 + i for i in range(7)]
        cids = [(i if int_ids else f"page_{i}_" + "x" * 60 + ".png") for i in range(7)]
        corpus = []
        for cid, ident in zip(cids, docs):
            if in_bytes:
                corpus.append({"corpus-id": cid, "image": {"bytes": _png_bytes(ident), "path": None}})
            else:
                _png(root / "visdoc-tasks" / media / page_name(cid), ident)
                corpus.append({"corpus-id": cid})
        queries = [{"query-id": "q0", "query": "#30 revenue?"}, {"query-id": "q1", "query": "#33 energy?"},
                   {"query-id": "q2", "query": "#35 unjudged"}]
        qrels = [{"query-id": "q0", "corpus-id": cids[0], "score": 2}, {"query-id": "q0", "corpus-id": cids[1], "score": 1},
                 {"query-id": "q1", "corpus-id": cids[2], "score": 1}, {"query-id": "q2", "corpus-id": cids[4], "score": 0}]
        spec.add(30, docs, {30: 2, 31: 1})
        spec.add(33, docs, {32: 1})
        base = root / "visdoc-tasks" / file_dir
        for part, rows in (("queries", queries), ("qrels", qrels), ("corpus", corpus)):
            _parquet(base / part / f"{split}-00000-of-00001.parquet", rows)
        specs[name] = spec

    visdoc("ViDoRe_arxivqa", "arxivqa_test_subsampled_beir", "ViDoRe_arxivqa")
    visdoc("ViDoRe_biomedical_lectures_v2_multilingual", "biomedical_lectures_v2", "biomedical_lectures_v2_multilingual",
           in_bytes=True)
    visdoc("VisRAG_ArxivQA", "VisRAG-Ret-Test-ArxivQA", "VisRAG_ArxivQA", split="train", int_ids=False,
           page_name=lambda cid: f"{cid[:-4][:50]}_{hashlib.md5(cid.encode()).hexdigest()[:8]}.png")
    visdoc("ViDoSeek-doc", "ViDoSeek", "ViDoSeek-doc")
    return specs


YES, NO = 251, 252


class IdModel:
    """A stand-in embedder that reads ids: ``#n`` (the first) in a text, the red value of an image or
    of a video's first frame; "yes"/"no" map to fixed ids. Its embedding is the sum of ``table[id]``
    over the ids it finds: one-hot rows give an oracle, Gaussian rows a random model."""

    def __init__(self, table):
        self.table = torch.as_tensor(table, dtype=torch.float32)
        self.calls, self.document_calls, self.query_budgets = 0, 0, []

    def ids(self, item):
        found = []
        text = item.get("text", "")
        match = re.search(r"#(\d+)", text)
        if match:
            found.append(int(match.group(1)))
        elif text.strip() in ("yes", "no"):
            found.append(YES if text.strip() == "yes" else NO)
        for media in ([item["image"]] if "image" in item else []) + ([item["video"][0]] if "video" in item else []):
            image = Image.open(media if isinstance(media, str) else __import__("io").BytesIO(media))
            red = image.convert("RGB").getpixel((0, 0))[0]
            if red:
                found.append(red)
        if not found:
            raise AssertionError(f"input with no id: {item}")
        return found

    def _encode(self, items):
        self.calls += 1
        return torch.stack([sum(self.table[i] for i in self.ids(item)) for item in items])

    def encode_query(self, items, think_tokens=0, **kwargs):
        self.query_budgets.append(think_tokens)
        return self._encode(items)

    def encode_document(self, items, **kwargs):
        self.document_calls += 1
        return self._encode(items)

    @staticmethod
    def similarity(q, d):
        return torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(d, dim=-1).T


def expected_scores(spec: Spec, table) -> dict:
    """Hit@1 and NDCG@5 recomputed from the spec alone: numpy scores, a stable sort with the relevant
    candidates after equal scores, and the textbook DCG."""
    table = np.asarray(table, dtype=np.float64)
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    hits, ndcgs = [], []
    for query_id, pool, relevant in spec.queries:
        scores = np.array([unit[query_id] @ unit[c] for c in pool])
        grades = np.array([relevant.get(c, 0) for c in pool])
        order = np.lexsort((grades, -np.round(scores, 12)))  # by score desc, then relevant last
        hits.append(float(grades[order[0]] > 0))
        dcg = sum(grades[j] / np.log2(r + 2) for r, j in enumerate(order[:5]))
        idcg = sum(g / np.log2(r + 2) for r, g in enumerate(sorted(relevant.values(), reverse=True)[:5]))
        ndcgs.append(dcg / idcg)
    return {"hit@1": float(np.mean(hits)), "ndcg_linear@5": float(np.mean(ndcgs))}


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmeb_v2")
    return root, build_fixture(root)


ORACLE = np.eye(512)


@pytest.mark.parametrize("table", ["oracle", "random"])
def test_every_loader_scores_as_the_spec_says(fixture_root, tmp_path, table):
    root, specs = fixture_root
    vectors = ORACLE if table == "oracle" else np.random.default_rng(3).normal(size=(512, 16))
    model = IdModel(vectors)
    summary = mmeb.run_benchmark(model, root, tmp_path, tasks=list(specs), think_tokens=0, mode="latent")
    for name, spec in specs.items():
        result = summary["tasks"][name]
        assert result["status"] == "done", (name, result)
        expected = expected_scores(spec, vectors)
        assert result["num_pred"] == len(spec.queries), name
        for metric in ("hit@1", "ndcg_linear@5"):
            assert result[metric] == pytest.approx(expected[metric]), (name, metric)
        assert result["score"] == result[mmeb.TASKS[name].metric]
    if table == "oracle":  # by construction: wrong queries lose, graded qrels give the hand-computed NDCG
        tasks = summary["tasks"]
        assert tasks["ImageNet-1K"]["hit@1"] == pytest.approx(2 / 3)
        assert tasks["MSR-VTT"]["hit@1"] == pytest.approx(3 / 4)
        assert tasks["MomentSeeker"]["hit@1"] == pytest.approx(2 / 3)
        assert tasks["ViDoRe_arxivqa"]["ndcg_linear@5"] == pytest.approx((2 / (2 + 1 / math.log2(3)) + 0) / 2)
    assert any("labels of the test file" in n for n in summary["tasks"]["UCF101"]["notes"])
    assert "- UCF101: label set: the 3 labels of the test file" in (tmp_path / "summary.md").read_text()
    assert any("without a positive qrel" in n for n in summary["tasks"]["ViDoRe_arxivqa"]["notes"])


def test_resume_missing_and_broken_tasks(fixture_root, tmp_path):
    root, _ = fixture_root
    model = IdModel(ORACLE)
    tasks = ["ImageNet-1K", "MSR-VTT", "ViDoRe_arxivqa", "N24News"]  # N24News has no files here
    first = mmeb.run_benchmark(model, root, tmp_path, tasks=tasks, fingerprint={"model": "a"}, think_tokens=0)
    assert first["tasks"]["N24News"]["status"] == "missing" and "N24News" in first["tasks"]["N24News"]["reason"]
    overall = first["aggregate"]["overall"]
    assert (overall["n"], overall["selected"], overall["of"]) == (3, 4, 78)  # a subset's mean says it is partial
    markdown = (tmp_path / "summary.md").read_text()
    assert "N24News (missing)" in markdown and "MISSING" in markdown
    stored = json.loads((tmp_path / "image" / "ImageNet-1K_score.json").read_text())
    assert stored["fingerprint"]["model"] == "a" and not list(tmp_path.rglob("*.tmp"))
    calls = model.calls
    second = mmeb.run_benchmark(model, root, tmp_path, tasks=tasks, fingerprint={"model": "a"}, think_tokens=0)
    assert model.calls == calls  # nothing re-encoded
    assert second["tasks"]["MSR-VTT"]["resumed"] and second["aggregate"] == first["aggregate"]
    with pytest.raises(ValueError, match="another model or setting"):
        mmeb.run_benchmark(model, root, tmp_path, tasks=tasks, fingerprint={"model": "a"}, think_tokens=4)
    assert json.loads((tmp_path / "image" / "ImageNet-1K_score.json").read_text()) == stored  # untouched
    # a broken task (a frame folder gone) is an error with the path, the others still run
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(root / "video-tasks" / "MSR-VTT", broken / "video-tasks" / "MSR-VTT")
    result = mmeb.run_benchmark(model, broken, tmp_path / "out2", tasks=["MSR-VTT"])
    assert result["tasks"]["MSR-VTT"]["status"] == "error" and "frame folder not found" in result["tasks"]["MSR-VTT"]["reason"]
    assert result["aggregate"]["overall"]["score"] is None


def test_several_budgets_share_the_candidates(fixture_root, tmp_path):
    root, _ = fixture_root
    model = IdModel(ORACLE)
    tasks = ["ImageNet-1K", "MSR-VTT"]
    summaries = mmeb.run_benchmark(model, root, tmp_path, tasks=tasks, think_tokens=[0, 4])
    assert model.document_calls == 2 and model.query_budgets == [0, 4, 0, 4]  # per task: documents once, each K
    assert set(summaries) == {0, 4}
    for k in (0, 4):
        stored = json.loads((tmp_path / f"k{k}" / "video" / "MSR-VTT_score.json").read_text())
        assert stored["think_tokens"] == k and stored["fingerprint"]["think_tokens"] == k
        assert json.loads((tmp_path / f"k{k}" / "summary.json").read_text())["aggregate"] == summaries[k]["aggregate"]
    single = mmeb.run_benchmark(IdModel(ORACLE), root, tmp_path / "single", tasks=tasks, think_tokens=4)
    assert single["aggregate"] == summaries[4]["aggregate"]
    # one K already done: only the other is computed; the candidates come from the cache
    (tmp_path / "k4" / "video" / "MSR-VTT_score.json").unlink()
    again = IdModel(ORACLE)
    assert mmeb.run_benchmark(again, root, tmp_path, tasks=tasks, think_tokens=[0, 4])[4]["aggregate"] == \
        summaries[4]["aggregate"]
    assert again.query_budgets == [4] and again.document_calls == 0
    # a new K reuses every task's candidates; a torn cache file is recomputed, not trusted
    (tmp_path / ".cache" / "ImageNet-1K.candidates.pt").write_bytes(b"torn")
    third = IdModel(ORACLE)
    assert mmeb.run_benchmark(third, root, tmp_path, tasks=tasks, think_tokens=[0, 4, 8])[8]["aggregate"] == \
        summaries[4]["aggregate"]  # the oracle does not depend on K
    assert third.query_budgets == [8, 8] and third.document_calls == 1


def test_label_lists_from_vlm2vec_file(tmp_path, capsys):
    source = tmp_path / "video_classification_utils.py"
    source.write_text('raise SystemExit("a labels file is read, never run")\n'
                      "BREAKFAST_LABELS = ['pancake', 'tea']\nK700_LABELS = ['abseiling', 'air drumming', 'yoga']\n"
                      "UCF101_LABELS = ['Archery']\nHMDB51_LABELS = ['brush_hair', 'cartwheel']\nSSV2_LABELS = ['x']\n"
                      "VIDEOCLS_LABEL_MAPPING = {'Kinetics-700': K700_LABELS, 'SmthSmthV2': SSV2_LABELS, "
                      "'UCF101': UCF101_LABELS, 'HMDB51': HMDB51_LABELS, 'Breakfast': BREAKFAST_LABELS}\n")
    assert mmeb.main(["--write_labels", str(source), "--data_root", str(tmp_path / "data")]) == 0
    assert "K700: 3 labels" in capsys.readouterr().out
    assert (tmp_path / "data/video-tasks/Kinetics-700/labels.txt").read_text() == "abseiling\nair drumming\nyoga\n"
    assert (tmp_path / "data/video-tasks/Breakfast/labels.txt").read_text() == "pancake\ntea\n"
    assert mmeb.main(["--write_labels", str(source), "--data_root", str(tmp_path / "data")]) == 2  # never overwritten
    assert "exists" in capsys.readouterr().err
    source.write_text("K700_LABELS = ['a']\n")
    assert mmeb.main(["--write_labels", str(source), "--data_root", str(tmp_path / "x")]) == 2
    assert "VIDEOCLS_LABEL_MAPPING" in capsys.readouterr().err


def test_query_cap_of_a_task(fixture_root):
    root, _ = fixture_root
    task = mmeb.TASKS["SmthSmthV2"]
    assert task.max_queries == 1000  # VLM2Vec's num_sample_per_subset for SSv2
    assert len(mmeb.load_task(task, root).queries) == 3
    capped = dataclasses.replace(task, max_queries=2)
    assert len(mmeb.load_task(capped, root).queries) == 2
    assert len(mmeb.load_task(capped, root, limit=1).queries) == 1
    assert len(mmeb.load_task(capped, root, limit=5).queries) == 2


def test_a_test_file_without_a_column_is_an_error_naming_it(tmp_path):
    _parquet(tmp_path / "video-tasks" / "Video-MME" / "test-00000-of-00001.parquet",
             [{"videoID": "v", "question": "why?", "answer": "A"}])
    result = mmeb.run_benchmark(IdModel(ORACLE), tmp_path, tmp_path / "out", tasks=["Video-MME"])
    assert result["tasks"]["Video-MME"]["status"] == "error"
    assert "Video-MME: the test file lacks column(s) ['options']" in result["tasks"]["Video-MME"]["reason"]


def test_test_file_locations(tmp_path):
    task = mmeb.TASKS["Video-MME"]
    with pytest.raises(mmeb.MissingTask, match="Video-MME/test-"):
        mmeb.annotation_files(tmp_path, task)
    _parquet(tmp_path / "video-tasks" / "Video-MME" / "videomme" / "test-00000-of-00001.parquet", [{"a": 1}])
    assert [p.parent.name for p in mmeb.annotation_files(tmp_path, task)] == ["videomme"]  # one config folder
    _parquet(tmp_path / "video-tasks" / "Video-MME" / "other" / "test-00000-of-00001.parquet", [{"a": 1}])
    with pytest.raises(mmeb.MissingTask):  # two: ambiguous, not guessed
        mmeb.annotation_files(tmp_path, task)
    (tmp_path / "video-tasks" / "Video-MME" / "test.jsonl").write_text('{"a": 2}\n')
    assert mmeb.read_rows(mmeb.annotation_files(tmp_path, task)) == [{"a": 2}]


def test_cli_with_the_tiny_model(fixture_root, tmp_path, capsys):
    root, _ = fixture_root
    args = ["--benchmark", "mmeb-v2", "--model", "tiny", "--data_root", str(root), "--output", str(tmp_path),
            "--tasks", "CIRR", "MSR-VTT", "ViDoRe_arxivqa", "--think_tokens", "2", "--batch_size", "4"]
    torch.manual_seed(0)  # the random preset: the same weights in both runs
    assert main(args) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "[2/3] MSR-VTT K=2: hit@1" in captured.err  # one progress line per task
    assert "image RET" in printed and "| RET | MSR-VTT | hit@1 |" in printed and "visdoc VDRv1" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {r["status"] for r in summary["tasks"].values()} == {"done"}
    assert summary["fingerprint"]["think_tokens"] == 2 and summary["fingerprint"]["model"] == "tiny"
    for r in summary["tasks"].values():
        assert 0.0 <= r["score"] <= 1.0
    torch.manual_seed(0)
    assert main(args) == 0  # resumed
    assert "(read back)" in capsys.readouterr().err
    torch.manual_seed(1)  # other weights, same config: refused, nothing overwritten
    assert main(args) == 2 and "another model or setting" in capsys.readouterr().err
    two = ["--benchmark", "mmeb-v2", "--model", "tiny", "--data_root", str(root), "--output", str(tmp_path / "two"),
           "--tasks", "MSR-VTT", "--think_tokens", "0", "2"]
    torch.manual_seed(3)
    assert main(two) == 0
    for k in (0, 2):
        assert json.loads((tmp_path / "two" / f"k{k}" / "summary.json").read_text())["fingerprint"]["think_tokens"] == k
    assert "k2/summary.json" in capsys.readouterr().out
    torch.manual_seed(3)  # one of those K again into the same folder: read back from its k2 folder, not recomputed
    assert main(two[:-2] + ["2"]) == 0
    assert "MSR-VTT K=2: hit@1" in capsys.readouterr().err.split("(read back)")[0]
    assert not (tmp_path / "two" / "summary.json").exists()


def test_explicit_cot_mode_with_the_tiny_model(fixture_root, tmp_path, tiny_model):
    root, _ = fixture_root
    summary = mmeb.run_benchmark(tiny_model, root, tmp_path, tasks=["MSVD", "ViDoRe_arxivqa"], think_tokens=0,
                                 mode="explicit-cot", max_cot_tokens=2, limit=1)
    assert {r["status"] for r in summary["tasks"].values()} == {"done"}
    assert summary["fingerprint"]["mode"] == "explicit-cot" and summary["tasks"]["MSVD"]["num_pred"] == 1


@pytest.mark.parametrize("extra, message", [
    ([], "--data_root is required"),
    (["--data_root", "x", "--output", "o", "--mode", "latent", "explicit-cot"], "one --mode per run"),
    (["--data_root", "x", "--output", "o", "--think_tokens", "auto"], "auto is not supported"),
    (["--data_root", "missing", "--output", "o"], "--data_root missing is not a folder"),
    (["--data_root", "x", "--output", "o", "--data", "f.jsonl"], "--data is for --benchmark mmeb-file"),
    (["--data_root", "x", "--output", "o", "--tasks", "nope"], "unknown MMEB-V2 task 'nope'"),
    (["--data_root", "x", "--output", "o", "--tasks", "imagenet-1k"], "did you mean ImageNet-1K"),
])
def test_cli_errors(extra, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()
    assert main(["--benchmark", "mmeb-v2", "--model", "tiny", *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--limit", "0"), ("--limit", "-1"), ("--num_frames", "0"),
                                         ("--batch_size", "0"), ("--max_cot_tokens", "x")])
def test_counts_below_one_are_refused(flag, value, capsys):
    """--limit 0 used to score every row and --limit -1 all but the last, silently; counts must be >= 1."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--benchmark", "mmeb-v2", "--model", "tiny", "--data_root", "x", "--output", "o", flag, value])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_model_card_shows_the_mmeb_v2_runs_saved_beside_the_checkpoint(fixture_root, tmp_path, capsys):
    """Runs written to ``DIR/mmeb-v2`` (two K) appear in DIR's card: a row per K with the overall and per-modality
    means of summary.json (x 100); a subset of the tasks is marked partial (2/78) and stays out of the model-index,
    which gets only complete runs without --limit."""
    from huggingface_hub import metadata_load
    from tte_flash import TTEFlashModel
    from tte_flash.card import _mmeb_v2_index, write_model_card
    root, _ = fixture_root
    torch.manual_seed(0)
    model = TTEFlashModel.from_preset("tiny")
    model.save_pretrained(tmp_path)
    args = ["--benchmark", "mmeb-v2", "--model", str(tmp_path), "--data_root", str(root), "--output",
            str(tmp_path / "mmeb-v2"), "--tasks", "CIRR", "MSR-VTT", "--think_tokens", "0", "2", "--batch_size", "4"]
    assert main(args) == 0
    capsys.readouterr()
    write_model_card(tmp_path, model.config)
    text = (tmp_path / "README.md").read_text()
    summaries = {}
    for k in (0, 2):
        summaries[k] = json.loads((tmp_path / "mmeb-v2" / f"k{k}" / "summary.json").read_text())
        overall = summaries[k]["aggregate"]["overall"]
        assert (overall["n"], overall["of"]) == (2, 78)
        assert f"| {k} | latent | {100 * overall['score']:.1f} (2/78 tasks) |" in text
    assert "MMEB-V2" not in str(metadata_load(tmp_path / "README.md").get("model-index"))
    # a complete run is published (one entry per K); the same with --limit is not
    complete = {"fingerprint": {"think_tokens": 2, "limit": None},
                "aggregate": {"overall": {"score": 0.5, "n": 78, "selected": 78, "of": 78}}}
    entries = _mmeb_v2_index({2: complete})
    assert [(e.dataset_type, e.metric_value, e.metric_name) for e in entries] == [
        ("TIGER-Lab/MMEB-V2", 50.0, "MMEB-V2 overall (K=2, 78/78 tasks)")]
    assert _mmeb_v2_index({2: {**complete, "fingerprint": {"think_tokens": 2, "limit": 5}}}) == []
