"""MMEB-V2 scorings: ``--scoring vlm2vec`` against a re-implementation written here from the description of
VLM2Vec's procedure (eval.py pools a global task's candidates as each query's own candidates, then the corpus,
and ranks with numpy's default argsort of the negated float32 scores; RankingMetrics deduplicates the labels
with ``list(set(...))`` and then pairs them with the grades by position), on random graded qrels, under
several PYTHONHASHSEEDs; ties; positives that are no listed candidate kept as VLM2Vec keeps them (the correct
scoring fails the task); both scorings in the summary and through ``python -m tte_flash.mmeb``.
``python tests/test_mmeb_scoring.py`` prints the measured difference quoted in docs/mmeb.md."""
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tte_flash import mmeb, mmeb_data
from tte_flash.mmeb_data import TaskData
from tte_flash.ranking import ranking_metrics, vlm2vec_grades, vlm2vec_metrics, vlm2vec_order

KS = (1, 5, 10)


def similarity(q, d):
    """The model's similarity: cosine, float32."""
    return torch.nn.functional.normalize(q.float(), dim=-1) @ torch.nn.functional.normalize(d.float(), dim=-1).T


# ---------------------------------------------------------------------------------------- the procedure, from its description

def described_metrics(prediction: list, label: list, rel_scores: list | None, k: int) -> dict:
    """One query as VLM2Vec's RankingMetrics scores it, step by step from the description:
    1. the labels are made unique by ``list(set(labels))``;
    2. graded: a dict is built by zipping that list with ``rel_scores`` in their original order (position i of
       the set order gets the i-th grade); binary: grade 1 for every label;
    3. the gain of each of the first k predictions is its grade in that dict (0 when absent);
    4. DCG = sum over positions i (from 0) of gain / log2(i + 2) (numpy's log2), added left to right;
       the ideal DCG is the same sum over the dict's grades sorted high to low, cut at k (1 when empty);
       NDCG = DCG / ideal, 0 when the ideal is not positive;
    5. Hit@k = 1 when a label is among the first k predictions."""
    labels = list(set(label))
    if rel_scores is None:
        grade_of = {doc: 1 for doc in labels}
        ideal = [1] * min(len(labels), k)
    else:
        assert len(labels) == len(rel_scores)
        grade_of = dict(zip(labels, rel_scores))
        ideal = sorted(grade_of.values(), reverse=True)[:k]
    gains = [grade_of.get(doc, 0) for doc in prediction[:k]]
    dcg = sum(gain / np.log2(i + 2) for i, gain in enumerate(gains))
    idcg = sum(gain / np.log2(i + 2) for i, gain in enumerate(ideal)) if ideal else 1
    return {f"hit@{k}": 1.0 if set(prediction[:k]) & set(labels) else 0.0,
            f"ndcg_linear@{k}": dcg / idcg if idcg > 0 else 0.0}


def described_task(q, c, corpus_ids: list, labels: list, grades: list | None) -> list[dict]:
    """Per query of a global task, as eval.py does it: the candidate pool is every query's own candidate names
    (for visual documents its relevant documents, in qrels order) in query order, then the corpus, each name
    once (generate_cand_dataset); the float32 score matrix of the pool is argsorted, negated, along its rows;
    then the metrics of each row. ``c``: the embeddings of ``corpus_ids``."""
    pool, seen = [], set()
    for name in [n for names in labels for n in names] + list(corpus_ids):
        if name not in seen:
            pool.append(name)
            seen.add(name)
    row_of = {cid: j for j, cid in enumerate(corpus_ids)}
    sim = similarity(q, c[[row_of[name] for name in pool]]).numpy()
    out = []
    for i, row in enumerate(np.argsort(-sim, axis=1)):
        prediction = [pool[j] for j in row]
        metrics = {}
        for k in KS:
            metrics.update(described_metrics(prediction, labels[i], None if grades is None else grades[i], k))
        out.append(metrics)
    return out


