"""NaN or inf in a score or an embedding is an error naming the rows, never a rank (issue 18, item 1).

Before: ``hit_at_k(torch.full((3, 8), nan))`` was 1.0 (NaN compares false, so nothing ranked above the
positive), ``python -m tte_flash.evaluate`` on a NaN checkpoint reported Hit@1 1.0 / NDCG@5 1.0, the
MMEB-V2 runner scored NaN as 0 and ``similarity`` passed NaN and inf through."""
import json
import re

import numpy as np
import pytest
import torch
from test_evaluate import OracleModel, synthetic  # noqa: F401  (the module-scoped synthetic data fixture)
from test_mmeb import ORACLE, IdModel, fixture_root  # noqa: F401  (the MMEB-V2 fixture in the published layout)

from tte_flash import mmeb
from tte_flash.data import eval_example, load_rows
from tte_flash.evaluate import evaluate, evaluate_many, main
from tte_flash.ranking import (NonFiniteScoresError, _ranked_metrics, check_finite, hit_at_k, ndcg_at_k, pad_scores,
                               ranking_metrics, ranks)

NAN, INF = float("nan"), float("inf")

METRICS = {
    "hit@1": lambda s: hit_at_k(s, 1),
    "hit@3 expected": lambda s: hit_at_k(s, 3, ties="expected"),
    "ndcg@5": lambda s: ndcg_at_k(s, 5),
    "ndcg@5 optimistic": lambda s: ndcg_at_k(s, 5, ties="optimistic"),
    "ndcg@2 expected": lambda s: ndcg_at_k(s, 2, ties="expected"),
    "ranks": lambda s: ranks(s),
}


def _scores(row=None, column=0, value=NAN):
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.3], [0.5, 0.7, 0.5, 0.9], [0.3, 0.3, 0.3, -1.0]], dtype=torch.float64)
    if row is not None:
        scores[row, column] = value
    return scores


CASES = {  # scores -> the rows the error must name
    "all NaN (the audit's case)": (torch.full((3, 8), NAN), [0, 1, 2]),
    "one NaN row": (_scores(1, 2, NAN), [1]),
    "NaN positive": (_scores(2, 0, NAN), [2]),
    "+inf candidate": (_scores(2, 3, INF), [2]),
    "+inf positive": (_scores(0, 0, INF), [0]),
    "-inf positive": (_scores(1, 0, -INF), [1]),
    "-inf before a candidate (not padding)": (_scores(0, 1, -INF), [0]),
}


@pytest.mark.parametrize("metric", list(METRICS))
@pytest.mark.parametrize("case", list(CASES))
def test_every_metric_refuses_non_finite_scores_naming_the_rows(metric, case):
    scores, rows = CASES[case]
    with pytest.raises(NonFiniteScoresError) as info:
        METRICS[metric](scores)
    assert info.value.rows == rows
    message = str(info.value)
    assert f"{len(rows)} of {len(scores)} rows" in message and "NaN or inf" in message
    assert all(f"row {r}:" in message for r in rows)
    assert "diverged" in message and "corrupted checkpoint" in message  # the likely cause
    assert isinstance(info.value, ValueError)  # callers that catch ValueError keep working


def test_the_audit_case_and_what_each_row_holds():
    with pytest.raises(NonFiniteScoresError, match=r"3 of 3 rows .*row 0: NaN, row 1: NaN, row 2: NaN"):
        hit_at_k(torch.full((3, 8), NAN))
    scores = torch.zeros(3, 4)
    scores[0, 1], scores[2, 0], scores[2, 1] = INF, NAN, -INF
    with pytest.raises(NonFiniteScoresError, match=r"2 of 3 rows .*row 0: \+inf, row 2: NaN/-inf"):
        ndcg_at_k(scores)
    with pytest.raises(NonFiniteScoresError, match="-inf is only padding"):
        hit_at_k(_scores(1, 0, -INF))
    with pytest.raises(NonFiniteScoresError):  # numpy and nested lists too
        hit_at_k(np.full((2, 3), np.nan))
    with pytest.raises(NonFiniteScoresError):
        hit_at_k([[0.5, NAN]])


