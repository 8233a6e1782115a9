"""The training entry point end to end on a small generated data set (CPU)."""
import json
from pathlib import Path

import pytest
from PIL import Image

from tte_flash import TTEFlashModel
from tte_flash.training import main as train_main
from conftest import load_script

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def make_data(root, n=48):
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    names = list(COLORS)
    for i in range(n):
        color = names[i % len(names)]
        Image.new("RGB", (56, 56), COLORS[color]).save(root / "images" / f"{i}.png")
        rows.append({"qry": "<|image_1|> What colour fills the picture?", "qry_image_path": f"images/{i}.png",
                     "pos_text": color, "pos_image_path": "", "neg_text": names[(i + 1) % 4],
                     "neg_image_path": "", "qry_cot": f"The picture is one flat colour. It is {color}." if i % 3
                     else ""})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def args(data, out, *extra):
    return ["--model", "tiny", "--train_data", str(data), "--image_root", str(data.parent), "--output-dir", str(out),
            "--think_tokens", "0", "4", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
            "--logging_steps", "5", "--use_cpu", "--seed", "0", "--temperature", "0.1", *extra]


def losses(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_train_end_to_end_loss_falls_and_both_losses_logged(tmp_path):
    data = make_data(tmp_path / "data")
    trainer = train_main(args(data, tmp_path / "run", "--max_steps", "30", "--save_steps", "1000"))
    total, contrastive, cot = losses(trainer, "loss"), losses(trainer, "contrastive_loss"), losses(trainer, "cot_loss")
    assert len(total) >= 5 and len(contrastive) == len(total) and len(cot) == len(total)
    assert all(x == x and abs(x) < 1e4 for x in total)  # finite
    assert total[-1] < total[0] and cot[-1] < cot[0] and contrastive[-1] < contrastive[0]
    model = TTEFlashModel.from_pretrained(tmp_path / "run")  # the final model is a loadable checkpoint
    assert model.encode_query("q", think_tokens=4).shape == (64,)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["think_budgets"] == [0, 4] and summary["train_rows"] == 48


def test_resume_from_checkpoint_continues_the_same_run(tmp_path):
    data = make_data(tmp_path / "data")
    full = train_main(args(data, tmp_path / "full", "--max_steps", "10", "--save_steps", "5"))
    assert (tmp_path / "full" / "checkpoint-5").is_dir()
    resumed = train_main(args(data, tmp_path / "resumed", "--max_steps", "10", "--save_steps", "5",
                              "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-5")))
    assert resumed.state.global_step == 10
    assert losses(resumed, "loss")[-1] == pytest.approx(losses(full, "loss")[-1], rel=1e-4)


def test_yaml_recipe_with_overrides(tmp_path):
    data = make_data(tmp_path / "data", n=16)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: tiny\ntrain_data: [{data}]\nimage_root: {data.parent}\nthink_tokens: [2]\n"
                      "per_device_train_batch_size: 8\nmax_steps: 100\nuse_cpu: true\ncot_weight: 0.5\n")
    trainer = train_main([str(recipe), "--max_steps", "2", "--output_dir", str(tmp_path / "run"), "--grad_cache",
                          "--grad_cache_chunk_size", "3", "--lora"])
    assert trainer.state.global_step == 2 and losses(trainer, "cot_loss")
    assert (tmp_path / "run" / "model.safetensors").is_file()  # LoRA merged into a full checkpoint


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "training/configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_parse(recipe):
    """Every recipe in training/configs parses into the training arguments (no unknown key, valid values); the
    2B recipe keeps its gradient cache and the distillation lever together."""
    from tte_flash.training import parse_args
    gpu_only = ["--bf16", "false"] if "bf16: true" in recipe.read_text() else []  # transformers refuses bf16 on a CPU
    model_args, data_args, training_args = parse_args([str(recipe), "--output_dir", "unused", *gpu_only])
    assert training_args.max_steps > 0 and data_args.think_tokens
    if recipe.name == "qwen2-vl-2b.yaml":
        assert data_args.grad_cache and data_args.distill_weight > 0 and model_args.lora