def random_graded_query(rng, string_ids: bool, tie_levels: int | None = None):
    """One visual-document-like query: 5-30 candidates with distinct ids (ints or page file names), 1-6 relevant
    ones with grades 1-3 in qrels order, embeddings (coarse when ``tie_levels``: many equal scores)."""
    n_docs = int(rng.integers(5, 31))
    if string_ids:
        ids = list(dict.fromkeys(f"page_{rng.integers(10**9):09d}_{rng.integers(10**6)}.png" for _ in range(n_docs)))
    else:
        ids = [int(x) for x in rng.choice(10**6, size=n_docs, replace=False)]
    n_rel = int(rng.integers(1, min(6, len(ids)) + 1))
    relevant = [ids[j] for j in rng.choice(len(ids), size=n_rel, replace=False)]
    grades = [int(g) for g in rng.integers(1, 4, size=n_rel)]
    dim = 4
    if tie_levels:
        c = rng.integers(0, tie_levels, size=(len(ids), dim)).astype(np.float32) + 1
        q = rng.integers(0, tie_levels, size=(1, dim)).astype(np.float32) + 1
    else:
        c, q = rng.normal(size=(len(ids), dim)), rng.normal(size=(1, dim))
    return ids, relevant, grades, torch.as_tensor(q, dtype=torch.float32), torch.as_tensor(c, dtype=torch.float32)


def task_data(queries: list) -> TaskData:
    """A global graded task of the given (ids, relevant, grades) queries over the union of their ids."""
    candidates = {}
    for ids, _, _ in queries:
        candidates.update({str(i): {"text": str(i)} for i in ids})
    return TaskData(queries=[{"text": "q"} for _ in queries],
                    relevance=[{str(r): g for r, g in zip(rel, grades)} for _, rel, grades in queries],
                    candidates=candidates, local=None, notes=[],
                    label_ids=[[(r, str(r)) for r in rel] for _, rel, _ in queries],
                    grades=[list(grades) for _, _, grades in queries])


# ---------------------------------------------------------------------------------------- 2000 random graded queries

def test_vlm2vec_scoring_equals_the_described_procedure_on_2000_random_graded_queries():
    rng = np.random.default_rng(17)
    differ = differ_from_correct = graded_with_distinct = 0
    for n in range(2000):
        ids, relevant, grades, q, c = random_graded_query(rng, string_ids=n % 2 == 0,
                                                          tie_levels=3 if n % 4 == 1 else None)
        data = task_data([(ids, relevant, grades)])
        ours = mmeb.score_task(data, q, c, [str(i) for i in ids], similarity, scoring="vlm2vec")
        expected = described_task(q, c, ids, [relevant], [grades])[0]
        differ += ours != expected  # exact: the same numbers to the bit
        correct = mmeb.score_task(data, q, c, [str(i) for i in ids], similarity)
        if len(set(grades)) > 1:
            graded_with_distinct += 1
            differ_from_correct += abs(correct["ndcg_linear@5"] - expected["ndcg_linear@5"]) > 1e-12
    assert differ == 0
    # the test can tell: the correct scoring differs from VLM2Vec's on a good share of the graded queries
    assert differ_from_correct > 0.1 * graded_with_distinct, (differ_from_correct, graded_with_distinct)