def test_trailing_minus_inf_is_padding_not_an_error():
    padded = pad_scores([[0.5, 0.1], [0.2, 0.3, 0.1], [0.4]])
    assert ranks(padded).tolist() == [1, 2, 1]
    assert hit_at_k(padded) == pytest.approx(2 / 3) and ndcg_at_k(padded, ties="expected") > 0
    scores = torch.tensor([[0.5, -INF, 0.4, -INF]])  # -inf followed by a real candidate: not padding
    with pytest.raises(NonFiniteScoresError, match="row 0: -inf"):
        hit_at_k(scores)


def test_graded_relevance_metrics_refuse_non_finite_scores():
    with pytest.raises(NonFiniteScoresError, match="NaN"):
        ranking_metrics({"a": NAN, "b": 0.1}, {"a": 1})
    with pytest.raises(NonFiniteScoresError, match=r"\+inf"):
        ranking_metrics({"a": 0.2, "b": INF}, {"a": 1})
    with pytest.raises(NonFiniteScoresError, match="-inf"):
        _ranked_metrics(np.array([-INF, 0.1]), np.array([1.0, 0.0]), [1.0], (1, 5))
    assert ranking_metrics({"a": 0.9, "b": 0.1}, {"a": 1})["hit@1"] == 1.0  # finite: unchanged


def test_check_finite_names_labels_and_the_first_few():
    values = torch.zeros(9, 4)
    assert check_finite(values) is values  # finite: returned as given
    values[1:9, 2] = NAN
    with pytest.raises(NonFiniteScoresError) as info:
        check_finite(values, "query embeddings", names=[f"q{i}" for i in range(9)], label="query")
    message = str(info.value)
    assert message.startswith("query embeddings: 8 of 9 rows hold NaN or inf values (query q1: NaN")
    assert "query q5: NaN, and 3 more" in message and "query q6" not in message
    assert info.value.rows == list(range(1, 9)) and info.value.names == [f"q{i}" for i in range(1, 9)]
    with pytest.raises(NonFiniteScoresError, match=r"1 of 1 rows .*row 0: \+inf"):
        check_finite(torch.tensor([1.0, INF]))  # a 1-D vector is one row
    assert check_finite(torch.arange(3)) is not None  # integers are always finite


# ---------------------------------------------------------------------------------------- the model

def _nan_model(fresh_tiny):
    model = fresh_tiny()
    with torch.no_grad():
        model.model.language_model.norm.weight.fill_(NAN)  # every embedding NaN, as after a diverged run
    return model


def test_similarity_refuses_nan_and_inf_embeddings(tiny_model):
    q, d = torch.randn(3, 8), torch.randn(5, 8)
    assert tiny_model.similarity(q, d).shape == (3, 5)
    q[1, 0] = NAN
    with pytest.raises(NonFiniteScoresError, match=r"query embeddings: 1 of 3 rows .*query 1: NaN"):
        tiny_model.similarity(q, d)
    d[4, 7] = -INF
    with pytest.raises(NonFiniteScoresError, match=r"document embeddings: 1 of 5 rows .*document 4: -inf"):
        tiny_model.similarity(torch.randn(3, 8), d)
    with pytest.raises(NonFiniteScoresError, match=r"query 0: \+inf"):  # 1-D numpy
        tiny_model.similarity(np.array([INF] + [0.0] * 7, dtype=np.float32), np.ones((2, 8), dtype=np.float32))


