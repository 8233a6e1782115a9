"""Adaptive think budget: ``encode_query(..., think_tokens="auto")``.

Two policies, both stored in the config so they travel with the checkpoint:

* a **per-task table** learned on validation data: for each task, the smallest K whose score is
  within ``tolerance`` of the best K's score (:func:`budget_table`);
* a **learned predictor** from the query's own K=0 state: multinomial logistic regression on the
  K=0 ``<emb>`` state that predicts, per query, the smallest budget that retrieves its positive
  (:func:`fit_budget_predictor`). Choosing K this way costs one extra K=0 pass, whose embedding is
  reused when the predictor picks K=0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def budget_table(scores: dict[str, dict[int, float]], tolerance: float = 0.01) -> dict[str, int]:
    """``{task: {K: score}}`` -> ``{task: smallest K with score >= best - tolerance}``."""
    table = {}
    for task, by_k in scores.items():
        if not by_k:
            raise ValueError(f"task {task!r} has no scores")
        best = max(by_k.values())
        table[task] = min(int(k) for k, v in by_k.items() if v >= best - tolerance)
    return table


def predictor_targets(correct: dict[int, torch.Tensor]) -> tuple[list[int], torch.Tensor]:
    """Per query, the index of the smallest budget that gets it right (the smallest budget when none does)."""
    budgets = sorted(int(k) for k in correct)
    hits = torch.stack([torch.as_tensor(correct[k]).bool() for k in budgets], dim=1)  # (n, n_budgets)
    first = torch.where(hits.any(1), hits.float().argmax(1), torch.zeros(len(hits), dtype=torch.long))
    return budgets, first


def fit_budget_predictor(k0_states: torch.Tensor, correct: dict[int, torch.Tensor], steps: int = 300,
                         lr: float = 0.05, weight_decay: float = 1e-3, seed: int = 0) -> dict:
    """Fit the predictor; ``correct[K]`` is a bool per query (was its positive ranked first at K)."""
    budgets, targets = predictor_targets(correct)
    x = F.normalize(k0_states.float(), dim=-1)
    torch.manual_seed(seed)
    linear = torch.nn.Linear(x.shape[1], len(budgets))
    optimizer = torch.optim.AdamW(linear.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(linear(x), targets).backward()
        optimizer.step()
    return {"budgets": budgets, "weight": linear.weight.detach().tolist(), "bias": linear.bias.detach().tolist()}


def predict_budgets(predictor: dict, k0_states: torch.Tensor) -> list[int]:
    weight = torch.tensor(predictor["weight"])
    bias = torch.tensor(predictor["bias"])
    choice = (F.normalize(k0_states.float(), dim=-1) @ weight.T + bias).argmax(-1)
    return [predictor["budgets"][i] for i in choice.tolist()]
