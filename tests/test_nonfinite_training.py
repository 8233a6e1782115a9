"""A diverged run never saves silently (issue 18, item 2): a NaN/inf loss or gradient stops training with
a clear error before anything more is saved (or, with --on_nonfinite skip, that step makes no update);
every checkpoint is checked finite; numeric arguments are validated."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tte_flash.training import NonFiniteTrainingError, main as train_main

from test_training import args, losses, make_data

ROOT = Path(__file__).resolve().parents[1]


def _poison_step(monkeypatch, step, value=float("nan")):
    """Objective.loss returns a non-finite loss (still attached to the graph) on its ``step``-th call."""
    from tte_flash.objective import Objective
    original, calls = Objective.loss, []

    def loss(self, model, batch):
        calls.append(1)
        out, stats = original(self, model, batch)
        return (out * value if len(calls) == step else out), stats
    monkeypatch.setattr(Objective, "loss", loss)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_the_run_before_saving(tmp_path, monkeypatch, value):
    _poison_step(monkeypatch, 3, value)
    data = make_data(tmp_path / "data", n=16)
    with pytest.raises(NonFiniteTrainingError, match="non-finite loss .* at step 3"):
        train_main(args(data, tmp_path / "run", "--max_steps", "6", "--save_steps", "2"))
    assert not (tmp_path / "run" / "model.safetensors").exists()  # no final model
    saved = load_file(tmp_path / "run" / "checkpoint-2" / "model.safetensors")  # the earlier checkpoint is intact
    assert all(torch.isfinite(t).all() for t in saved.values() if t.is_floating_point())
    assert not (tmp_path / "run" / "checkpoint-4").exists()


def test_skip_makes_no_update_on_the_bad_step_and_finishes(tmp_path, monkeypatch):
    _poison_step(monkeypatch, 3)
    snapshots = []
    from tte_flash.training import TTETrainer
    original = TTETrainer._get_grad_norm

    def spy(self, model, grad_norm=None):  # the weights before each optimizer step
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return original(self, model, grad_norm)
    monkeypatch.setattr(TTETrainer, "_get_grad_norm", spy)
    data = make_data(tmp_path / "data", n=16)
    trainer = train_main(args(data, tmp_path / "run", "--max_steps", "5", "--save_strategy", "no",
                              "--on_nonfinite", "skip", "--logging_steps", "1"))
    assert trainer.state.global_step == 5
    assert all(torch.equal(snapshots[2][n], snapshots[3][n]) for n in snapshots[2])  # step 3 changed nothing
    assert any(not torch.equal(snapshots[1][n], snapshots[2][n]) for n in snapshots[1])  # step 2 did
    assert losses(trainer, "nonfinite_steps_skipped")[-1] == 1
    final = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())


def test_a_checkpoint_with_nan_weights_is_never_written(tmp_path, monkeypatch):
    from tte_flash.training import TTETrainer
    original = TTETrainer._save

    def poisoned(self, output_dir=None, state_dict=None):
        with torch.no_grad():
            next(self.model.parameters()).fill_(float("nan"))
        return original(self, output_dir, state_dict)
    monkeypatch.setattr(TTETrainer, "_save", poisoned)
    data = make_data(tmp_path / "data", n=16)
    with pytest.raises(NonFiniteTrainingError, match="refusing to save .*checkpoint-2.* NaN or inf"):
        train_main(args(data, tmp_path / "run", "--max_steps", "4", "--save_steps", "2"))
    assert not (tmp_path / "run" / "checkpoint-2" / "model.safetensors").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "0", "--temperature must be a finite number > 0"),
    ("--temperature", "-0.5", "--temperature must be a finite number > 0"),
    ("--cot_weight", "nan", "--cot_weight must be a finite number >= 0"),
    ("--cot_weight", "inf", "--cot_weight must be a finite number >= 0"),
    ("--learning_rate", "nan", "--learning_rate must be a finite number"),
])
def test_numeric_arguments_are_validated(tmp_path, flag, value, message):
    data = make_data(tmp_path / "data", n=8)
    with pytest.raises(ValueError, match=message):
        train_main(args(data, tmp_path / "run", "--max_steps", "1", flag, value))


def test_the_cli_reports_a_clear_error_without_a_traceback(tmp_path):
    data = make_data(tmp_path / "data", n=8)
    done = subprocess.run([sys.executable, str(ROOT / "training" / "train.py"),
                           *args(data, tmp_path / "run", "--max_steps", "1", "--temperature", "0")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "train.py: error: --temperature must be a finite number > 0" in done.stderr
    assert "Traceback" not in done.stderr