def test_a_whole_task_and_its_blocks_equal_the_described_procedure():
    rng = np.random.default_rng(5)
    queries, q_rows = [], []
    pool_ids = [f"doc-{i}-{rng.integers(10**6)}" for i in range(40)]
    c = torch.as_tensor(rng.integers(0, 3, size=(40, 3)) + 1, dtype=torch.float32)  # many ties
    for _ in range(300):
        relevant = [pool_ids[j] for j in rng.choice(40, size=int(rng.integers(1, 5)), replace=False)]
        queries.append((pool_ids, relevant, [int(g) for g in rng.integers(1, 4, size=len(relevant))]))
        q_rows.append(rng.integers(0, 3, size=3) + 1)
    q = torch.as_tensor(np.array(q_rows), dtype=torch.float32)
    data = task_data(queries)
    keys = list(data.candidates)
    assert keys == pool_ids
    expected = described_task(q, c, pool_ids, [r for _, r, _ in queries], [g for _, _, g in queries])
    means = {name: float(np.mean([m[name] for m in expected])) for name in expected[0]}
    for chunk in (1024, 7):  # the argsort of the matrix in blocks of rows is the argsort of the matrix
        assert mmeb.score_task_vlm2vec(data, q, c, keys, similarity, chunk=chunk) == means


HASHSEED_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import test_mmeb_scoring as t
from tte_flash import mmeb, mmeb_data
rng = np.random.default_rng(3)
out = {}
for string_ids in (True, False):
    queries, qs, cs = [], [], []
    for _ in range(150):
        ids, relevant, grades, q, c = t.random_graded_query(rng, string_ids)
        queries.append((ids, relevant, grades)); qs.append(q); cs.append(c)
    ours, expected = [], []
    for (ids, relevant, grades), q, c in zip(queries, qs, cs):
        data = t.task_data([(ids, relevant, grades)])
        ours.append(mmeb.score_task(data, q, c, [str(i) for i in ids], t.similarity, scoring="vlm2vec")["ndcg_linear@5"])
        expected.append(t.described_task(q, c, ids, [relevant], [grades])[0]["ndcg_linear@5"])
    out["strings" if string_ids else "ints"] = {"ours": ours, "expected": expected}