def test_a_nan_model_cannot_encode(fresh_tiny):
    model = _nan_model(fresh_tiny)
    inputs = ["a red square", "two blue circles", "what colour is the sky?"]
    with pytest.raises(NonFiniteScoresError) as info:
        model.encode_query(inputs, think_tokens=2, batch_size=2)
    message = str(info.value)
    assert message.startswith("embeddings of a batch (think_tokens=2, mode=latent): 2 of 2 rows hold NaN")
    assert re.search(r"\(input (\d): NaN, input (?!\1)\d: NaN\)", message) and "corrupted checkpoint" in message
    assert set(info.value.names) <= {0, 1, 2} and len(info.value.names) == 2  # the inputs' indices
    with pytest.raises(NonFiniteScoresError, match="input 0: NaN"):
        model.encode_document("one input")
    with pytest.raises(NonFiniteScoresError, match="input 0: NaN"):
        model.encode(inputs[:1], convert_to_tensor=True, normalize_embeddings=False)


def test_only_the_nan_inputs_are_named(fresh_tiny, monkeypatch):
    model = fresh_tiny()
    forward = type(model).tte_forward

    def nan_for_the_second(self, batch):  # a NaN activation in one input only (e.g. an fp16 overflow)
        out = forward(self, batch)
        out.embeddings[1] = NAN
        return out
    monkeypatch.setattr(type(model), "tte_forward", nan_for_the_second)
    with pytest.raises(NonFiniteScoresError) as info:
        model.encode_query(["a", "b", "c", "d"], think_tokens=0, batch_size=4, max_batch_tokens=None)
    assert len(info.value.rows) == 1 and "1 of 4 rows" in str(info.value)


# ---------------------------------------------------------------------------------------- the file evaluator

def test_evaluate_refuses_a_nan_model(fresh_tiny, synthetic):  # noqa: F811
    rows = load_rows(synthetic["eval"])[:3]
    with pytest.raises(NonFiniteScoresError, match=r"encoding the candidates.*input \d+: NaN.*corrupted checkpoint"):
        evaluate_many(_nan_model(fresh_tiny), rows, synthetic["image_root"], think_tokens=[0], shortcut=False)


def test_evaluate_names_the_rows_whose_scores_are_nan(synthetic):  # noqa: F811
    rows = load_rows(synthetic["eval"])
    answers = {eval_example(r, synthetic["image_root"])[0]["text"]: r["tgt_text"][0] for r in rows}
    model = OracleModel(answers)
    encode = model.encode_query

    def one_nan_query(items, **kwargs):  # a stand-in without the model's own checks: the scores are checked
        out = encode(items, **kwargs)
        out[1] = NAN
        return out
    model.encode_query = one_nan_query
    with pytest.raises(NonFiniteScoresError, match=r"scores \(latent, K=0\): 1 of 10 rows .*evaluation row 2: NaN"):
        evaluate(model, synthetic["eval"], shortcut=False)


