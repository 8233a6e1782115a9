"""training/think_budget_curve.py: fixed-K rows agree with tte_flash.evaluate on the same test rows, the oracle
bounds every fixed K, the auto rows account for every test query, and --save_policy writes the policy."""
import json

import pytest
import torch

from tte_flash import TTEFlashModel
from tte_flash.data import load_rows
from tte_flash.evaluate import evaluate_many
from tte_flash.synthetic import generate
from conftest import load_script



def _script():
    return load_script("training/think_budget_curve.py", "think_budget_curve")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random checkpoint folder and 24 mixed grid/text eval rows."""
    root = tmp_path_factory.mktemp("budget_curve")
    torch.manual_seed(3)
    TTEFlashModel.from_preset("tiny").save_pretrained(root / "model")
    generate(root / "data", n_train=0, n_eval=24, seed=0, hops=1, task="mixed")
    return root


@pytest.fixture(scope="module")
def curve(setup):
    out = setup / "curve.json"
    _script().main(["--model", str(setup / "model"), "--data", str(setup / "data"), "--budgets", "0", "1", "2", "99",
                    "--batch_size", "8", "--output", str(out)])
    return json.loads(out.read_text())


def test_every_row_and_the_dropped_budget(curve):
    assert [r["name"] for r in curve["rows"]] == ["K=0", "K=1", "K=2", "auto: predictor (--policy)", "auto: table",
                                                  "oracle"]
    assert curve["budgets"] == [0, 1, 2] and curve["budgets_dropped"] == [99]
    split = curve["split"]
    assert sorted(split["calibration"] + split["test"]) == list(range(24)) and len(split["test"]) == 12
    for row in curve["rows"]:
        assert {"hit@1", "ndcg@5"} <= set(row["test"]) and row["ms_per_query"] > 0
        assert row["hit@1_lost"] == pytest.approx(curve["reference"]["best_fixed_hit@1"] - row["test"]["hit@1"])
    assert "shared machine" in curve["timing_note"] and curve["versions"]["torch"] and "commit" in curve


def test_fixed_k_matches_the_evaluator_on_the_test_rows(setup, curve):
    rows = load_rows(setup / "data" / "eval.jsonl")
    test_rows = [rows[i] for i in curve["split"]["test"]]
    model = TTEFlashModel.from_pretrained(setup / "model").eval()
    result = evaluate_many(model, test_rows, setup / "data", think_tokens=[0, 1, 2], shortcut=False, batch_size=5)
    fixed = {r["think_tokens"]: r for r in curve["rows"] if r["kind"] == "fixed"}
    for run in result["runs"]:
        assert fixed[run["think_tokens"]]["test"]["hit@1"] == pytest.approx(run["metrics"]["hit@1"], abs=1e-12)
        assert fixed[run["think_tokens"]]["test"]["ndcg@5"] == pytest.approx(run["metrics"]["ndcg@5"], abs=1e-12)
    per_k = curve["per_query"]["fixed"]
    for k, row in fixed.items():  # the summary is the mean of the per-query results
        assert row["test"]["hit@1"] == pytest.approx(sum(per_k[str(k)]["test"]["correct"]) / 12)
        assert row["calibration"]["hit@1"] == pytest.approx(sum(per_k[str(k)]["calibration"]["correct"]) / 12)


def test_oracle_bounds_fixed_k_and_auto_accounts_for_every_query(curve):
    rows = {r["name"]: r for r in curve["rows"]}
    per_k = curve["per_query"]["fixed"]
    for row in curve["rows"]:
        if row["kind"] != "oracle":
            assert rows["oracle"]["test"]["hit@1"] >= row["test"]["hit@1"]
            assert rows["oracle"]["test"]["ndcg@5"] >= row["test"]["ndcg@5"] - 1e-12
    any_k = [any(per_k[k]["test"]["correct"][i] for k in per_k) for i in range(12)]
    assert rows["oracle"]["test"]["hit@1"] == pytest.approx(sum(any_k) / 12)
    for name in ("auto: predictor (--policy)", "auto: table"):
        assert sum(rows[name]["chosen_k"].values()) == 12
        assert set(int(k) for k in rows[name]["chosen_k"]) <= {0, 1, 2}
    # the package's encode_query("auto") gives each query the embedding of its predicted K
    auto = curve["per_query"]["auto: predictor (--policy)"]
    assert auto["correct"] == [per_k[str(k)]["test"]["correct"][i] for i, k in enumerate(auto["chosen_k"])]
    table = curve["policy"]["table"]
    assert set(table) == {"grid", "text"} and all(k in (0, 1, 2) for k in table.values())


def test_save_policy_rewrites_the_checkpoint(setup, tmp_path):
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(setup / "model", folder)
    (folder / "train_summary.json").write_text("{}")
    out = tmp_path / "curve.json"
    _script().main(["--model", str(folder), "--data", str(setup / "data" / "eval.jsonl"), "--budgets", "0", "2",
                    "--calibration_fraction", "0.25", "--save_policy", "--output", str(out)])
    result = json.loads(out.read_text())
    loaded = TTEFlashModel.from_pretrained(folder)
    assert loaded.config.think_budget_predictor == result["policy"]["predictor"]
    assert loaded.config.think_budget_table is None  # --policy predictor: only the measured policy is stored
    assert (folder / "train_summary.json").is_file() and not list(tmp_path.glob(".model.*"))
    assert len(result["split"]["calibration"]) == 6


def test_bad_arguments(setup):
    script = _script()
    with pytest.raises(ValueError, match="calibration_fraction"):
        script.split_rows(24, 1.0, 0)
    with pytest.raises(ValueError, match="max_think_tokens=4"):
        script.cap_budgets([8, 16], 4)
    assert script.cap_budgets([4, 0, 32, 4], 16) == ([0, 4], [32])
