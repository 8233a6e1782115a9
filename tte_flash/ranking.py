"""Ranking metrics of the evaluators: Hit@k / NDCG@k with the positive in column 0 and tie handling (the
MMEB-v1-style file evaluator, :mod:`tte_flash.evaluate`, and the shortcut baselines of :mod:`tte_flash.synthetic`),
and graded-relevance metrics over a candidate pool (MMEB-V2, :mod:`tte_flash.mmeb`)."""
from __future__ import annotations

import math

import numpy as np
import torch

TIES = ("pessimistic", "optimistic", "expected")


# ---------------------------------------------------------------------------------------- metrics: positive in column 0

def _greater_equal(scores) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: how many candidates score above the positive (column 0), and how many tie with it."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be [n_queries, n_candidates] with the positive in column 0, got "
                         f"shape {tuple(scores.shape)}")
    positive, others = scores[:, :1], scores[:, 1:]
    return (others > positive).sum(1), (others == positive).sum(1)


def ranks(scores, ties: str = "pessimistic") -> torch.Tensor:
    """1-based rank of the positive (column 0) in each row; ties: ``pessimistic`` (below equal
    scores) or ``optimistic`` (above them)."""
    greater, equal = _greater_equal(scores)
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ranks() takes ties='pessimistic' or 'optimistic', got {ties!r}")
    return 1 + greater + (equal if ties == "pessimistic" else 0)


def _rank_range(scores, ties):
    """(best, worst) 1-based ranks the positive can take under ``ties``."""
    if ties not in TIES:
        raise ValueError(f"unknown ties {ties!r}; choose one of {TIES}")
    greater, equal = _greater_equal(scores)
    best, worst = 1 + greater, 1 + greater + equal
    if ties == "pessimistic":
        return worst, worst
    if ties == "optimistic":
        return best, best
    return best, worst


def hit_at_k(scores, k: int = 1, ties: str = "pessimistic") -> float:
    """Share of rows whose positive (column 0 of ``scores`` [n_queries, n_candidates]) ranks in the top k.

    ``ties="expected"``: the positive's rank is uniform over its tied block (random tie-breaking).
    """
    best, worst = _rank_range(scores, ties)
    hits = (k - best + 1).clamp(min=0).minimum(worst - best + 1).double() / (worst - best + 1)
    return float(hits.mean()) if hits.numel() else 0.0


def ndcg_at_k(scores, k: int = 5, ties: str = "pessimistic") -> float:
    """Mean NDCG@k with binary relevance and one positive (column 0): ``1/log2(rank + 1)`` if rank <= k."""
    best, worst = _rank_range(scores, ties)
    gain = torch.tensor([0.0] + [1 / math.log2(r + 1) for r in range(1, k + 1)] + [0.0], dtype=torch.float64)
    if ties != "expected":
        values = gain[worst.clamp(max=k + 1)]  # gain[k + 1] = 0: ranked below the cut-off
    else:  # mean gain over the tied ranks best..worst
        cumulative = gain[:k + 1].cumsum(0)
        values = (cumulative[worst.clamp(max=k)] - cumulative[(best - 1).clamp(max=k)]) / (worst - best + 1).double()
    return float(values.mean()) if values.numel() else 0.0


def pad_scores(rows: list[list[float]]) -> torch.Tensor:
    """Rows of different lengths as one [n, max_len] tensor padded with -inf (ranks below anything)."""
    width = max((len(r) for r in rows), default=1)
    out = torch.full((len(rows), width), float("-inf"), dtype=torch.float64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=torch.float64)
    return out


# ---------------------------------------------------------------------------------------- metrics: graded relevance

def ranking_metrics(scores, relevance: dict, ks=(1, 5, 10)) -> dict[str, float]:
    """Hit@k and NDCG@k (linear gain, ``rel / log2(rank + 1)``) of one query.

    ``scores``: ``{candidate key: score}``; ``relevance``: ``{relevant key: grade > 0}``. The ideal DCG
    comes from ``relevance`` (a relevant key missing from ``scores`` still counts there, as in VLM2Vec).
    Ties: a relevant candidate ranks below every candidate with an equal score; among equally scored
    relevant ones the lower grade goes first (pessimistic).
    """
    if not relevance:
        raise ValueError("a query needs at least one relevant candidate")
    keys = list(scores)
    return _ranked_metrics(np.array([float(scores[k]) for k in keys], dtype=np.float64),
                           np.array([relevance.get(k, 0) for k in keys], dtype=np.float64),
                           sorted(relevance.values(), reverse=True), ks)


def _ranked_metrics(scores: np.ndarray, gains: np.ndarray, ideal: list, ks) -> dict[str, float]:
    """:func:`ranking_metrics` on arrays: ``scores`` and ``gains`` (0: not relevant) per candidate,
    ``ideal`` the relevant grades, highest first."""
    top = gains[np.lexsort((gains, -scores))[:max(ks)]]  # by score, high first; ties: lower gain first
    discount = 1 / np.log2(np.arange(2, max(ks) + 2))
    ideal = np.asarray(ideal[:max(ks)], dtype=np.float64)
    out = {}
    for k in ks:
        out[f"hit@{k}"] = float((top[:k] > 0).any())
        out[f"ndcg_linear@{k}"] = float((top[:k] * discount[:len(top[:k])]).sum() /
                                        (ideal[:k] * discount[:len(ideal[:k])]).sum())
    return out


def mean_metrics(per_query: list[dict]) -> dict[str, float]:
    return {name: float(np.mean([m[name] for m in per_query])) for name in per_query[0]} if per_query else {}
