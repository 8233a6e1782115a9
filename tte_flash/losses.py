"""Training losses (DESIGN.md §5): InfoNCE over ranks, the COT token NLL and explicit-to-latent distillation.

``L = L_contrastive + cot_weight * L_cot``. Both are written so that a data-parallel run on W ranks,
with gradients averaged by DDP, gives the loss and gradients of one process on the global batch:

* InfoNCE: targets (and their duplicate keys) are all-gathered *with gradients* (the all-gather's
  backward returns each rank its targets' gradient); each rank scores its own queries against every
  target and the loss is the mean over all global queries, scaled so that DDP's average is that mean.
* COT: summed NLL over local COT tokens divided by the global token count, times W for the same reason;
  the NLL comes from :func:`linear_cross_entropy`, which never holds the full (tokens, vocabulary) logits.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """Concatenate ``local`` (n_r, ...) from every rank in rank order; gradients flow back to owners.

    Ranks may hold different n_r. Outside torch.distributed it returns ``local``.
    """
    rank, size = world()
    if size == 1:
        return local
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(size)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device))
    sizes = [int(s) for s in sizes]
    padded = torch.zeros(max(sizes), *local.shape[1:], dtype=local.dtype, device=local.device)
    padded = torch.cat([local, padded[local.shape[0]:]]) if local.shape[0] < max(sizes) else local
    gathered = torch.distributed.nn.functional.all_gather(padded)
    parts = [g[:n] for g, n in zip(gathered, sizes)]
    parts[rank] = local  # the local slice keeps its own autograd path
    return torch.cat(parts)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a (non-differentiable) tensor over ranks."""
    if world()[1] > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def info_nce(queries: torch.Tensor, targets: torch.Tensor, positive_index: torch.Tensor,
             target_keys: torch.Tensor | None, temperature: float) -> tuple[torch.Tensor, dict]:
    """InfoNCE of local ``queries`` (n, d) against ``targets`` (m, d) gathered over all ranks.

    ``positive_index[i]`` is query i's positive among the *local* targets; ``target_keys`` (m,) are
    content hashes: a target equal to query i's positive is not counted as its negative (false
    negatives from duplicates). Hard negatives are simply extra targets. Returns the loss, scaled
    for DDP's gradient averaging, and logging stats (unscaled mean loss, in-batch accuracy).
    """
    rank, size = world()
    q = F.normalize(queries.float(), dim=-1)
    t = F.normalize(targets.float(), dim=-1)
    offsets = gather_with_grad(torch.tensor([t.shape[0]], device=t.device))
    all_t = gather_with_grad(t)  # (M, d)
    start = int(offsets[:rank].sum())
    labels = positive_index.to(q.device) + start
    logits = q @ all_t.T / temperature  # (n, M)
    if target_keys is not None:
        all_keys = gather_with_grad(target_keys.to(q.device))
        duplicate = all_keys[None, :] == all_keys[labels][:, None]
        duplicate[torch.arange(len(labels), device=q.device), labels] = False
        logits = logits.masked_fill(duplicate, float("-inf"))
    n_global = all_reduce_sum(torch.tensor(float(q.shape[0]), device=q.device))
    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
    accuracy = (logits.argmax(-1) == labels).float().mean().detach()
    # the loss of uniform scores, ln(targets each query is ranked against): a collapsed embedder sits here
    uniform = torch.isfinite(logits).sum(-1).float().log().mean().detach()
    return loss_sum * size / n_global, {"contrastive_loss": (loss_sum / q.shape[0]).detach(),
                                        "contrastive_accuracy": accuracy, "uniform_loss": uniform}


DISTILL_KINDS = ("cosine", "kl")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine",
                      targets: torch.Tensor | None = None, temperature: float = 0.02) -> tuple[torch.Tensor, dict]:
    """Pull the latent embeddings ``student`` (n, d) toward ``teacher`` (n, d), the same model's embeddings
    of query + explicit trace (explicit-to-latent self-distillation, as CODI, arXiv 2502.21074, does
    for a language model's hidden state). The teacher gets no gradient (it is detached here).

    ``kind="cosine"``: mean over queries of ``1 - cos(student_i, teacher_i)``.
    ``kind="kl"``: mean over queries of ``KL(p_teacher || p_student)``, where ``p`` is the softmax of the
    normalised query's scores against ``targets`` (m, d; gathered over ranks) at ``temperature``: the student
    learns the teacher's in-batch ranking rather than its vector. Scaled for DDP averaging like
    :func:`info_nce`; the stats hold the unscaled mean.
    """
    if kind not in DISTILL_KINDS:
        raise ValueError(f"distillation kind must be one of {DISTILL_KINDS}, got {kind!r}")
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} embeddings differ in shape")
    size = world()[1]
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.detach().float(), dim=-1)
    if kind == "cosine":
        per_query = 1.0 - (s * t).sum(-1)
    else:
        if targets is None:
            raise ValueError("distillation kind 'kl' needs the targets the queries are ranked against")
        all_t = gather_with_grad(F.normalize(targets.float(), dim=-1))
        log_p_student = F.log_softmax(s @ all_t.T / temperature, dim=-1)
        log_p_teacher = F.log_softmax(t @ all_t.detach().T / temperature, dim=-1)
        per_query = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    n_global = all_reduce_sum(torch.tensor(float(s.shape[0]), device=s.device))
    total = per_query.sum()
    return total * size / n_global.clamp(min=1), {"distill_loss": (total / max(s.shape[0], 1)).detach()}