def test_cli_on_a_nan_checkpoint_exits_non_zero_with_the_message(fresh_tiny, synthetic, tmp_path, capsys):  # noqa: F811
    checkpoint = tmp_path / "nan-checkpoint"
    _nan_model(fresh_tiny).save_pretrained(checkpoint)
    capsys.readouterr()
    output = tmp_path / "results.json"
    code = main(["--model", str(checkpoint), "--data", synthetic["eval"], "--limit", "3", "--no_shortcut",
                 "--device", "cpu", "--output", str(output)])
    captured = capsys.readouterr()
    assert code == 2 and not output.exists()
    last = captured.err.strip().splitlines()[-1]  # after transformers' "Loading weights" bar
    assert last.startswith("tte_flash.evaluate: error: ") and "Traceback" not in captured.err
    assert "1 of " in captured.err and "weight tensors hold NaN or inf" in captured.err
    assert "model.language_model.norm.weight" in captured.err and "corrupted checkpoint" in captured.err
    assert "hit@1" not in captured.out  # no score printed
    # finite weights whose activations overflow: refused at the first batch of embeddings, the inputs named
    overflowing = fresh_tiny()
    with torch.no_grad():
        overflowing.model.language_model.norm.weight.fill_(3e38)
    overflowing.save_pretrained(tmp_path / "overflow")
    capsys.readouterr()
    assert main(["--model", str(tmp_path / "overflow"), "--data", synthetic["eval"], "--limit", "3",
                 "--no_shortcut", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "encoding the candidates" in err and re.search(r"input \d+: [+-]inf", err) and "Traceback" not in err
    code = main(["--benchmark", "mmeb-v2", "--model", str(checkpoint), "--data_root", str(tmp_path),
                 "--output", str(tmp_path / "mmeb"), "--tasks", "ImageNet-1K", "--device", "cpu"])
    assert code == 2 and "weight tensors hold NaN or inf" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the MMEB-V2 runner

def test_mmeb_runner_marks_a_non_finite_task_failed(fixture_root, tmp_path):  # noqa: F811
    root, _ = fixture_root
    table = ORACLE.copy()
    table[:, 0] = np.nan  # every embedding NaN, and IdModel's similarity has no check of its own
    summary = mmeb.run_benchmark(IdModel(table), root, tmp_path, tasks=["ImageNet-1K", "MSR-VTT"], think_tokens=0)
    for name in ("ImageNet-1K", "MSR-VTT"):
        result = summary["tasks"][name]
        assert result["status"] == "error" and "score" not in result, result
        assert result["reason"].startswith(f"NonFiniteScoresError: {name}, candidate embeddings: ")
        assert "NaN" in result["reason"] and "corrupted checkpoint" in result["reason"]
        assert not mmeb.score_path(tmp_path, mmeb.TASKS[name]).exists()  # nothing written as a score
    assert summary["aggregate"]["overall"]["score"] is None  # never averaged in as 0
    assert "ImageNet-1K (error): NonFiniteScoresError" in (tmp_path / "summary.md").read_text()
    assert not list((tmp_path / ".cache").glob("*.pt"))  # NaN embeddings are not cached


def test_mmeb_runner_names_the_nan_queries(fixture_root, tmp_path):  # noqa: F811
    root, _ = fixture_root
    model = IdModel(ORACLE)
    encode = model.encode_query

    def nan_queries(items, **kwargs):
        out = encode(items, **kwargs)
        out[0] = NAN
        return out
    model.encode_query = nan_queries
    summary = mmeb.run_benchmark(model, root, tmp_path, tasks=["ImageNet-1K"], think_tokens=[0, 2])
    for k in (0, 2):
        result = summary[k]["tasks"]["ImageNet-1K"]
        assert result["status"] == "error"
        assert "ImageNet-1K, queries, K=0: similarities" in result["reason"]  # K=0 fails first: the whole task
        assert "query 0: NaN" in result["reason"]


def test_mmeb_runner_with_a_nan_tiny_model(fresh_tiny, fixture_root, tmp_path):  # noqa: F811
    root, _ = fixture_root
    summary = mmeb.run_benchmark(_nan_model(fresh_tiny), root, tmp_path, tasks=["ImageNet-1K"], think_tokens=0,
                                 batch_size=4)
    result = summary["tasks"]["ImageNet-1K"]
    assert result["status"] == "error" and re.search(r"input \d+: NaN", result["reason"])
    assert "ImageNet-1K, candidates: embeddings of a batch (think_tokens=0, mode=latent)" in result["reason"]


def test_mmeb_cache_with_nan_embeddings_is_recomputed(fixture_root, tmp_path):  # noqa: F811
    root, _ = fixture_root
    model = IdModel(ORACLE)
    first = mmeb.run_benchmark(model, root, tmp_path, tasks=["ImageNet-1K"], think_tokens=0)
    cache = tmp_path / ".cache" / "ImageNet-1K.candidates.pt"
    stored = torch.load(cache, weights_only=True)
    torch.save({**stored, "embeddings": torch.full_like(stored["embeddings"], NAN)}, cache)
    calls = model.document_calls
    second = mmeb.run_benchmark(model, root, tmp_path, tasks=["ImageNet-1K"], think_tokens=0, overwrite=True)
    assert model.document_calls == calls + 1  # the NaN cache was not used
    assert second["tasks"]["ImageNet-1K"]["score"] == first["tasks"]["ImageNet-1K"]["score"]
    assert json.loads((tmp_path / "summary.json").read_text())["tasks"]["ImageNet-1K"]["status"] == "done"
