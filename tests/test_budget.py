"""Adaptive think budget: the per-task table and the K=0-state predictor."""
import numpy as np
import pytest
import torch

from tte_flash.budget import budget_table, fit_budget_predictor, predict_budgets, predictor_targets


def test_budget_table_picks_smallest_k_within_tolerance():
    scores = {"vqa": {0: 0.40, 4: 0.52, 16: 0.53, 32: 0.525}, "retrieval": {0: 0.7, 16: 0.69}}
    assert budget_table(scores, tolerance=0.01) == {"vqa": 4, "retrieval": 0}
    assert budget_table(scores, tolerance=0.0) == {"vqa": 16, "retrieval": 0}


def test_predictor_targets_smallest_correct_budget():
    correct = {0: [True, False, False], 16: [True, True, False], 4: [False, True, False]}
    budgets, first = predictor_targets(correct)
    assert budgets == [0, 4, 16] and first.tolist() == [0, 1, 0]


def test_predictor_learns_a_separable_rule():
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(200, 16, generator=gen)
    needs_thinking = states[:, 0] > 0  # queries on one side need K=16
    predictor = fit_budget_predictor(states, {0: ~needs_thinking, 16: torch.ones(200, dtype=torch.bool)})
    chosen = predict_budgets(predictor, states)
    accuracy = np.mean([c == (16 if n else 0) for c, n in zip(chosen, needs_thinking.tolist())])
    assert accuracy > 0.9


def test_auto_uses_task_table_then_predictor(fresh_tiny):
    model = fresh_tiny()
    queries = ["short q", "a much longer query about several things", "third"]
    with pytest.raises(ValueError, match="auto"):
        model.encode_query(queries, think_tokens="auto")
    model.set_think_budget_policy(table={"vqa": 4})
    np.testing.assert_array_equal(model.encode_query(queries, think_tokens="auto", task="vqa"),
                                  model.encode_query(queries, think_tokens=4))
    k0 = model.encode_query(queries, think_tokens=0, normalize_embeddings=False, convert_to_tensor=True)
    predictor = fit_budget_predictor(k0, {0: torch.tensor([True, False, True]), 8: torch.ones(3, dtype=torch.bool)})
    model.set_think_budget_policy(predictor=predictor)
    chosen = predict_budgets(predictor, k0)
    expected = np.stack([model.encode_query(q, think_tokens=k) for q, k in zip(queries, chosen)])
    np.testing.assert_allclose(model.encode_query(queries, think_tokens="auto"), expected, atol=1e-5)
    with pytest.raises(ValueError, match="think_tokens"):
        model.set_think_budget_policy(table={"x": 99})


def test_budget_policy_is_saved_with_the_checkpoint(fresh_tiny, tmp_path):
    from tte_flash import TTEFlashModel
    model = fresh_tiny()
    predictor = {"budgets": [0, 16], "weight": [[0.0] * 64, [1.0] * 64], "bias": [0.0, 0.0]}
    model.set_think_budget_policy(table={"vqa": 4}, predictor=predictor)
    model.save_pretrained(tmp_path)
    loaded = TTEFlashModel.from_pretrained(tmp_path)
    assert loaded.config.think_budget_table == {"vqa": 4}
    assert loaded.config.think_budget_predictor == predictor
