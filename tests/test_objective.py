"""The training objective: InfoNCE and COT NLL by hand, gradient cache == plain step, DDP == one process."""
import contextlib
import copy
import os
import socket
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_image

from tte_flash.collator import TrainCollator, content_key
from tte_flash.losses import distillation_loss, info_nce
from tte_flash.objective import Objective


def test_info_nce_matches_hand_computation_with_duplicates_and_hard_negatives():
    gen = torch.Generator().manual_seed(0)
    q, t = torch.randn(3, 8, generator=gen), torch.randn(5, 8, generator=gen)
    positive = torch.tensor([0, 2, 3])
    keys = torch.tensor([7, 1, 7, 9, 4])  # target 2 duplicates target 0
    loss, stats = info_nce(q, t, positive, keys, temperature=0.1)
    qn, tn = F.normalize(q, dim=-1), F.normalize(t, dim=-1)
    logits = qn @ tn.T / 0.1
    expected = []
    for i, p in enumerate(positive.tolist()):
        allowed = [j for j in range(5) if j == p or keys[j] != keys[p]]
        expected.append(-(logits[i, p] - torch.logsumexp(logits[i, allowed], 0)))
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    torch.testing.assert_close(stats["contrastive_loss"], loss)


def examples(rng, n=6, with_images=True):
    out = []
    for i in range(n):
        query = {"text": f"question {i} " + "x" * int(rng.integers(1, 20))}
        if with_images and i % 2 == 0:
            query["image"] = random_image(rng, 56, 84)
        out.append({"query": query, "positive": {"text": f"answer {i % 4}"},
                    "negatives": [{"text": f"wrong {i}"}] if i % 3 == 0 else [],
                    "cot": f"step one for {i}; then step two" if i % 4 != 1 else None})
    return out


def collator_for(model, **kwargs):
    return TrainCollator(model.processor, think_budgets=(4,), **kwargs)


def test_content_key_is_stable_and_distinguishes_content(rng):
    image = random_image(rng)
    assert content_key({"text": "a"}) == content_key({"text": "a"})
    assert content_key({"text": "a"}) != content_key({"text": "b"})
    assert content_key({"image": image}) == content_key({"image": image.copy()})


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", [True, False])
def test_grad_cache_equals_plain_step(fresh_tiny, rng, packed):
    model = fresh_tiny().train()
    train_batch = collator_for(model, packed=packed)(examples(rng))["train_batch"]
    objective = Objective(temperature=0.05, cot_weight=0.7)
    loss, stats = objective.loss(model, train_batch)
    loss.backward()
    plain = grads(model)
    model.zero_grad()
    cached_loss, cached_stats = objective.grad_cache_backward(model, train_batch, chunk_size=4)
    cached = grads(model)
    torch.testing.assert_close(cached_loss, loss.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached_stats["cot_loss"], stats["cot_loss"], atol=1e-5, rtol=1e-5)
    assert plain.keys() == cached.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


def chunked_step(objective, model, train_batch, chunk_size):
    """Reference for the gradient cache with dropout: the chunks' forwards with graphs, in the cache's
    order (so the same random draws from the same seed), one loss over all of them, one backward."""
    from tte_flash.losses import cot_nll
    packs = [train_batch.pack(range(i, min(i + chunk_size, len(train_batch))))
             for i in range(0, len(train_batch), chunk_size)]
    outs = [model(tte_batch=batch) for batch, *_ in packs]
    queries = torch.cat([o.embeddings[:n] for o, (*_, n) in zip(outs, packs)])
    targets = torch.cat([o.embeddings[n:] for o, (*_, n) in zip(outs, packs)])
    counts = [o.embeddings.shape[0] - n for o, (*_, n) in zip(outs, packs)]
    positive = torch.cat([p + sum(counts[:i]) for i, (_, p, _, _) in enumerate(packs)])
    keys = torch.cat([k for _, _, k, _ in packs])
    loss, _ = info_nce(queries, targets, positive, keys, objective.temperature)
    n_cot = torch.tensor(float(sum(b.cot_targets.numel() for b, *_ in packs)))
    for out, (batch, *_) in zip(outs, packs):
        loss = loss + objective.cot_weight * cot_nll(out.cot_nll_sum, out.cot_correct, batch.cot_targets.numel(),
                                                     n_global=n_cot)[0]
    loss.backward()
    return loss.detach()


