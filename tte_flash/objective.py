"""The training objective on a :class:`~tte_flash.collator.TrainBatch`, plain or with a gradient cache.

``L = InfoNCE(query <emb>, target <emb>) + cot_weight * COT NLL`` (DESIGN.md §5), from one packed
forward over queries and targets. :func:`grad_cache_backward` computes the same gradients for a
batch too large to hold activations for: embed every chunk without graphs, take the contrastive
gradient w.r.t. the embeddings, then recompute each chunk with graphs and backpropagate those
cached gradients (plus the chunk's COT NLL), as in GradCache (Gao et al., 2021). Each chunk's
recomputation replays the random state of its first pass (CPU and CUDA generators), so dropout
(e.g. LoRA dropout) draws the same masks twice and the gradients are those of the chunked forward.
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
        n_teachers = n_queries if train_batch.teacher_queries is not None else 0
        targets = out.embeddings[n_queries + n_teachers:]
        keys = keys if self.mask_duplicate_targets else None
        loss, stats = info_nce(out.embeddings[:n_queries], targets, positive, keys, self.temperature)
        if n_teachers:
            teacher = out.embeddings[n_queries:n_queries + n_teachers]
            if self.teacher_weight > 0:
                teacher_loss, teacher_stats = info_nce(teacher, targets, positive, keys, self.temperature)
                loss = loss + self.teacher_weight * teacher_loss
                stats["teacher_contrastive_loss"] = teacher_stats["contrastive_loss"]
                stats["teacher_contrastive_accuracy"] = teacher_stats["contrastive_accuracy"]
            if self.distill_weight > 0:
                distill, distill_stats = distillation_loss(out.embeddings[:n_queries], teacher, self.distill_kind,
                                                           targets, self.temperature)
                loss, stats = loss + self.distill_weight * distill, {**stats, **distill_stats}
        if self.cot_weight <= 0:
            return loss, stats
        cot, cot_stats = self._cot(out, batch)
        return loss + self.cot_weight * cot, {**stats, **cot_stats}

    def _cot(self, out, batch, n_global=None):
        if out.cot_nll_sum is None:  # no COT token in this batch (or chunk)
            zero = out.embeddings.sum() * 0.0
            return cot_nll(zero, zero, 0, n_global=n_global)
        return cot_nll(out.cot_nll_sum, out.cot_correct, batch.cot_targets.numel(), n_global=n_global)

    def grad_cache_backward(self, model, train_batch, chunk_size: int, backward=None, no_sync=None, scale=1.0):
        """Accumulate the gradients of :meth:`loss` into ``model`` chunk by chunk; return (loss, stats).

        ``backward(tensor)`` runs a backward pass (default ``tensor.backward()``; the Trainer passes
        ``accelerator.backward``); ``no_sync()`` is a context for all chunks but the last (DDP).
        ``scale`` multiplies what is backpropagated (gradient accumulation).
        """
        if train_batch.teacher_queries is not None:
            raise ValueError("explicit-to-latent distillation (--distill_weight) is not available with --grad_cache yet: "
                             "turn one of them off")
        backward = backward or (lambda tensor: tensor.backward())
        chunks = [range(i, min(i + chunk_size, len(train_batch))) for i in range(0, len(train_batch), chunk_size)]
        packs = [train_batch.pack(c) for c in chunks]
        states, reps = [], []
        with torch.no_grad():
            for batch, *_ in packs:
                states.append(RngState.capture())
                reps.append(model(tte_batch=batch).embeddings)
        queries = torch.cat([r[:n] for r, (*_, n) in zip(reps, packs)]).detach().requires_grad_()
        targets = torch.cat([r[n:] for r, (*_, n) in zip(reps, packs)]).detach().requires_grad_()
        target_counts = [r.shape[0] - n for r, (*_, n) in zip(reps, packs)]
        offsets = [sum(target_counts[:i]) for i in range(len(packs))]
        positive = torch.cat([p + o for (_, p, _, _), o in zip(packs, offsets)])
        keys = torch.cat([k for _, _, k, _ in packs])
        contrastive, stats = info_nce(queries, targets, positive, keys if self.mask_duplicate_targets else None,
                                      self.temperature)
        contrastive.backward()  # d loss / d embeddings, cached
        device = queries.device
        cot_global = all_reduce_sum(torch.tensor(float(sum(b.cot_targets.numel() for b, *_ in packs)), device=device))
        cot_total = torch.zeros((), device=device)
        q_at = t_at = 0
        for i, (batch, _, _, n) in enumerate(packs):
            last = i == len(packs) - 1
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                with states[i].replay():  # the same dropout masks as the first pass
                    out = model(tte_batch=batch)
                n_t = out.embeddings.shape[0] - n
                surrogate = (out.embeddings[:n].float() * queries.grad[q_at:q_at + n]).sum() \
                    + (out.embeddings[n:].float() * targets.grad[t_at:t_at + n_t]).sum()
                if self.cot_weight > 0:
                    cot, _ = self._cot(out, batch, n_global=cot_global)
                    surrogate = surrogate + self.cot_weight * cot
                    cot_total = cot_total + cot.detach()
                backward(surrogate * scale)
            q_at, t_at = q_at + n, t_at + n_t
        if self.cot_weight > 0 and float(cot_global) > 0:
            stats["cot_loss"] = cot_total
        return contrastive.detach() + self.cot_weight * cot_total, stats
