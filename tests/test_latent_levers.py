"""The levers that make <emb> use the reasoning (issue 15): explicit-to-latent self-distillation and the
explicit-to-latent curriculum, against independent float64 hand computations and end to end."""
import json
import math

import pytest
import torch

from tte_flash.collator import curriculum_stage, partial_trace, trace_steps, with_trace
from tte_flash.losses import distillation_loss
from tte_flash.training import main as train_main

from test_training import args, losses, make_data


def _hand_cosine(student, teacher):
    total = 0.0
    for s, t in zip(student.tolist(), teacher.tolist()):
        ns, nt = math.sqrt(sum(x * x for x in s)), math.sqrt(sum(x * x for x in t))
        total += 1.0 - sum(a * b for a, b in zip(s, t)) / (ns * nt)
    return total / len(student)


def _hand_kl(student, teacher, targets, temperature, teacher_targets=None):
    """KL(p_teacher || p_student); the teacher's distribution is a constant (scored against
    ``teacher_targets``, default ``targets``), so no gradient reaches the targets through it."""
    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    def softmax(scores):
        m = max(scores)
        e = [math.exp(x - m) for x in scores]
        return [x / sum(e) for x in e]
    tg = [unit(t) for t in targets.tolist()]
    tt = tg if teacher_targets is None else [unit(t) for t in teacher_targets.tolist()]
    total = 0.0
    for s, t in zip(student.tolist(), teacher.tolist()):
        ps = softmax([sum(a * b for a, b in zip(unit(s), g)) / temperature for g in tg])
        pt = softmax([sum(a * b for a, b in zip(unit(t), g)) / temperature for g in tt])
        total += sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps))
    return total / len(student)


@pytest.mark.parametrize("seed", [0, 1])
def test_cosine_distillation_value_and_gradient_teacher_without_gradient(seed):
    g = torch.Generator().manual_seed(seed)
    n, d = 5, 7
    student = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    loss, stats = distillation_loss(student, teacher, "cosine")
    assert loss.item() == pytest.approx(_hand_cosine(student, teacher), rel=1e-6)
    assert stats["distill_loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert teacher.grad is None  # the teacher is a target, not a learner
    eps = 1e-6  # the gradient by central differences of the hand computation
    for i, j in [(0, 0), (2, 3), (4, 6)]:
        plus, minus = student.detach().clone(), student.detach().clone()
        plus[i, j] += eps
        minus[i, j] -= eps
        numeric = (_hand_cosine(plus, teacher) - _hand_cosine(minus, teacher)) / (2 * eps)
        assert student.grad[i, j].item() == pytest.approx(numeric, rel=1e-4, abs=1e-8)


def test_kl_distillation_value_and_gradient():
    g = torch.Generator().manual_seed(3)
    n, m, d, temperature = 4, 6, 5, 0.3
    student = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True)
    loss, _ = distillation_loss(student, teacher, "kl", targets, temperature)
    assert loss.item() == pytest.approx(_hand_kl(student, teacher, targets, temperature), rel=1e-6)
    loss.backward()
    assert teacher.grad is None
    eps = 1e-6
    for tensor, (i, j) in [(student, (1, 2)), (targets, (5, 0))]:
        plus, minus = tensor.detach().clone(), tensor.detach().clone()
        plus[i, j] += eps
        minus[i, j] -= eps
        call = (lambda x: _hand_kl(x, teacher, targets, temperature)) if tensor is student else \
            (lambda x: _hand_kl(student, teacher, x, temperature, teacher_targets=targets))
        numeric = (call(plus) - call(minus)) / (2 * eps)
        assert tensor.grad[i, j].item() == pytest.approx(numeric, rel=1e-4, abs=1e-8)
    same, _ = distillation_loss(teacher, teacher, "kl", targets, temperature)
    assert same.item() == pytest.approx(0.0, abs=1e-12)


def test_distillation_bad_arguments():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="kind"):
        distillation_loss(x, x, "l2")
    with pytest.raises(ValueError, match="needs the targets"):
        distillation_loss(x, x, "kl")
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(x, x[:2])