print(json.dumps(out))
"""


def test_the_numbers_follow_pythonhashseed_as_vlm2vecs_do():
    runs = {}
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", HASHSEED_SCRIPT, str(Path(__file__).parent)], env=env,
                              capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[seed] = json.loads(done.stdout.strip().splitlines()[-1])
        for kind in ("strings", "ints"):
            assert runs[seed][kind]["ours"] == runs[seed][kind]["expected"]  # 0 of 150 differ, under this seed
    strings = [tuple(r["strings"]["ours"]) for r in runs.values()]
    ints = [tuple(r["ints"]["ours"]) for r in runs.values()]
    assert len(set(strings)) > 1  # page names: VLM2Vec's graded NDCG changes with the hash seed
    assert len(set(ints)) == 1  # integer ids hash to themselves: the same (still re-paired) numbers every time


def test_grade_pairing_by_hand():
    # ints hash to themselves: {2, 9} iterates 9 (slot 1) before 2 (slot 2), so 9 takes the first grade
    assert list(set([2, 9])) == [9, 2]
    assert vlm2vec_grades([2, 9], [2, 1]) == {9: 2, 2: 1}
    assert vlm2vec_grades(["a", "b"]) == {"a": 1, "b": 1}
    with pytest.raises(ValueError, match="grades"):
        vlm2vec_grades(["a", "a"], [1, 2])  # VLM2Vec refuses duplicate labels with grades as well
    # doc 2 (grade 2 in the qrels) ranked first: correct 1.0; VLM2Vec pairs it with grade 1
    m = vlm2vec_metrics([2, 9, 5], vlm2vec_grades([2, 9], [2, 1]), ks=(5,))
    assert m["ndcg_linear@5"] == pytest.approx((1 + 2 / np.log2(3)) / (2 + 1 / np.log2(3)))
    assert ranking_metrics({"2": 3.0, "9": 2.0, "5": 1.0}, {"2": 2, "9": 1}, ks=(5,))["ndcg_linear@5"] == 1.0


# ---------------------------------------------------------------------------------------- ties

def test_ties_break_numpys_way_and_never_below_the_pessimistic_rule():
    rng = np.random.default_rng(0)
    for n in (3, 8, 16, 17, 64):
        for _ in range(50):
            scores = rng.integers(0, 2, size=n).astype(np.float32)
            np.testing.assert_array_equal(vlm2vec_order(scores), np.argsort(-scores))
            np.testing.assert_array_equal(vlm2vec_order(scores[None, :])[0], np.argsort(-scores))
    # a local task whose every candidate scores the same: the correct scoring ranks the positive last,
    # VLM2Vec where numpy's argsort puts it; on average VLM2Vec's Hit@1 is higher
    higher = 0
    for trial in range(30):
        n = int(rng.integers(3, 20))
        names = [f"option {i}" for i in range(n)]
        positive = names[int(rng.integers(n))]
        data = TaskData([{"text": "q"}], [{positive: 1}], {k: {"text": k} for k in names}, [names], [])
        q, c = torch.ones(1, 4), torch.ones(n, 4)
        vlm = mmeb.score_task(data, q, c, names, similarity, scoring="vlm2vec")
        correct = mmeb.score_task(data, q, c, names, similarity)
        first = names[int(np.argsort(-similarity(q, c).numpy()[0])[0])]
        assert vlm["hit@1"] == float(first == positive)
        assert correct["hit@1"] == 0.0 and correct["hit@1"] <= vlm["hit@1"]
        higher += vlm["hit@1"] > correct["hit@1"]
    assert higher > 0


# ------------------------------------------------------------------------ unlisted positives, the runner, the CLI

class KeyModel:
    """Embeds a text by itself, a video by its folder's name, an image by its file's stem: a vector from
    ``FIXED`` or one drawn from the key's md5; ``same``: keys that embed like another key."""

    def __init__(self, same=None, dim=16):
        self.same, self.dim = dict(same or {}), dim

    def key(self, item):
        if "video" in item:
            return Path(item["video"][0]).parent.name
        if "image" in item:
            return Path(item["image"]).stem
        return item["text"]

    def vector(self, key):
        key = self.same.get(key, key)
        if key in FIXED:
            return torch.as_tensor(FIXED[key] + [0.0] * (self.dim - len(FIXED[key])), dtype=torch.float32)
        seed = int(hashlib.md5(key.encode()).hexdigest()[:8], 16)
        return torch.as_tensor(np.random.default_rng(seed).normal(size=self.dim), dtype=torch.float32)

    def encode_query(self, items, **kwargs):
        return torch.stack([self.vector(self.key(i)) for i in items])

    def encode_document(self, items, **kwargs):
        return torch.stack([self.vector(self.key(i)) for i in items])

    similarity = staticmethod(similarity)


# pages: the query is page 2 (grade 2), page 9 (grade 1) second, page 5 last: the correct NDCG@5 is 1
FIXED = {"2": [1.0, 0.0, 0.0], "9": [0.8, 0.6, 0.0], "5": [0.0, 0.0, 1.0]}


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (28, 28), (120, 40, 90)).save(path, format="PNG")