def test_grad_cache_with_distillation_end_to_end(tmp_path, monkeypatch):
    """--distill_weight with --grad_cache (chunks of 3 in batches of 8): the teacher rows reach the gradient
    cache, the distillation and teacher stats are logged, and the losses of the first steps are the plain run's."""
    from tte_flash.objective import Objective
    data = make_data(tmp_path / "data", n=16)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "qry_cot": f"One colour. It is {r['pos_text']}."}) + "\n" for r in rows))
    cached_batches = []
    original = Objective.grad_cache_backward
    monkeypatch.setattr(Objective, "grad_cache_backward", lambda self, model, batch, *rest, **kwargs:
                        cached_batches.append(batch) or original(self, model, batch, *rest, **kwargs))
    run = ["--max_steps", "2", "--save_strategy", "no", "--logging_steps", "1", "--distill_weight", "1"]
    plain = train_main(args(data, tmp_path / "plain", *run))
    cached = train_main(args(data, tmp_path / "cached", *run, "--grad_cache", "--grad_cache_chunk_size", "3"))
    assert len(cached_batches) == 2 and all(b.teacher_queries is not None for b in cached_batches)
    for key in ("loss", "distill_loss", "teacher_contrastive_loss"):
        assert len(losses(cached, key)) == 2
        assert losses(cached, key) == pytest.approx(losses(plain, key), rel=1e-4), key


@pytest.mark.parametrize("grad_cache", [False, True])
def test_think_warmup_trains_the_first_steps_at_k0(tmp_path, monkeypatch, grad_cache):
    """--think_warmup_steps N: steps 1..N see K=0 whatever the budgets, later steps the budgets."""
    from tte_flash.objective import Objective
    seen = []
    for name in ("loss", "grad_cache_backward"):
        original = getattr(Objective, name)

        def spy(self, model, train_batch, *rest, _original=original, **kwargs):
            seen.append(train_batch.think_tokens)
            return _original(self, model, train_batch, *rest, **kwargs)
        monkeypatch.setattr(Objective, name, spy)
    data = make_data(tmp_path / "data", n=16)
    extra = ["--grad_cache", "--grad_cache_chunk_size", "3"] if grad_cache else []
    run = args(data, tmp_path / "run", "--max_steps", "6", "--save_strategy", "no", "--think_warmup_steps", "4", *extra)
    run[run.index("--think_tokens") + 1:run.index("--think_tokens") + 3] = ["4"]  # one budget: K=4
    train_main(run)
    assert seen == [0, 0, 0, 0, 4, 4]


@pytest.mark.parametrize("threshold", [0.05, 0.99])
def test_think_warmup_until_accuracy(tmp_path, monkeypatch, threshold):
    """--think_warmup_accuracy A: after the warm-up steps, K stays 0 until a logged in-batch contrastive
    accuracy reaches A; the step is logged as think_tokens_from_step and the budgets apply from there."""
    from tte_flash.objective import Objective
    seen = []
    original = Objective.loss
    monkeypatch.setattr(Objective, "loss", lambda self, model, batch: seen.append(batch.think_tokens)
                        or original(self, model, batch))
    data = make_data(tmp_path / "data", n=16)
    run = args(data, tmp_path / "run", "--max_steps", "12", "--save_strategy", "no", "--logging_steps", "2",
               "--think_warmup_steps", "3", "--think_warmup_accuracy", str(threshold))
    if threshold == 0.99:  # equal scores (the collapse test's trick): the accuracy cannot get there
        run[run.index("--temperature") + 1] = "1e4"
    run[run.index("--think_tokens") + 1:run.index("--think_tokens") + 3] = ["4"]
    trainer = train_main(run)
    switched = [e["think_tokens_from_step"] for e in trainer.state.log_history if "think_tokens_from_step" in e]
    if threshold == 0.99:
        assert switched == [] and seen == [0] * 12
    else:
        accuracy = {e["step"]: e["contrastive_accuracy"] for e in trainer.state.log_history if "contrastive_accuracy" in e}
        step = int(switched[0])
        assert step >= 3 and step % 2 == 0 and accuracy[step] >= threshold
        assert all(accuracy[s] < threshold for s in accuracy if 3 <= s < step)
        assert seen == [0] * step + [4] * (12 - step)


def test_think_warmup_must_not_be_negative(tmp_path):
    data = make_data(tmp_path / "data", n=8)
    with pytest.raises(ValueError, match="think_warmup_steps must be >= 0"):
        train_main(args(data, tmp_path / "run", "--max_steps", "1", "--think_warmup_steps", "-1"))


@pytest.mark.parametrize("breakage, message", [
    ("missing_column", "required column 'pos_text'"), ("missing_image", "images/0.png"), ("empty", "no rows")])
