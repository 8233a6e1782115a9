"""The training objective on a :class:`~tte_flash.collator.TrainBatch`, plain or with a gradient cache.

``L = InfoNCE(query <emb>, target <emb>) + cot_weight * COT NLL`` (DESIGN.md §5), from one packed
forward over queries (and, with explicit-to-latent distillation, their teachers) and targets.
:func:`grad_cache_backward` computes the same gradients for a batch too large to hold activations for:
embed every chunk without graphs, take the gradient of the embeddings' loss (contrastive, the teacher's
contrastive, distillation) w.r.t. the query, teacher and target embeddings, then recompute each chunk
with graphs and backpropagate those cached gradients (plus the chunk's COT NLL), as in GradCache (Gao
et al., 2021). Each chunk's recomputation replays the random state of its first pass (CPU and CUDA
generators), so dropout (e.g. LoRA dropout) draws the same masks twice and the gradients are those of
the chunked forward.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .losses import all_reduce_sum, cot_nll, distillation_loss, info_nce


@dataclass
class RngState:
    """The CPU and (initialised) CUDA random states at one moment, to replay a forward's random draws."""
    cpu: torch.Tensor
    cuda: list | None

    @classmethod
    def capture(cls) -> "RngState":
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)

    @contextlib.contextmanager
    def replay(self):
        """Run the block from this state; the global random state is restored afterwards."""
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