def cot_nll(nll_sum: torch.Tensor, correct: torch.Tensor, n_local: int, n_global: torch.Tensor | None = None):
    """Mean token NLL over the global batch's COT tokens from a local NLL sum (``linear_cross_entropy``),
    scaled for DDP's gradient averaging; ``correct``: greedy hits among the ``n_local`` local tokens.

    ``n_global``: the global COT token count when this covers only part of the batch (a chunk).
    """
    size = world()[1]
    if n_global is None:
        n_global = all_reduce_sum(torch.tensor(float(n_local), device=nll_sum.device))
    if n_local == 0:
        return nll_sum * 0.0, {}
    return nll_sum * size / n_global.clamp(min=1), {"cot_loss": (nll_sum / n_local).detach(),
                                                    "cot_accuracy": (correct.float() / n_local).detach()}


def _chunk_rows(vocab: int) -> int:
    return max(1, 2**25 // max(vocab, 1))  # a float32 logits chunk of at most 128 MiB


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` without the (M, V) logits: rows in chunks, the
    chunk's logits recomputed in backward (the idea of Liger-Kernel's fused linear cross-entropy)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        compute = torch.promote_types(hidden.dtype, torch.float32)
        nll = torch.zeros((), dtype=compute, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            logits = (hidden[start:start + chunk_rows] @ weight.T).to(compute)
            target = targets[start:start + chunk_rows]
            correct += (logits.argmax(-1) == target).sum()
            picked = logits.gather(1, target[:, None]).squeeze(1)
            nll += (_logsumexp_(logits) - picked).sum()  # overwrites the chunk's logits
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_rows, ctx.compute = chunk_rows, compute
        ctx.mark_non_differentiable(correct)
        return nll, correct

    @staticmethod
    def backward(ctx, grad_nll, _grad_correct):
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # a trainable head (full fine-tuning) accumulates its gradient over chunks in its own dtype (as
        # Liger-Kernel does): the one (V, H) allocation here; under LoRA the head is frozen and it is skipped
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = hidden[start:start + ctx.chunk_rows]
            grad = (rows @ weight.T).to(ctx.compute).softmax(-1)  # d nll / d logits = softmax - onehot
            grad[torch.arange(grad.shape[0], device=grad.device), targets[start:start + ctx.chunk_rows]] -= 1
            grad.mul_(grad_nll)
            # matmuls in the weight's dtype (fp32 accumulation inside, as on GPU): casting the (V, H) weight
            # up to fp32 instead would allocate a copy of it per chunk
            grad = grad.to(weight.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad.T, rows.to(weight.dtype))
            if grad_hidden is not None:
                grad_hidden[start:start + ctx.chunk_rows] = (grad @ weight).to(hidden.dtype)
        return grad_hidden, grad_weight, None, None


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise logsumexp that reuses ``logits``' storage for the exponentials (no second chunk-sized buffer)."""
    peak = logits.amax(-1, keepdim=True)
    return logits.sub_(peak).exp_().sum(-1).log_().add_(peak.squeeze(-1))


@functools.cache  # looked up once: it is consulted on every COT loss
def _liger_linear_cross_entropy():
    """Liger-Kernel's fused linear cross-entropy, when installed in a version that also returns the token
    accuracy (the COT accuracy is logged); else None."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    if "return_token_accuracy" not in inspect.signature(liger_fused_linear_cross_entropy).parameters:
        return None
    return liger_fused_linear_cross_entropy


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, number of greedy hits) of the LM head ``weight`` (V, H) applied to ``hidden`` (M, H)
    against ``targets`` (M,), never holding more than one chunk of logits: the COT loss at a 151,936-token
    vocabulary without materialising (M, V) fp32 logits. Gradients equal the plain loss's (tested).

    ``backend``: ``"chunked"`` (PyTorch, any device), ``"liger"`` (Liger-Kernel's fused Triton kernel; CUDA,
    ``pip install liger-kernel``), or ``"auto"``: Liger on CUDA when a recent enough version is installed, else
    chunked. ``benchmarks/gpu_suite.py`` checks the two agree on a GPU.
    """
    if backend not in ("auto", "chunked", "liger"):
        raise ValueError(f"backend must be 'auto', 'chunked' or 'liger', got {backend!r}")
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum()) * 0.0, torch.zeros((), dtype=torch.long, device=hidden.device)
    liger = _liger_linear_cross_entropy() if backend != "chunked" and hidden.is_cuda else None
    if backend == "liger" and liger is None:
        raise RuntimeError("backend='liger' needs a CUDA tensor and liger-kernel with return_token_accuracy "
                           "(pip install -U liger-kernel); backend='chunked' runs anywhere")
    if liger is not None:
        out = liger(hidden, weight, targets, reduction="sum", return_token_accuracy=True)
        correct = (out.token_accuracy.detach().float() * targets.numel()).round().long()
        return out.loss, correct
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows or _chunk_rows(weight.shape[0]))
