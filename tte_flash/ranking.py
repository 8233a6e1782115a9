"""Ranking metrics of the evaluators: Hit@k / NDCG@k with the positive in column 0 and tie handling (the
MMEB-v1-style file evaluator, :mod:`tte_flash.evaluate`, and the shortcut baselines of :mod:`tte_flash.synthetic`),
and graded-relevance metrics over a candidate pool (MMEB-V2, :mod:`tte_flash.mmeb`).

**Non-finite values are errors, never ranks**: :func:`check_finite` is the one rule. Every metric here,
``similarity`` and the encode paths of the model, the file evaluator and the MMEB-V2 runner call it, and it
raises :class:`NonFiniteScoresError` naming the rows (queries / inputs) that hold NaN or inf. Without it a
NaN model would score a perfect Hit@1 (NaN compares false, so no candidate ranks above the positive).
The one allowed exception is padding: ``-inf`` after a row's last candidate (:func:`pad_scores`)."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

TIES = ("pessimistic", "optimistic", "expected")
SHOWN = 5  # rows listed by name in a NonFiniteScoresError

LIKELY_CAUSE = ("the model that produced them most likely has NaN/inf weights or activations: a diverged training "
                "run (too high a learning rate, a NaN loss) or a corrupted checkpoint; check it with "
                "`all(p.isfinite().all() for p in model.parameters())`")


# ---------------------------------------------------------------------------------------- non-finite values

class NonFiniteScoresError(ValueError):
    """Scores or embeddings hold NaN or inf: they cannot be ranked. ``rows``: the 0-based indices of the
    rows that do; ``names``: their names (query ids, input indices, evaluation rows) where the caller gave them."""

    def __init__(self, message: str, rows=(), names=()):
        super().__init__(message)
        self.rows, self.names = list(rows), list(names)


def check_finite(values, what: str = "scores", names=None, label: str = "row", padding: bool = False):
    """Raise :class:`NonFiniteScoresError` if ``values`` (scores or embeddings: a tensor, array or nested
    list, ``[n, ...]``; a 1-D one is one row) hold NaN or +/-inf; return ``values`` otherwise.

    The message says how many rows, names the first few (``names[i]`` for row i, else its index, each
    as ``f"{label} {name}"``) with what they hold, and the likely cause. ``padding=True`` (scores with the
    positive in column 0, padded by :func:`pad_scores`): a ``-inf`` after a row's last finite candidate
    is padding, not an error. Cost: one ``isfinite(...).all()`` when everything is finite.
    """
    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values, dtype=np.float64))
    if not t.is_floating_point():
        return values
    rows = t.detach().reshape(1, -1) if t.ndim < 2 else t.detach().reshape(t.shape[0], -1)
    bad = ~torch.isfinite(rows)
    if not bool(bad.any()):
        return values
    if padding:
        tail = torch.isneginf(rows).flip(1).int().cummin(1).values.flip(1).bool()  # -inf from here to the end
        tail[:, 0] = False  # the positive is never padding
        bad &= ~tail
        if not bool(bad.any()):
            return values
    bad_rows = bad.any(1).nonzero().flatten().tolist()
    names = list(range(len(rows))) if names is None else list(names)
    if len(names) != len(rows):
        names = list(range(len(rows)))

    def kinds(i):
        r = rows[i][bad[i]]
        found = [kind for kind, hit in (("NaN", torch.isnan(r).any()), ("+inf", torch.isposinf(r).any()),
                                        ("-inf", torch.isneginf(r).any())) if hit]
        return "/".join(found)
    try:  # listed by name (input indices come in batch order)
        listed = sorted(bad_rows, key=lambda i: names[i])
    except TypeError:
        listed = bad_rows
    shown = ", ".join(f"{label} {names[i]}: {kinds(i)}" for i in listed[:SHOWN])
    more = f", and {len(bad_rows) - SHOWN} more" if len(bad_rows) > SHOWN else ""
    note = (" (-inf is only padding: after a row's last candidate, never the positive in column 0)"
            if padding and bool(torch.isneginf(rows[bad]).any()) else "")
    raise NonFiniteScoresError(
        f"{what}: {len(bad_rows)} of {len(rows)} rows hold NaN or inf values ({shown}{more}){note} and cannot be "
        f"ranked; {LIKELY_CAUSE}",
        rows=bad_rows, names=[names[i] for i in bad_rows])


@contextlib.contextmanager
def nonfinite_context(where: str):
    """A :class:`NonFiniteScoresError` raised inside is raised again with ``where`` (what was being done) in front."""
    try:
        yield
    except NonFiniteScoresError as err:
        raise NonFiniteScoresError(f"{where}: {err}", rows=err.rows, names=err.names) from None


# ---------------------------------------------------------------------------------------- metrics: positive in column 0

def _greater_equal(scores) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: how many candidates score above the positive (column 0), and how many tie with it."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be [n_queries, n_candidates] with the positive in column 0, got "
                         f"shape {tuple(scores.shape)}")
    check_finite(scores, "scores", padding=True)
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
    check_finite(scores, "scores of one query")
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


# ---------------------------------------------------------------------------------------- metrics: VLM2Vec's procedure

SCORINGS = ("correct", "vlm2vec")  # MMEB-V2 scorings (docs/mmeb.md, "Scoring: correct vs vlm2vec")


def vlm2vec_order(scores) -> np.ndarray:
    """Candidate indices, best first, along the last axis of ``scores``, ranked as VLM2Vec's ``eval.py`` ranks a
    dense model's candidates: numpy's default ``argsort`` (not stable) of the negated float32 scores. Ties
    come out in whatever order that sort leaves them, which depends on the numpy version and the CPU (numpy 2
    on AVX2 / AVX-512 sorts with x86-simd-sort, even 5 elements out of index order); called as VLM2Vec calls
    it, it gives VLM2Vec's order for the same scores on the same machine. Rows of a 2-D array independently."""
    return np.argsort(-np.asarray(scores, dtype=np.float32), axis=-1)