@dataclass
class Objective:
    """``InfoNCE + cot_weight * COT NLL``, and with a teacher in the batch (``TrainBatch.teacher_queries``:
    each query with its explicit trace, K=0) ``+ teacher_weight * InfoNCE(teacher) + distill_weight *
    distillation(latent <emb>, teacher <emb> without gradient)``: explicit-to-latent self-distillation."""
    temperature: float = 0.02
    cot_weight: float = 1.0
    mask_duplicate_targets: bool = True
    distill_weight: float = 0.0
    distill_kind: str = "cosine"
    teacher_weight: float = 1.0

    def loss(self, model, train_batch) -> tuple[torch.Tensor, dict]:
        """Loss (scaled for DDP averaging) and logging stats of one plain step."""
        batch, positive, keys, n_queries = train_batch.pack()
        out = model(tte_batch=batch)
        with_teachers = train_batch.teacher_queries is not None
        queries, teachers, targets = split_embeddings(out.embeddings, n_queries, with_teachers)
        loss, stats = self.embedding_loss(queries, teachers, targets, positive, keys)
        if self.cot_weight <= 0:
            return loss, stats
        cot, cot_stats = self._cot(out, batch)
        return loss + self.cot_weight * cot, {**stats, **cot_stats}

    def embedding_loss(self, queries, teachers, targets, positive, keys) -> tuple[torch.Tensor, dict]:
        """The embeddings' part of the loss and its stats: ``InfoNCE(queries)``, and with ``teachers`` (n, d; None:
        no teacher) ``+ teacher_weight * InfoNCE(teachers) + distill_weight * distillation(queries, teachers)``.
        The plain step applies it to one forward's embeddings, the gradient cache to the cached ones."""
        keys = keys if self.mask_duplicate_targets else None
        loss, stats = info_nce(queries, targets, positive, keys, self.temperature)
        if teachers is None:
            return loss, stats
        if self.teacher_weight > 0:
            teacher_loss, teacher_stats = info_nce(teachers, targets, positive, keys, self.temperature)
            loss = loss + self.teacher_weight * teacher_loss
            stats["teacher_contrastive_loss"] = teacher_stats["contrastive_loss"]
            stats["teacher_contrastive_accuracy"] = teacher_stats["contrastive_accuracy"]
        if self.distill_weight > 0:  # the teacher is detached inside: its gradient comes from its InfoNCE alone
            distill, distill_stats = distillation_loss(queries, teachers, self.distill_kind, targets, self.temperature)
            loss, stats = loss + self.distill_weight * distill, {**stats, **distill_stats}
        return loss, stats

    def _cot(self, out, batch, n_global=None):
        if out.cot_nll_sum is None:  # no COT token in this batch (or chunk)
            zero = out.embeddings.sum() * 0.0
            return cot_nll(zero, zero, 0, n_global=n_global)
        return cot_nll(out.cot_nll_sum, out.cot_correct, batch.cot_targets.numel(), n_global=n_global)

    def grad_cache_backward(self, model, train_batch, chunk_size: int, backward=None, no_sync=None, scale=1.0):
        """Accumulate the gradients of :meth:`loss` into ``model`` chunk by chunk; return (loss, stats).

        ``backward(tensor)`` runs a backward pass (default ``tensor.backward()``; the Trainer passes
        ``accelerator.backward``); ``no_sync()`` is a context for all chunks but the last (DDP). Only that last
        backward synchronises, so a DDP model must be wrapped with ``find_unused_parameters=True`` (training does
        this): a parameter the last chunk does not use would otherwise never be averaged.
        ``scale`` multiplies what is backpropagated (gradient accumulation).
        """
        backward = backward or (lambda tensor: tensor.backward())
        with_teachers = train_batch.teacher_queries is not None
        chunks = [range(i, min(i + chunk_size, len(train_batch))) for i in range(0, len(train_batch), chunk_size)]
        packs = [train_batch.pack(c) for c in chunks]
        states, parts = [], []  # parts[i]: chunk i's (queries, teachers or None, targets) embeddings
        with torch.no_grad():
            for batch, _, _, n in packs:
                states.append(RngState.capture())
                parts.append(split_embeddings(model(tte_batch=batch).embeddings, n, with_teachers))
        # the whole batch's queries, teachers (or None) and targets, each a leaf that takes the loss's gradient
        leaves = [None if column[0] is None else torch.cat(column).detach().requires_grad_() for column in zip(*parts)]
        queries, teachers, targets = leaves
        target_offsets = [0]
        for _, _, chunk_targets in parts[:-1]:
            target_offsets.append(target_offsets[-1] + chunk_targets.shape[0])
        positive = torch.cat([p + o for (_, p, _, _), o in zip(packs, target_offsets)])
        keys = torch.cat([k for _, _, k, _ in packs])
        embedding_loss, stats = self.embedding_loss(queries, teachers, targets, positive, keys)
        embedding_loss.backward()  # d loss / d embeddings, cached
        # per chunk, the cached gradient of each part (None: the loss does not reach it, e.g. a teacher with
        # teacher_weight 0, whose distillation target is detached)
        chunk_grads = [[None] * len(parts) if leaf is None or leaf.grad is None
                       else leaf.grad.split([part[j].shape[0] for part in parts]) for j, leaf in enumerate(leaves)]
        device = queries.device
        cot_global = all_reduce_sum(torch.tensor(float(sum(b.cot_targets.numel() for b, *_ in packs)), device=device))
        cot_total = torch.zeros((), device=device)  # the COT loss, scaled as cot_nll scales it
        cot_sum, cot_correct, cot_local = torch.zeros((), device=device), torch.zeros((), device=device), 0
        for i, (batch, _, _, n) in enumerate(packs):
            last = i == len(packs) - 1
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                with states[i].replay():  # the same dropout masks as the first pass
                    out = model(tte_batch=batch)
                pieces = split_embeddings(out.embeddings, n, with_teachers)
                surrogate = sum((piece.float() * grads[i]).sum()
                                for piece, grads in zip(pieces, chunk_grads) if grads[i] is not None)
                if self.cot_weight > 0:
                    cot, _ = self._cot(out, batch, n_global=cot_global)
                    surrogate = surrogate + self.cot_weight * cot
                    cot_total = cot_total + cot.detach()
                    if out.cot_nll_sum is not None:
                        cot_sum = cot_sum + out.cot_nll_sum.detach()
                        cot_correct = cot_correct + out.cot_correct.detach()
                        cot_local += batch.cot_targets.numel()
                backward(surrogate * scale)
        if self.cot_weight > 0:  # cot_nll's stats of the whole local batch (none without COT tokens)
            stats.update(cot_nll(cot_sum, cot_correct, cot_local, n_global=cot_global)[1])
        return embedding_loss.detach() + self.cot_weight * cot_total, stats


def split_embeddings(embeddings: torch.Tensor, n_queries: int, with_teachers: bool):
    """(queries, teachers or None, targets) of one forward's embeddings in :meth:`TrainBatch.pack`'s layout:
    ``n_queries`` queries, then (``with_teachers``) one teacher per query, then the targets."""
    n_teachers = n_queries if with_teachers else 0
    teachers = embeddings[n_queries:n_queries + n_teachers] if with_teachers else None
    return embeddings[:n_queries], teachers, embeddings[n_queries + n_teachers:]
