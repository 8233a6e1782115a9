"""Evaluation: metrics against hand-worked rankings and a brute-force reference, evaluate() end to end."""
import itertools
import json
import math

import numpy as np
import pytest
import torch

from tte_flash.card import eval_rows
from tte_flash.data import eval_example, load_rows
from tte_flash.evaluate import evaluate, evaluate_many, hit_at_k, main, ndcg_at_k, pad_scores, ranks
from tte_flash.synthetic import COLOURS, generate

# positive (column 0) first; worked by hand:
# row 0: highest -> rank 1; row 1: two above, one tie -> rank 4 (pessimistic), 3 (optimistic);
# row 2: all tied -> rank 3 (pessimistic); row 3: lowest of 6 -> rank 6
SCORES = torch.tensor([[0.9, 0.1, 0.2, 0.3, 0.0, 0.0],
                       [0.5, 0.7, 0.5, 0.9, 0.1, 0.0],
                       [0.3, 0.3, 0.3, -1.0, -2.0, -3.0],
                       [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])


def test_metrics_by_hand():
    assert ranks(SCORES).tolist() == [1, 4, 3, 6]
    assert ranks(SCORES, ties="optimistic").tolist() == [1, 3, 1, 6]
    assert hit_at_k(SCORES, 1) == 0.25
    assert hit_at_k(SCORES, 3) == 0.5
    assert hit_at_k(SCORES, 5) == 0.75
    assert ndcg_at_k(SCORES, 5) == pytest.approx((1 + 1 / math.log2(5) + 0.5 + 0) / 4)  # rank 3 -> 0.5
    assert ndcg_at_k(SCORES, 3) == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert ndcg_at_k(SCORES[2:3], 5) == 0.5
    # expected over random tie orders: row 2 is rank 1, 2 or 3 with equal chance
    assert hit_at_k(SCORES[2:3], 1, ties="expected") == pytest.approx(1 / 3)
    assert ndcg_at_k(SCORES[2:3], 5, ties="expected") == pytest.approx((1 + 1 / math.log2(3) + 0.5) / 3)
    assert hit_at_k(SCORES[1:2], 3, ties="expected") == pytest.approx(0.5)  # rank 3 or 4


def test_all_equal_scores_get_no_credit():
    scores = torch.zeros(5, 8)
    assert hit_at_k(scores, 1) == 0.0 and ndcg_at_k(scores, 5) == 0.0
    assert hit_at_k(scores, 1, ties="expected") == pytest.approx(1 / 8)


def brute_force(scores: np.ndarray, k: int):
    """Hit@k and NDCG@k averaged over every order of the candidates, with a stable sort (ties kept in
    that order): the expected value; and with the positive placed last among equals: pessimistic."""
    hits, gains, worst_hits, worst_gains = [], [], [], []
    for row in scores:
        n = len(row)
        row_hits, row_gains = [], []
        for order in itertools.permutations(range(n)):
            ranked = sorted(order, key=lambda j: -row[j])  # stable: equal scores keep this order
            rank = ranked.index(0) + 1
            row_hits.append(rank <= k)
            row_gains.append(1 / math.log2(rank + 1) if rank <= k else 0.0)
        hits.append(np.mean(row_hits))
        gains.append(np.mean(row_gains))
        rank = 1 + sum(row[j] >= row[0] for j in range(1, n))
        worst_hits.append(rank <= k)
        worst_gains.append(1 / math.log2(rank + 1) if rank <= k else 0.0)
    return np.mean(hits), np.mean(gains), np.mean(worst_hits), np.mean(worst_gains)


@pytest.mark.parametrize("n_candidates,k", [(1, 1), (3, 1), (5, 2), (6, 5)])
def test_metrics_match_brute_force(rng, n_candidates, k):
    scores = rng.integers(0, 3, size=(7, n_candidates)).astype(np.float32)  # many ties
    expected_hit, expected_ndcg, worst_hit, worst_ndcg = brute_force(scores, k)
    assert hit_at_k(scores, k, ties="expected") == pytest.approx(expected_hit)
    assert ndcg_at_k(scores, k, ties="expected") == pytest.approx(expected_ndcg)
    assert hit_at_k(scores, k) == pytest.approx(worst_hit)
    assert ndcg_at_k(scores, k) == pytest.approx(worst_ndcg)


def test_metric_input_checks_and_padding():
    with pytest.raises(ValueError, match="n_queries, n_candidates"):
        hit_at_k(torch.zeros(4))
    with pytest.raises(ValueError, match="unknown ties"):
        ndcg_at_k(SCORES, ties="random")
    padded = pad_scores([[0.5, 0.1], [0.2, 0.3, 0.1]])
    assert padded.shape == (2, 3) and padded[0, 2] == float("-inf")
    assert ranks(padded).tolist() == [1, 2]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_data")
    return generate(out, n_train=0, n_eval=10, seed=0, hops=2, task="mixed")["paths"]


class OracleModel:
    """Embeds a colour name as its one-hot vector and a query as its answer's (read from the row's
    trace), or as one constant vector: a perfect and a useless model for the protocol."""

    def __init__(self, answers, constant=False):
        self.answers, self.constant = answers, constant

    def _vec(self, name):
        v = torch.zeros(len(COLOURS) + 1)
        v[COLOURS.index(name) if name in COLOURS else -1] = 1
        return v

    def encode_query(self, items, **kwargs):
        return torch.stack([torch.ones(len(COLOURS) + 1) if self.constant else self._vec(self.answers[i["text"]])
                            for i in items])

    def encode_document(self, items, **kwargs):
        self.n_documents = len(items)
        return torch.stack([self._vec(i["text"]) for i in items])

    similarity = staticmethod(lambda a, b: a @ b.T)


def test_protocol_with_perfect_and_constant_models(synthetic):
    rows = load_rows(synthetic["eval"])
    answers = {eval_example(r, synthetic["image_root"])[0]["text"]: r["tgt_text"][0] for r in rows}
    perfect = OracleModel(answers)
    result = evaluate(perfect, synthetic["eval"], think_tokens=4)
    assert result["metrics"] == {"hit@1": 1.0, "ndcg@5": 1.0}
    assert perfect.n_documents == len(COLOURS)  # identical candidates across rows encoded once
    assert result["n"] == 10 and result["think_tokens"] == 4 and result["mode"] == "latent"
    assert result["dataset"] == "synthetic-mixed-2hop"  # from meta.json
    constant = evaluate(OracleModel(answers, constant=True), rows, synthetic["image_root"], shortcut=False)
    assert constant["metrics"] == {"hit@1": 0.0, "ndcg@5": 0.0}  # all tied: pessimistic
    assert "shortcuts" not in constant


def test_evaluate_tiny_model_end_to_end(tiny_model, synthetic):
    rows = load_rows(synthetic["eval"])[:6]
    result = evaluate_many(tiny_model, rows, synthetic["image_root"], think_tokens=[0, 3], batch_size=4)
    assert [(r["mode"], r["think_tokens"]) for r in result["runs"]] == [("latent", 0), ("latent", 3)]
    assert result["shortcuts"]["random"]["hit@1"] == pytest.approx(1 / 8)
    # the same numbers by hand: each query against its own candidates
    for run in result["runs"]:
        hits, gains = [], []
        for row in rows:
            query, candidates = eval_example(row, synthetic["image_root"])
            q = tiny_model.encode_query(query, think_tokens=run["think_tokens"], convert_to_tensor=True)
            scores = tiny_model.similarity(q, tiny_model.encode_document(candidates, convert_to_tensor=True))[0]
            rank = 1 + int((scores[1:] >= scores[0]).sum())
            hits.append(rank == 1)
            gains.append(1 / math.log2(rank + 1) if rank <= 5 else 0.0)
        assert run["metrics"]["hit@1"] == pytest.approx(np.mean(hits))
        assert run["metrics"]["ndcg@5"] == pytest.approx(np.mean(gains), abs=1e-6)
        assert run["queries_per_second"] > 0 and run["shortcut_best"]["hit@1"] >= 1 / 8


def test_explicit_cot_mode(tiny_model, synthetic):
    result = evaluate(tiny_model, synthetic["eval"], mode="explicit-cot", max_cot_tokens=3, limit=2, shortcut=False)
    assert result["mode"] == "explicit-cot" and result["max_cot_tokens"] == 3 and result["n"] == 2


def test_cli_writes_json(synthetic, tmp_path, capsys, caplog):
    output = tmp_path / "results.json"
    with caplog.at_level("WARNING", logger="tte_flash.evaluate"):
        assert main(["--model", "tiny", "--data", synthetic["eval"], "--image-root", synthetic["image_root"],
                     "--think_tokens", "0", "2", "--limit", "4", "--batch_size", "2", "--output", str(output)]) == 0
    assert "'tiny' has random weights" in caplog.text  # said loudly, not silently evaluated
    printed = capsys.readouterr().out
    assert "hit@1" in printed and "no-reasoning shortcuts" in printed
    result = json.loads(output.read_text())
    assert [r["think_tokens"] for r in result["runs"]] == [0, 2] and result["n"] == 4
    assert set(result["runs"][0]["metrics"]) == {"hit@1", "ndcg@5"}
    assert {"torch", "transformers"} <= set(result["versions"])
    card_rows = eval_rows(result)  # the model card reads this file as it is
    assert len(card_rows) == 4 and all(r["shortcut"] is not None for r in card_rows)


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):  # no default model: random weights are never used by accident
        main(["--data", str(tmp_path / "missing.jsonl")])
    assert "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # mmeb-file needs --data
        main(["--model", "tiny"])
    assert "--data is required" in capsys.readouterr().err
    assert main(["--model", "tiny", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    (tmp_path / "eval.jsonl").write_text(json.dumps({"qry_text": "q", "qry_img_path": "gone.png",
                                                     "tgt_text": ["a", "b"], "tgt_img_path": ["", ""]}) + "\n")
    assert main(["--model", "tiny", "--data", str(tmp_path / "eval.jsonl"), "--no_shortcut"]) == 2
    assert "row 1" in (err := capsys.readouterr().err) and str(tmp_path / "gone.png") in err


def test_embedding_spread_matches_hand_computed_cosines(tiny_model):
    from tte_flash.evaluate import embedding_spread
    queries = ["a red square", "two blue circles", "a green line"]
    documents = ["red", "blue", "green", "yellow"]
    result = embedding_spread(tiny_model, queries, documents, think_tokens=2)
    q = torch.nn.functional.normalize(torch.as_tensor(tiny_model.encode_query(queries, think_tokens=2)), dim=-1)
    d = torch.nn.functional.normalize(torch.as_tensor(tiny_model.encode_document(documents)), dim=-1)
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    assert result["query_query"] == pytest.approx(sum(float(q[i] @ q[j]) for i, j in pairs) / 6, abs=1e-5)
    assert result["query_doc"] == pytest.approx(float((q @ d.T).mean()), abs=1e-5)
    # a collapsed input set: the same query repeated has spread exactly 1
    assert embedding_spread(tiny_model, ["same"] * 3, documents)["query_query"] == pytest.approx(1.0, abs=1e-5)