def test_grad_cache_replays_dropout(fresh_tiny, rng, monkeypatch):
    """With dropout on (LoRA dropout 0.5, as in the 2B recipe but larger), the cached re-run draws the
    same masks as its first pass: gradients equal the chunked forward's; without the replay they do not."""
    from tte_flash.objective import RngState
    from tte_flash.training import ModelArguments, apply_lora
    model = apply_lora(fresh_tiny(), ModelArguments(lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.5)).train()
    train_batch = collator_for(model.base_model.model)(examples(rng))["train_batch"]
    objective = Objective(temperature=0.05, cot_weight=0.7)
    torch.manual_seed(7)
    reference_loss = chunked_step(objective, model, train_batch, chunk_size=2)
    reference = grads(model)
    model.zero_grad()
    torch.manual_seed(7)
    cached_loss, _ = objective.grad_cache_backward(model, train_batch, chunk_size=2)
    cached = grads(model)
    torch.testing.assert_close(cached_loss, reference_loss, atol=1e-5, rtol=1e-5)
    assert cached.keys() == reference.keys() and any("lora" in name for name in cached)
    for name in reference:
        torch.testing.assert_close(cached[name], reference[name], atol=1e-5, rtol=1e-4, msg=name)
    # the control: the same step without the replay gives other gradients
    model.zero_grad()
    torch.manual_seed(7)
    monkeypatch.setattr(RngState, "replay", lambda self: contextlib.nullcontext())
    objective.grad_cache_backward(model, train_batch, chunk_size=2)
    unreplayed = grads(model)
    assert max((unreplayed[n] - reference[n]).abs().max() / reference[n].abs().max().clamp(min=1e-12)
               for n in reference if "lora" in n) > 0.05


def traced_examples(rng, n):
    """``examples`` with a trace in every row, as distillation's teacher (query + trace) needs."""
    return [{**e, "cot": e["cot"] or f"row {i} has its own trace. it ends here."}
            for i, e in enumerate(examples(rng, n))]


# every pair of settings (distillation kind, teacher weight, COT weight, a chunk size that leaves a remainder
# or divides the batch) in 8 cases rather than 16: the chunking is the parity of the other three
DISTILL_CASES = [(kind, teacher_weight, cot_weight, *((5, 2) if (kind == "kl") ^ (teacher_weight > 0) ^ (cot_weight > 0)
                                                      else (6, 3)))
                 for kind in ("cosine", "kl") for teacher_weight in (0.0, 1.0) for cot_weight in (0.0, 0.7)]


@pytest.mark.parametrize("kind, teacher_weight, cot_weight, rows, chunk_size", DISTILL_CASES)
def test_grad_cache_with_distillation_equals_plain_step(fresh_tiny, rng, kind, teacher_weight, cot_weight, rows,
                                                        chunk_size):
    """With teachers in the batch (explicit-to-latent distillation), the gradient cache gives the plain step's
    loss, stats and gradient of every parameter (float64), in chunks that divide the batch or leave a remainder."""
    model = fresh_tiny().double().train()
    train_batch = collator_for(model, teacher=True)(traced_examples(rng, rows))["train_batch"]
    objective = Objective(temperature=0.05, cot_weight=cot_weight, distill_weight=0.8, distill_kind=kind,
                          teacher_weight=teacher_weight)
    loss, stats = objective.loss(model, train_batch)
    loss.backward()
    plain = grads(model)
    model.zero_grad()
    cached_loss, cached_stats = objective.grad_cache_backward(model, train_batch, chunk_size=chunk_size)
    cached = grads(model)
    torch.testing.assert_close(cached_loss, loss.detach(), atol=1e-9, rtol=1e-6)
    assert "distill_loss" in stats and ("teacher_contrastive_loss" in stats) == (teacher_weight > 0)
    assert cached_stats.keys() == stats.keys()
    for key in stats:
        torch.testing.assert_close(cached_stats[key].double(), stats[key].double(), atol=1e-9, rtol=1e-6, msg=key)
    assert plain.keys() == cached.keys() and len(plain) > 10
    for name in plain:
        scale = plain[name].abs().max().item()
        torch.testing.assert_close(cached[name], plain[name], atol=1e-6 * scale, rtol=1e-6, msg=name)


