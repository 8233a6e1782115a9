"""Training batches: queries with think tokens + COT, and their targets, in one packed forward.

A :class:`TrainBatch` holds processed examples; :meth:`TrainBatch.pack` lays out any subset of them
(all of them for a plain step, a chunk for gradient-cache mode) as one :class:`~tte_flash.processing.TTEBatch`:
queries ``[query][think x K][emb][cot]`` first, then their targets (positive, then hard negatives)
``[target][emb]``, all in the same forward pass.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field, replace

import torch

from .processing import QueryRecord, TTEBatch, collate


def with_trace(query: dict, trace: str | None) -> dict:
    """The query item with ``trace`` right after its text, as the explicit pipeline reads a generated trace."""
    return {**query, "text": (query.get("text") or "") + (trace or "")}


def trace_steps(trace: str) -> list[str]:
    """A trace split into its steps (sentences, each with its full stop and leading space), so that
    ``"".join(trace_steps(t)) == t``."""
    return [step for step in re.split(r"(?<=[.!?])(?=\s)", trace) if step]


def curriculum_stage(step: int, boundaries) -> int:
    """The explicit-to-latent stage at optimizer step ``step``: 0 before ``boundaries[0]``, i from
    ``boundaries[i-1]`` on, ``len(boundaries)`` (fully latent) from the last boundary on."""
    return sum(step >= b for b in boundaries)


def partial_trace(trace: str, stage: int, n_stages: int) -> str:
    """What is left of ``trace`` at ``stage`` of ``n_stages``: its first ``round(stage / n_stages * steps)``
    steps removed (stage 0: all of it; stage ``n_stages``: nothing), as in stepwise internalisation
    (arXiv 2405.14838) and Coconut's stages (arXiv 2412.06769)."""
    steps = trace_steps(trace)
    drop = round(stage / n_stages * len(steps)) if n_stages else len(steps)
    return "".join(steps[drop:]).lstrip()


def content_key(item: dict) -> int:
    """A stable 63-bit hash of a target's content (text, image/video path), for duplicate masking."""
    parts = [str(item.get(k)) for k in ("instruction", "text", "image", "video")]
    if not isinstance(item.get("image"), (str, type(None))):  # an in-memory image: hash its pixels
        parts[2] = hashlib.sha1(item["image"].tobytes()).hexdigest()
    return int.from_bytes(hashlib.sha1("\x1f".join(parts).encode()).digest()[:8], "little") >> 1


@dataclass
class TrainBatch:
    queries: list[QueryRecord]
    cots: list[list[int] | None]  # COT token ids per query (None: contrastive loss only)
    targets: list[list[QueryRecord]]  # per example: [positive, *hard negatives]
    target_keys: list[list[int]]
    think_tokens: int  # K for this batch (sampled from the budget set)
    think_ids: list[int]
    emb_id: int
    pad_id: int
    packed: bool
    # query + its full trace at K=0, the teacher of explicit-to-latent distillation (None: no teacher)
    teacher_queries: list[QueryRecord] | None = None
    # curriculum: stage_queries[s] are the queries with what stage s leaves of their traces (s < n stages)
    stage_queries: list[list[QueryRecord]] = field(default_factory=list)

    def at_stage(self, stage: int) -> "TrainBatch":
        """This batch at a curriculum stage: the queries carry what is left of their traces (the last
        stage, ``len(stage_queries)``, is the plain latent batch)."""
        if stage >= len(self.stage_queries):
            return self
        return replace(self, queries=self.stage_queries[stage])

    def __len__(self) -> int:
        return len(self.queries)

    def pack(self, indices=None) -> tuple[TTEBatch, torch.Tensor, torch.Tensor, int]:
        """(batch, positive_index, target_keys, n_queries) for the examples at ``indices`` (default all).

        Embeddings come out queries first, then (with ``teacher_queries``) one teacher per query, then
        targets; ``positive_index[i]`` indexes the targets.
        """
        indices = range(len(self)) if indices is None else indices
        queries = [self.queries[i] for i in indices]
        teachers = [self.teacher_queries[i] for i in indices] if self.teacher_queries is not None else []
        targets, keys, positive = [], [], []
        for i in indices:
            positive.append(len(targets))
            targets += self.targets[i]
            keys += self.target_keys[i]
        batch = collate(queries + teachers + targets, self.think_ids, self.emb_id,
                        think_tokens=[self.think_tokens] * len(queries) + [0] * (len(teachers) + len(targets)),
                        cot_ids=[self.cots[i] for i in indices] + [None] * (len(teachers) + len(targets)),
                        packed=self.packed, pad_id=self.pad_id, fill_rows=True)
        return batch, torch.tensor(positive), torch.tensor(keys, dtype=torch.long), len(queries)