def test_clear_errors_for_bad_data(tmp_path, breakage, message):
    data = make_data(tmp_path / "data", n=4)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    if breakage == "missing_column":
        del rows[2]["pos_text"]
    elif breakage == "missing_image":
        (tmp_path / "data" / "images" / "0.png").unlink()
    else:
        rows = []
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train_main(args(data, tmp_path / "run", "--max_steps", "1"))


def test_cot_probe_scores_hand_made_traces():
    probe = load_script("training/cot_probe.py", "cot_probe")
    rows = [{"qry_cot": "the red cell is at row 1 column 2. left of it is row 1 column 1. that cell is blue.",
             "tgt_text": ["blue", "red"]},
            {"qry_cot": "Bob's pen is black.", "tgt_text": ["black", "white"]},
            {"qry_cot": "the pink cell is at row 3 column 3. up of it is row 2 column 3. that cell is green.",
             "tgt_text": "green"}]
    traces = ["the red cell is at row 1 column 2. left of it is row 1 column 1. that cell is blue.",  # all right
              "Bob's pen is white.",                                        # wrong first fact, wrong answer
              "the pink cell is at row 1 column 3. that cell is green."]   # wrong anchor, right answer
    assert probe.score(traces, rows) == {"n": 3, "answer": 2 / 3, "first_fact": 1 / 3, "exact": 1 / 3}


def test_ablation_summary_and_report_on_hand_made_results(tmp_path):
    """tiny_ablation's summary (mean, min, max over seeds) and its markdown table, on known numbers."""
    ablation = load_script("training/tiny_ablation.py", "tiny_ablation")
    shortcut = {"shortcut_best": {"hit@1": 0.15, "ndcg@5": 0.4}, "shortcut_best_name": {"hit@1": "best_fixed_cell"}}

    def result(setting, seed, hits, traces=None, start=None):
        return {"setting": setting, "seed": seed, "steps": 300, "think_token_traces": traces, **shortcut,
                "think_tokens_from_step": start,
                "runs": [{"mode": "latent", "think_tokens": k, "hit@1": h, "ndcg@5": h, "seconds_per_query": 0.002}
                         for k, h in hits.items()]}
    results = [result("k0", 0, {0: 0.5}), result("k0", 1, {0: 0.7}),
               result("k16_cot", 0, {0: 0.2, 16: 0.9}, {"answer": 0.8}, start=60),
               result("k16_cot", 1, {0: 0.4, 16: 1.0}, {"answer": 1.0})]
    rows = {(r["setting"], r["think_tokens"]): r for r in ablation.summarise(results)}
    assert rows[("k0", 0)]["hit@1_mean"] == pytest.approx(0.6) and rows[("k0", 0)]["seeds"] == 2
    assert (rows[("k16_cot", 16)]["hit@1_min"], rows[("k16_cot", 16)]["hit@1_max"]) == (0.9, 1.0)
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"meta": {"dataset": "synthetic-grid-1hop"}, "results": results}))
    table = ablation.markdown(path)
    assert "best_fixed_cell: Hit@1 0.150" in table
    assert "| k16_cot | K=16 | 2 | 0.950 (0.900-1.000) | 0.950 | 2.00 | 0.90 | 60 / never |" in table
    assert "| k16_cot | K=0 | 2 | 0.300 (0.200-0.400) | 0.300 | 2.00 | - | - |" in table


def test_liger_kernels_flag_errors_name_the_problem(monkeypatch):
    """--liger_kernels off CUDA, or without liger-kernel installed, fails before training with what to do."""
    import sys
    from tte_flash.training import apply_liger_kernels
    with pytest.raises(ValueError, match="CUDA"):
        apply_liger_kernels(object(), "cpu")
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install liger-kernel"):
        apply_liger_kernels(object(), "cuda")


def test_grad_cache_refuses_ddp_without_unused_parameter_search(tmp_path):
    """Only the gradient cache's last chunk synchronises under DDP: training turns on DDP's search for unused
    parameters with --grad_cache, and refuses to run with it switched off rather than leave gradients unaveraged."""
    data = make_data(tmp_path / "data", n=16)
    with pytest.raises(ValueError, match="ddp_find_unused_parameters"):
        train_main(args(data, tmp_path / "run", "--max_steps", "1", "--grad_cache", "--ddp_find_unused_parameters",
                        "false"))
    assert not (tmp_path / "run" / "model.safetensors").exists()