def hand_distillation(student, teacher, targets, kind, temperature):
    """Distillation written out: the teacher (n, d) a constant; for "kl" the targets scored by the teacher
    are constants too, so the targets' gradient comes through the student's scores only."""
    s, t, g = F.normalize(student, dim=-1), F.normalize(teacher.detach(), dim=-1), F.normalize(targets, dim=-1)
    if kind == "cosine":
        return (1 - (s * t).sum(-1)).mean()
    log_p_teacher = (t @ g.detach().T / temperature).log_softmax(-1)
    log_p_student = (s @ g.T / temperature).log_softmax(-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean()


@pytest.mark.parametrize("kind", ["cosine", "kl"])
def test_grad_cache_distillation_gives_the_teacher_no_gradient(fresh_tiny, rng, kind):
    """Distillation alone (teacher_weight 0, no COT): the gradient-cache step's gradients are those of the
    latent batch (no teacher rows) pulled toward teacher embeddings from a frozen copy of the model: nothing
    flows back through the teacher's forward."""
    model = fresh_tiny().double().train()
    train_batch = collator_for(model, teacher=True)(traced_examples(rng, 5))["train_batch"]
    objective = Objective(temperature=0.05, cot_weight=0.0, distill_weight=1.0, distill_kind=kind, teacher_weight=0.0)
    objective.grad_cache_backward(model, train_batch, chunk_size=2)
    cached = grads(model)
    model.zero_grad()
    frozen = copy.deepcopy(model)
    with torch.no_grad():
        batch, _, _, n = train_batch.pack()
        teachers = frozen(tte_batch=batch).embeddings[n:2 * n]
    batch, positive, keys, n = replace(train_batch, teacher_queries=None).pack()
    embeddings = model(tte_batch=batch).embeddings
    queries, targets = embeddings[:n], embeddings[n:]
    contrastive, _ = info_nce(queries, targets, positive, keys, objective.temperature)
    (contrastive + hand_distillation(queries, teachers, targets, kind, objective.temperature)).backward()
    reference = grads(model)
    assert reference.keys() == cached.keys() and len(reference) > 10
    for name in reference:
        scale = reference[name].abs().max().item()
        torch.testing.assert_close(cached[name], reference[name], atol=1e-6 * scale, rtol=1e-6, msg=name)


def test_cot_loss_is_mean_nll_over_rows_with_a_trace(fresh_tiny, rng):
    model = fresh_tiny()
    train_batch = collator_for(model)(examples(rng))["train_batch"]
    _, stats = Objective(cot_weight=1.0).loss(model, train_batch)
    assert sum(c is None for c in train_batch.cots) == 2  # rows 1 and 5 have no trace: contrastive only
    batch, *_ = train_batch.pack()
    with torch.no_grad():
        expected = model.tte_forward(batch).cot_loss
    torch.testing.assert_close(stats["cot_loss"], expected)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_setup(mode):
    """(model, objective, examples, collator kwargs, chunk) of a DDP comparison. ``grad_cache_teacher``: every row with
    a trace, distillation on, chunks of 3 in each rank's 4 rows, so rank 0's last chunk is a text-only row and leaves
    the vision tower unused (DDP must look for unused parameters, as training sets it)."""
    from tte_flash import TTEFlashModel
    torch.manual_seed(1)
    model = TTEFlashModel.from_preset("tiny").train()
    data = examples(np.random.default_rng(0), n=8)
    if mode == "grad_cache_teacher":
        data = [{**d, "cot": d["cot"] or "one step only"} for d in data]
        return model, Objective(temperature=0.05, cot_weight=0.5, distill_weight=0.7), data, {"teacher": True}, 3
    return model, Objective(temperature=0.05, cot_weight=0.5), data, {}, 2


def _ddp_worker(rank, world_size, port, out_dir, mode):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model, objective, data, collate_kwargs, chunk = _ddp_setup(mode)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=mode != "plain")
    local = data[rank * 4:(rank + 1) * 4]
    train_batch = collator_for(model, **collate_kwargs)(local)["train_batch"]
    if mode != "plain":
        loss, _ = objective.grad_cache_backward(ddp, train_batch, chunk_size=chunk, no_sync=ddp.no_sync)
    else:
        loss, _ = objective.loss(ddp, train_batch)
        loss.backward()
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss / world_size, "grads": grads(model)}, os.path.join(out_dir, "ddp.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # Leave without running destructors: tearing down the DDP reducer's gloo process group joins a gloo
    # thread that may be waiting for the GIL the main thread holds (a teardown deadlock seen under CPU
    # contention). Everything this worker produces is already on disk.
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "grad_cache", "grad_cache_teacher"])
def test_two_process_ddp_equals_single_process(tmp_path, mode):
    """A real 2-process gloo DDP run: averaged loss and gradients equal one process on the global batch (with the
    gradient cache, and with distillation's teacher rows and a last chunk that leaves parameters unused)."""
    workers = torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), mode),
                                          nprocs=2, join=False)
    deadline = time.monotonic() + 600  # a hung collective must fail the test, not stall CI
    while not workers.join(timeout=5):
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the 2-process DDP workers did not finish within 600 s")
    ddp = torch.load(tmp_path / "ddp.pt")
    model, objective, data, collate_kwargs, _ = _ddp_setup(mode)
    train_batch = collator_for(model, **collate_kwargs)(data)["train_batch"]
    loss, _ = objective.loss(model, train_batch)
    loss.backward()
    single = grads(model)
    torch.testing.assert_close(ddp["loss"], loss.detach(), atol=1e-5, rtol=1e-5)
    assert ddp["grads"].keys() == single.keys()
    for name in single:
        torch.testing.assert_close(ddp["grads"][name], single[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("rows, chunk_rows", [(1, None), (7, 1), (13, 4), (13, 13), (0, None)])
def test_linear_cross_entropy_equals_the_plain_loss(rows, chunk_rows):
    """Chunked COT loss (no full logits) == cross_entropy(hidden @ W.T, sum): value, greedy hits, and the
    gradients of hidden and W, in float64 on fresh random inputs (odd sizes, one-row chunks, empty)."""
    from tte_flash.losses import linear_cross_entropy
    gen = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(101, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 101, (rows,), generator=gen)
    nll, correct = linear_cross_entropy(hidden, weight, targets, chunk_rows)
    logits = hidden @ weight.T
    expected = F.cross_entropy(logits, targets, reduction="sum")
    torch.testing.assert_close(nll, expected)
    assert int(correct) == int((logits.argmax(-1) == targets).sum())
    upstream = torch.tensor(0.37, dtype=torch.float64)
    got = torch.autograd.grad(nll * upstream, (hidden, weight))
    want = torch.autograd.grad(expected * upstream, (hidden, weight))
    for name, g, w in zip(("hidden", "weight"), got, want):
        torch.testing.assert_close(g, w, msg=name)


@pytest.mark.parametrize("head_trainable", [False, True])
def test_linear_cross_entropy_in_bfloat16_is_close_to_float64(head_trainable):
    """bf16 hidden and head (the 2B recipe; the head frozen under LoRA, or trainable): value and gradients
    within bf16 rounding of the float64 loss on the same (rounded) inputs; gradients in the inputs' dtypes."""
    from tte_flash.losses import linear_cross_entropy
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(37, 64, generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(1009, 64, generator=gen) / 8).bfloat16().requires_grad_(head_trainable)
    targets = torch.randint(0, 1009, (37,), generator=gen)
    nll, _ = linear_cross_entropy(hidden, weight, targets, chunk_rows=10)
    inputs = [hidden] + [weight] * head_trainable
    got = torch.autograd.grad(nll, inputs)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = F.cross_entropy(h64 @ w64.T, targets, reduction="sum")
    want = torch.autograd.grad(expected, [h64] + [w64] * head_trainable)
    torch.testing.assert_close(nll.double(), expected, rtol=1e-2, atol=0.5)
    for g, w, x in zip(got, want, inputs):
        assert g.dtype == x.dtype
        torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=2e-2)


def test_model_cot_loss_is_the_full_logits_loss(fresh_tiny, rng):
    """The model's COT loss (chunked) equals cross-entropy on the full logits it returns when asked."""
    model = fresh_tiny()
    train_batch = collator_for(model)(examples(rng))["train_batch"]
    batch = train_batch.pack()[0]
    out = model.tte_forward(batch, return_cot_logits=True)
    torch.testing.assert_close(out.cot_loss, F.cross_entropy(out.cot_logits, batch.cot_targets))
    torch.testing.assert_close(out.cot_accuracy, (out.cot_logits.argmax(-1) == batch.cot_targets).float().mean())


def test_linear_cross_entropy_backend_errors_are_clear():
    """An unknown backend, and Liger where it cannot run (a CPU tensor), fail with a message naming the fix."""
    from tte_flash.losses import linear_cross_entropy
    hidden, weight, targets = torch.randn(3, 8), torch.randn(11, 8), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="backend must be"):
        linear_cross_entropy(hidden, weight, targets, backend="fused")
    with pytest.raises(RuntimeError, match="liger-kernel"):
        linear_cross_entropy(hidden, weight, targets, backend="liger")
    auto, _ = linear_cross_entropy(hidden, weight, targets)  # auto on a CPU: the chunked path
    torch.testing.assert_close(auto, F.cross_entropy(hidden @ weight.T, targets, reduction="sum"))