def _parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """HMDB51 with a label missing from labels.txt; MVBench with an answer that is not an option; a ViDoRe
    task with graded qrels in an order a set changes."""
    root = tmp_path_factory.mktemp("mmeb_scoring")
    vt = root / "video-tasks"
    (vt / "HMDB51").mkdir(parents=True)
    (vt / "HMDB51" / "labels.txt").write_text("run\njump\nswim\n")
    rows = [{"video_id": f"v{i}", "pos_text": label} for i, label in enumerate(["run", "jump", "fly"])]
    for row in rows:
        _png(vt / "frames" / "video_cls" / "HMDB51" / row["video_id"] / "0000.png")
    _parquet(vt / "HMDB51" / "test-00000-of-00001.parquet", rows)
    rows = []
    for i, (candidates, answer) in enumerate([(["red", "blue"], "red"), (["up", "down"], "left"),
                                              (["one", "two", "three"], "two")]):
        rows.append({"question": f"q{i}?", "video": f"m{i}.mp4", "candidates": candidates, "answer": answer})
        _png(vt / "frames" / "video_qa" / "MVBench" / "action_antonym" / f"m{i}.mp4" / "0000.png")
    _parquet(vt / "MVBench" / "action_antonym" / "train-00000-of-00001.parquet", rows)
    base = root / "visdoc-tasks" / "arxivqa_test_subsampled_beir"
    for cid in (2, 5, 9):
        _png(root / "visdoc-tasks" / "ViDoRe_arxivqa" / f"{cid}.png")
    _parquet(base / "corpus" / "test-00000-of-00001.parquet", [{"corpus-id": cid} for cid in (2, 5, 9)])
    _parquet(base / "queries" / "test-00000-of-00001.parquet", [{"query-id": 1, "query": "page two"}])
    _parquet(base / "qrels" / "test-00000-of-00001.parquet", [{"query-id": 1, "corpus-id": 2, "score": 2},
                                                               {"query-id": 1, "corpus-id": 9, "score": 1}])
    return root


# videos v0/v1/v2 look like run/jump/fly (fly: the label labels.txt lacks); MVBench videos look like their
# first option, except m2 (its answer); the query finds page 2
SAME = {"v0": "run", "v1": "jump", "v2": "fly", "m0.mp4": "(A) red", "m1.mp4": "(A) up", "m2.mp4": "(B) two",
        mmeb_data._text(mmeb_data.DOC_QUERY, "page two"): "2"}
TASKS = ["HMDB51", "MVBench", "ViDoRe_arxivqa"]


def test_correct_scoring_fails_a_task_with_a_positive_that_is_no_candidate(root, tmp_path):
    summary = mmeb.run_benchmark(KeyModel(SAME), root, tmp_path, tasks=TASKS)
    tasks = summary["tasks"]
    assert tasks["HMDB51"]["status"] == "error" and "'fly'" in tasks["HMDB51"]["reason"]
    assert tasks["MVBench"]["status"] == "error" and "'left' is not among the options" in tasks["MVBench"]["reason"]
    assert tasks["ViDoRe_arxivqa"]["status"] == "done" and tasks["ViDoRe_arxivqa"]["score"] == 1.0
    assert summary["scoring"] == "correct" and "scoring" not in summary["fingerprint"]


def test_vlm2vec_scoring_keeps_those_queries_as_vlm2vec_does_with_a_warning(root, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tte_flash.mmeb"):
        summary = mmeb.run_benchmark(KeyModel(SAME), root, tmp_path, tasks=TASKS, scoring="vlm2vec")
    tasks = summary["tasks"]
    assert {r["status"] for r in tasks.values()} == {"done"}
    # VLM2Vec's pool starts with each query's own label: 'fly' is a candidate there, and v2 finds it
    hmdb = tasks["HMDB51"]
    assert hmdb["score"] == 1.0 and hmdb["added_candidates"] == 1 and hmdb["misses"] == 0
    assert hmdb["num_candidates"] == 4
    # MVBench: VLM2Vec's label for an answer no option has is '(@) left', which no option is: a miss
    assert tasks["MVBench"]["score"] == pytest.approx(2 / 3) and tasks["MVBench"]["misses"] == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("HMDB51: 1 of 3 queries have a label the label list lacks") for m in warned)
    assert any(m.startswith("MVBench: 1 of 3 queries scored as misses") for m in warned)
    assert any("1 of 3 queries scored as misses" in n for n in tasks["MVBench"]["notes"])
    # page 2 (grade 2) ranks first; VLM2Vec's set order {2, 9} -> [9, 2] hands it grade 1
    expected = described_metrics(_ranked_pages(), [2, 9], [2, 1], 5)["ndcg_linear@5"]
    assert tasks["ViDoRe_arxivqa"]["score"] == expected < 1.0
    assert summary["fingerprint"]["scoring"] == "vlm2vec"
    stored = json.loads((tmp_path / "visdoc" / "ViDoRe_arxivqa_score.json").read_text())
    assert stored["ndcg_linear@5"] == expected and stored["scoring"] == "vlm2vec"


