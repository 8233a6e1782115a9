"""Training batches: queries with think tokens + COT, and their targets, in one packed forward.

A :class:`TrainBatch` holds processed examples; :meth:`TrainBatch.pack` lays out any subset of them
(all of them for a plain step, a chunk for gradient-cache mode) as one :class:`~tte_flash.processing.TTEBatch`:
queries ``[query][think x K][emb][cot]`` first, then their targets (positive, then hard negatives)
``[target][emb]``, all in the same forward pass.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch

from .processing import QueryRecord, TTEBatch, collate


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

    def __len__(self) -> int:
        return len(self.queries)

    def pack(self, indices=None) -> tuple[TTEBatch, torch.Tensor, torch.Tensor, int]:
        """(batch, positive_index, target_keys, n_queries) for the examples at ``indices`` (default all).

        Embeddings come out queries first, then targets; ``positive_index[i]`` indexes the targets.
        """
        indices = range(len(self)) if indices is None else indices
        queries = [self.queries[i] for i in indices]
        targets, keys, positive = [], [], []
        for i in indices:
            positive.append(len(targets))
            targets += self.targets[i]
            keys += self.target_keys[i]
        batch = collate(queries + targets, self.think_ids, self.emb_id,
                        think_tokens=[self.think_tokens] * len(queries) + [0] * len(targets),
                        cot_ids=[self.cots[i] for i in indices] + [None] * len(targets),
                        packed=self.packed, pad_id=self.pad_id)
        return batch, torch.tensor(positive), torch.tensor(keys, dtype=torch.long), len(queries)


class TrainCollator:
    """Turns ``tte_flash.data.train_example`` dicts into a :class:`TrainBatch`.

    ``think_budgets``: the set K is drawn from, once per batch, so one checkpoint serves every K.
    ``use_cot``: tokenise traces (False, or rows without a trace: contrastive loss only).
    ``max_cot_tokens``: traces are truncated to this many tokens (EOS kept last).
    """

    def __init__(self, processor, think_budgets=(16,), use_cot=True, max_cot_tokens=256, hard_negatives=True,
                 packed=True, seed=0):
        max_k = len(processor.think_token_ids)
        bad = [k for k in think_budgets if not 0 <= k <= max_k]
        if bad or not think_budgets:
            raise ValueError(f"think budgets {list(think_budgets)} must be non-empty and within [0, {max_k}]")
        self.processor, self.think_budgets = processor, list(think_budgets)
        self.use_cot, self.max_cot_tokens = use_cot, max_cot_tokens
        self.hard_negatives, self.packed = hard_negatives, packed
        self.seed, self.rng = seed, random.Random(seed)

    def __call__(self, examples: list[dict]) -> dict:
        proc = self.processor
        queries, cots, targets, keys = [], [], [], []
        for example in examples:
            queries.append(proc(example["query"]))
            cots.append(self._cot(example.get("cot")))
            items = [example["positive"]] + (list(example.get("negatives") or []) if self.hard_negatives else [])
            targets.append([proc(item) for item in items])
            keys.append([content_key(item) for item in items])
        batch = TrainBatch(queries=queries, cots=cots, targets=targets, target_keys=keys,
                           think_tokens=self._budget(examples), think_ids=proc.think_token_ids,
                           emb_id=proc.emb_token_id, pad_id=proc.tokenizer.pad_token_id, packed=self.packed)
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