def vlm2vec_grades(labels: list, grades: list | None = None) -> dict:
    """``{label: grade}`` as VLM2Vec's ``RankingMetrics.evaluate`` pairs them: it deduplicates the labels
    through a Python ``set`` (so they come back in set order: the hash order of the ids, which for strings
    changes with ``PYTHONHASHSEED``) and only then matches the i-th label of that order with the i-th
    grade of the original order. With more than one grade that can give a document another's grade.
    ``grades`` None (binary relevance): 1 for every label. ``labels`` must be hashable; they keep their
    types (an int id and its string hash differently)."""
    in_set_order = list(set(labels))
    if grades is None:
        return {label: 1 for label in in_set_order}
    grades = list(grades)
    if len(in_set_order) != len(grades):  # VLM2Vec raises here too (duplicate labels with grades)
        raise ValueError(f"{len(grades)} grades for {len(in_set_order)} distinct labels")
    paired = {}
    for position, label in enumerate(in_set_order):
        paired[label] = grades[position]
    return paired


def vlm2vec_metrics(ranked: list, graded: dict, ks=(1, 5, 10)) -> dict[str, float]:
    """Hit@k and NDCG@k (linear gain) of one query as VLM2Vec's ``RankingMetrics`` computes them: ``ranked``
    the candidate keys best first (at least the first ``max(ks)``), ``graded`` the ``{key: grade}`` of
    :func:`vlm2vec_grades`. Sums in the same order and types, so the values are VLM2Vec's to the bit."""
    ideal = sorted(graded.values(), reverse=True)
    out = {}
    for k in sorted(ks):
        top = list(ranked[:k])
        out[f"hit@{k}"] = 1.0 if any(key in graded for key in top) else 0.0
        dcg = sum(graded.get(key, 0) / np.log2(i + 2) for i, key in enumerate(top))
        best = ideal[:k]
        idcg = sum(g / np.log2(i + 2) for i, g in enumerate(best)) if best else 1
        out[f"ndcg_linear@{k}"] = float(dcg / idcg) if idcg > 0 else 0.0
    return out