def _ranked_pages():
    return [2, 9, 5]  # by FIXED


def test_both_scorings_in_the_summary(root, tmp_path):
    summary = mmeb.run_benchmark(KeyModel(SAME), root, tmp_path, tasks=TASKS, scoring="both")
    tasks = summary["tasks"]
    doc = tasks["ViDoRe_arxivqa"]
    assert doc["status"] == "done" and doc["score"] == 1.0 == doc["scores"]["correct"]
    assert doc["scores"]["vlm2vec"] == described_metrics(_ranked_pages(), [2, 9], [2, 1], 5)["ndcg_linear@5"]
    assert doc["by_scoring"]["vlm2vec"]["ndcg_linear@5"] == doc["scores"]["vlm2vec"]
    hmdb = tasks["HMDB51"]  # the correct scoring still flags it; its vlm2vec number is kept and counted there
    assert hmdb["status"] == "error" and "'fly'" in hmdb["reason"] and hmdb["scores"]["vlm2vec"] == 1.0
    aggregates = summary["aggregates"]
    assert summary["aggregate"] == aggregates["correct"]
    assert aggregates["correct"]["overall"]["n"] == 1 and aggregates["vlm2vec"]["overall"]["n"] == 3
    assert aggregates["vlm2vec"]["overall"]["score"] == pytest.approx(np.mean([1.0, 2 / 3, doc["scores"]["vlm2vec"]]))
    markdown = (tmp_path / "summary.md").read_text()
    assert "| scoring | Overall |" in markdown and "| correct | 100.0 (1/78) |" in markdown
    assert "| category | task | metric | correct | vlm2vec | vlm2vec - correct | queries |" in markdown
    assert f"| VDRv1 | ViDoRe_arxivqa | ndcg_linear@5 | 100.0 | {100 * doc['scores']['vlm2vec']:.1f} |" in markdown
    assert "| CLS | HMDB51 | hit@1 | ERROR | 100.0 | - | 3 |" in markdown
    # read back: the same summary, nothing recomputed for the finished task
    again = mmeb.run_benchmark(KeyModel(SAME), root, tmp_path, tasks=TASKS, scoring="both")
    assert again["tasks"]["ViDoRe_arxivqa"]["resumed"] and again["aggregates"] == aggregates
    with pytest.raises(ValueError, match="another model or setting"):  # a correct-scored run is another setting
        mmeb.run_benchmark(KeyModel(SAME), root, tmp_path, tasks=TASKS)


def test_cli_scoring_with_the_tiny_model(root, tmp_path, capsys):
    args = ["--model", "tiny", "--data_root", str(root), "--tasks", "HMDB51", "ViDoRe_arxivqa",
            "--think_tokens", "0", "--batch_size", "4"]
    torch.manual_seed(0)
    assert mmeb.main(["--scoring", "vlm2vec", *args, "--output", str(tmp_path / "v")]) == 0
    summary = json.loads((tmp_path / "v" / "summary.json").read_text())
    assert summary["scoring"] == "vlm2vec" and {r["status"] for r in summary["tasks"].values()} == {"done"}
    torch.manual_seed(0)
    assert mmeb.main(["--scoring", "both", *args, "--output", str(tmp_path / "b")]) == 1  # HMDB51 fails correct
    printed = capsys.readouterr().out
    assert "| correct | vlm2vec | vlm2vec - correct |" in printed
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert set(summary["aggregates"]) == {"correct", "vlm2vec"}
    assert mmeb._SCORING.get() == "correct"  # the CLI's scoring does not outlive its run
    with pytest.raises(SystemExit):
        mmeb.main(["--scoring", "exact", *args, "--output", str(tmp_path / "x")])