class TrainCollator:
    """Turns ``tte_flash.data.train_example`` dicts into a :class:`TrainBatch`.

    ``think_budgets``: the set K is drawn from, once per batch, so one checkpoint serves every K.
    ``use_cot``: tokenise traces (False, or rows without a trace: contrastive loss only).
    ``max_cot_tokens``: traces are truncated to this many tokens (EOS kept last).
    ``teacher``: also process each query with its full trace (K=0), the distillation teacher.
    ``curriculum_stages``: also process each query with what each of this many stages leaves of its trace.
    Both need a trace in every row.
    """

    def __init__(self, processor, think_budgets=(16,), use_cot=True, max_cot_tokens=256, hard_negatives=True,
                 packed=True, seed=0, teacher=False, curriculum_stages=0):
        max_k = len(processor.think_token_ids)
        bad = [k for k in think_budgets if not 0 <= k <= max_k]
        if bad or not think_budgets:
            raise ValueError(f"think budgets {list(think_budgets)} must be non-empty and within [0, {max_k}]")
        self.processor, self.think_budgets = processor, list(think_budgets)
        self.use_cot, self.max_cot_tokens = use_cot, max_cot_tokens
        self.hard_negatives, self.packed = hard_negatives, packed
        self.seed, self.rng = seed, random.Random(seed)
        self.teacher, self.curriculum_stages = teacher, curriculum_stages

    def __call__(self, examples: list[dict]) -> dict:
        proc = self.processor
        queries, cots, targets, keys = [], [], [], []
        for example in examples:
            try:
                queries.append(proc(example["query"]))
                cots.append(self._cot(example.get("cot")))
                items = [example["positive"]] + (list(example.get("negatives") or []) if self.hard_negatives else [])
                targets.append([proc(item) for item in items])
            except (ValueError, OSError) as err:  # e.g. an image corrupt past its header: name the row
                where = example.get("where", f"row {example.get('index', '?')}")
                raise ValueError(f"training row {where}: {err}") from err
            keys.append([content_key(item) for item in items])
        teachers, stages = None, []
        if self.teacher or self.curriculum_stages:
            traces = [example.get("cot") for example in examples]
            missing = [e.get("index", i) for i, (e, t) in enumerate(zip(examples, traces)) if not t]
            if missing:
                raise ValueError(f"distillation and the explicit-to-latent curriculum need a qry_cot trace in every "
                                 f"row; row(s) {missing[:5]} have none")
            if self.teacher:
                teachers = [proc(with_trace(e["query"], t)) for e, t in zip(examples, traces)]
            for stage in range(self.curriculum_stages):
                if stage == 0 and teachers is not None:
                    stages.append(teachers)
                    continue
                stages.append([proc(with_trace(e["query"], partial_trace(t, stage, self.curriculum_stages)))
                               for e, t in zip(examples, traces)])
        batch = TrainBatch(queries=queries, cots=cots, targets=targets, target_keys=keys,
                           think_tokens=self._budget(examples), think_ids=proc.think_token_ids,
                           emb_id=proc.emb_token_id, pad_id=proc.tokenizer.pad_token_id, packed=self.packed,
                           teacher_queries=teachers, stage_queries=stages)
        return {"train_batch": batch}

    def _budget(self, examples) -> int:
        """K for this batch: drawn from the batch's row indices when examples carry them (the same K
        for the same batch after a resume), else from a seeded sequence."""
        indices = [e["index"] for e in examples if "index" in e]
        rng = random.Random(f"{self.seed}:{indices}") if len(indices) == len(examples) else self.rng
        return rng.choice(self.think_budgets)

    def _cot(self, text):
        if not self.use_cot or not text:
            return None
        ids = self.processor.tokenize_cot(text)
        return ids if len(ids) <= self.max_cot_tokens else ids[:self.max_cot_tokens - 1] + ids[-1:]