def test_curriculum_stage_is_step_exact():
    boundaries = [3, 6, 10]
    assert [curriculum_stage(s, boundaries) for s in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert curriculum_stage(5, []) == 0


def test_partial_trace_drops_steps_in_order():
    trace = "the navy cell is at row 2 column 1. right of it is row 2 column 2. that cell is purple."
    assert "".join(trace_steps(trace)) == trace and len(trace_steps(trace)) == 3
    assert partial_trace(trace, 0, 3) == trace
    assert partial_trace(trace, 1, 3) == "right of it is row 2 column 2. that cell is purple."
    assert partial_trace(trace, 2, 3) == "that cell is purple."
    assert partial_trace(trace, 3, 3) == ""
    assert partial_trace(trace, 1, 2) == "that cell is purple."  # round(1/2 * 3) = 2 steps dropped
    assert with_trace({"text": "Q?", "image": "x.png"}, "the a.") == {"text": "Q?the a.", "image": "x.png"}


def _spy_batches(monkeypatch):
    from tte_flash.objective import Objective
    seen = []
    original = Objective.loss
    monkeypatch.setattr(Objective, "loss", lambda self, model, batch: seen.append(batch) or original(self, model, batch))
    return seen


def _decode(model, record):
    return model.processor.tokenizer.decode(record.input_ids[record.mm_types == 0])


def _traced_data(root, n=16):
    path = make_data(root, n)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["qry_cot"] = f"step one {i}. step two. it is {row['pos_text']}."
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_curriculum_queries_lose_their_trace_stage_by_stage(tmp_path, monkeypatch):
    seen = _spy_batches(monkeypatch)
    data = _traced_data(tmp_path / "data")
    trainer = train_main(args(data, tmp_path / "run", "--max_steps", "7", "--save_strategy", "no",
                              "--curriculum_steps", "2", "4", "6"))
    model = trainer.model
    texts = [_decode(model, b.queries[0]) for b in seen]
    kept = [t.count("step one") + t.count("step two") + t.count("it is") for t in texts]
    assert kept == [3, 3, 2, 2, 1, 1, 0]  # whole trace, two steps, one step, none
    assert all("fills the picture" in t for t in texts)


def test_curriculum_resumes_at_the_right_stage(tmp_path, monkeypatch):
    data = _traced_data(tmp_path / "data")
    extra = ["--max_steps", "6", "--save_steps", "3", "--curriculum_steps", "2", "4", "--logging_steps", "1"]
    full = train_main(args(data, tmp_path / "full", *extra))
    seen = _spy_batches(monkeypatch)
    resumed = train_main(args(data, tmp_path / "resumed", *extra, "--resume_from_checkpoint",
                              str(tmp_path / "full" / "checkpoint-3")))
    texts = [_decode(resumed.model, b.queries[0]) for b in seen]
    assert ["it is" in t for t in texts] == [True, False, False]  # steps 4, 5, 6: stages 1, 2, 2
    assert losses(resumed, "loss")[-3:] == pytest.approx(losses(full, "loss")[-3:], rel=1e-4)  # steps 4-6


def test_distillation_end_to_end_logs_and_uses_the_teacher(tmp_path, monkeypatch):
    seen = _spy_batches(monkeypatch)
    data = _traced_data(tmp_path / "data")
    trainer = train_main(args(data, tmp_path / "run", "--max_steps", "4", "--save_strategy", "no",
                              "--distill_weight", "2", "--distill_kind", "kl", "--logging_steps", "2"))
    assert len(losses(trainer, "distill_loss")) == 2 and len(losses(trainer, "teacher_contrastive_loss")) == 2
    batch = seen[0]
    assert len(batch.teacher_queries) == len(batch.queries)
    assert "step two" in _decode(trainer.model, batch.teacher_queries[0])
    assert "step two" not in _decode(trainer.model, batch.queries[0])
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["distill_weight"] == 2 and summary["distill_kind"] == "kl"


def test_objective_with_teacher_is_the_sum_of_its_parts(tiny_model):
    from tte_flash.collator import TrainCollator
    from tte_flash.losses import info_nce
    from tte_flash.objective import Objective
    proc = tiny_model.processor
    examples = [{"query": {"text": f"question {i}"}, "positive": {"text": f"answer {i}"},
                 "cot": f"first {i}. then {i}."} for i in range(4)]
    batch = TrainCollator(proc, think_budgets=[2], teacher=True, packed=False)(examples)["train_batch"]
    objective = Objective(temperature=0.1, cot_weight=0.5, distill_weight=0.7, distill_kind="cosine", teacher_weight=0.3)
    with torch.no_grad():
        loss, stats = objective.loss(tiny_model, batch)
        packed, positive, keys, n = batch.pack()
        out = tiny_model(tte_batch=packed)
        e = out.embeddings
        student, teacher, targets = e[:n], e[n:2 * n], e[2 * n:]
        expected = info_nce(student, targets, positive, keys, 0.1)[0] + 0.3 * info_nce(teacher, targets, positive, keys, 0.1)[0] \
            + 0.7 * distillation_loss(student, teacher)[0] + 0.5 * objective._cot(out, packed)[0]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert {"distill_loss", "teacher_contrastive_loss", "cot_loss"} <= set(stats)


@pytest.mark.parametrize("extra, message", [
    (["--curriculum_steps", "4", "2"], "strictly increasing"),
    (["--distill_weight", "nan"], "finite"),
    (["--distill_weight", "1", "--query_with_trace", "true"], "cannot be combined"),
])
def test_lever_arguments_are_checked(tmp_path, extra, message):
    data = _traced_data(tmp_path / "data", n=8)
    with pytest.raises(ValueError, match=message):
        train_main(args(data, tmp_path / "run", "--max_steps", "1", *extra))


def test_levers_need_traces(tmp_path):
    data = make_data(tmp_path / "data", n=8)  # row 0 has no trace
    with pytest.raises(ValueError, match="qry_cot"):
        train_main(args(data, tmp_path / "run", "--max_steps", "1", "--distill_weight", "1"))


def test_think_warmup_gate_counts_the_teachers_accuracy(tmp_path):
    """With distillation the latent queries cannot rank well at K=0 on a reasoning task; the teacher (the
    same embedder reading query + trace) shows that the embedder has left the collapsed start."""
    data = _traced_data(tmp_path / "data", n=8)
    trainer = train_main(args(data, tmp_path / "run", "--max_steps", "1", "--save_strategy", "no",
                              "--distill_weight", "1"))
    trainer.think_from_step, trainer.think_warmup_steps, trainer.think_warmup_accuracy = None, 0, 0.5
    trainer.log({"contrastive_accuracy": 0.1, "teacher_contrastive_accuracy": 0.4})
    assert trainer.think_from_step is None
    trainer.log({"contrastive_accuracy": 0.1, "teacher_contrastive_accuracy": 0.9})
    assert trainer.think_from_step == trainer.state.global_step
    assert trainer.state.log_history[-1]["think_tokens_from_step"] == trainer.state.global_step