def test_evaluate_cli_takes_scoring_too(root, tmp_path, capsys):
    """``python -m tte_flash.evaluate --benchmark mmeb-v2 --scoring vlm2vec`` is the same run as the mmeb CLI's."""
    from tte_flash import evaluate
    args = ["--model", "tiny", "--data_root", str(root), "--tasks", "ViDoRe_arxivqa", "--think_tokens", "0",
            "--batch_size", "4"]
    torch.manual_seed(0)
    assert evaluate.main(["--benchmark", "mmeb-v2", "--scoring", "vlm2vec", *args, "--output", str(tmp_path / "e")]) == 0
    torch.manual_seed(0)
    assert mmeb.main(["--scoring", "vlm2vec", *args, "--output", str(tmp_path / "m")]) == 0
    by_cli = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("e", "m")]
    assert by_cli[0]["scoring"] == by_cli[1]["scoring"] == "vlm2vec"
    assert by_cli[0]["tasks"]["ViDoRe_arxivqa"]["score"] == by_cli[1]["tasks"]["ViDoRe_arxivqa"]["score"]
    with pytest.raises(SystemExit):  # a single file has no vlm2vec procedure
        evaluate.main(["--model", "tiny", "--data", str(tmp_path / "x.jsonl"), "--scoring", "vlm2vec"])


# ---------------------------------------------------------------------------------------- the measured difference

def measure(n: int = 2000, seed: int = 17) -> dict:
    """correct vs vlm2vec on the 2000 random queries of the first test (docs/mmeb.md quotes this):
    ``python tests/test_mmeb_scoring.py`` (the string-id numbers change with PYTHONHASHSEED)."""
    rng = np.random.default_rng(seed)
    out = {"queries": n, "no_ties": {"queries": 0, "two_grades": 0, "ndcg5_differ": 0, "ndcg5_mean_abs_diff": 0.0,
                                     "ndcg5_mean_correct": 0.0, "ndcg5_mean_vlm2vec": 0.0},
           "ties": {"queries": 0, "hit1_correct": 0.0, "hit1_vlm2vec": 0.0, "hit1_differ": 0}}
    for i in range(n):
        ties = i % 4 == 1
        ids, relevant, grades, q, c = random_graded_query(rng, string_ids=i % 2 == 0, tie_levels=3 if ties else None)
        data, keys = task_data([(ids, relevant, grades)]), [str(x) for x in ids]
        vlm = mmeb.score_task(data, q, c, keys, similarity, scoring="vlm2vec")
        correct = mmeb.score_task(data, q, c, keys, similarity)
        if ties:
            t = out["ties"]
            t["queries"] += 1
            t["hit1_correct"] += correct["hit@1"]
            t["hit1_vlm2vec"] += vlm["hit@1"]
            t["hit1_differ"] += vlm["hit@1"] != correct["hit@1"]
        else:
            t = out["no_ties"]
            t["queries"] += 1
            t["two_grades"] += len(set(grades)) > 1
            diff = abs(vlm["ndcg_linear@5"] - correct["ndcg_linear@5"])
            t["ndcg5_differ"] += diff > 1e-12
            t["ndcg5_mean_abs_diff"] += diff
            t["ndcg5_mean_correct"] += correct["ndcg_linear@5"]
            t["ndcg5_mean_vlm2vec"] += vlm["ndcg_linear@5"]
    t = out["no_ties"]
    t["ndcg5_mean_abs_diff_where_differ"] = t["ndcg5_mean_abs_diff"] / max(t["ndcg5_differ"], 1)
    for name in ("ndcg5_mean_abs_diff", "ndcg5_mean_correct", "ndcg5_mean_vlm2vec"):
        t[name] /= t["queries"]
    for name in ("hit1_correct", "hit1_vlm2vec"):
        out["ties"][name] /= out["ties"]["queries"]
    return out


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))
