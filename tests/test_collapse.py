"""The collapse warning: fires when the contrastive loss sits at ln(number of targets), not otherwise."""
import logging
import math

from tte_flash.training import CollapseMonitor
from tte_flash.training import main as train_main

from test_training import args, make_data


def test_monitor_fires_once_after_a_streak_at_uniform():
    monitor = CollapseMonitor(patience=3, tolerance=0.02)
    uniform = math.log(57)
    fired = [monitor.update(loss, uniform) for loss in (4.3, 4.05, 4.04, 4.046, 4.047, 4.045, 4.04)]
    assert [f is not None for f in fired] == [False, False, False, True, False, False, False]  # 4.3 is 6% above
    assert "collapsed" in fired[3] and "57 targets" in fired[3]


def test_monitor_resets_when_the_loss_leaves_uniform():
    monitor = CollapseMonitor(patience=3, tolerance=0.02)
    uniform = math.log(64)
    losses = (4.15, 4.16, 3.5, 4.15, 4.16, 2.0, 1.0, 0.5)  # never three logs in a row at uniform
    assert all(monitor.update(loss, uniform) is None for loss in losses)


def test_collapsed_run_warns_and_learning_run_does_not(tmp_path, caplog):
    data = make_data(tmp_path / "data")
    # a temperature of 1e4 makes every score equal: the loss is ln(targets) whatever the model does
    with caplog.at_level(logging.WARNING, logger="tte_flash.train"):
        collapsed = train_main(args(data, tmp_path / "collapsed", "--max_steps", "12", "--logging_steps", "2",
                                    "--temperature", "1e4", "--save_strategy", "no", "--cot_weight", "0"))
    assert any("collapsed" in r.getMessage() for r in caplog.records)
    assert any("collapse_warning" in e for e in collapsed.state.log_history)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tte_flash.train"):
        learning = train_main(args(data, tmp_path / "learning", "--max_steps", "30", "--logging_steps", "3",
                                   "--save_strategy", "no", "--cot_weight", "0"))
    losses = [e["contrastive_loss"] for e in learning.state.log_history if "contrastive_loss" in e]
    assert losses[-1] < 0.5 * losses[0]  # it learned
    assert not any("collapsed" in r.getMessage() for r in caplog.records)
    assert not any("collapse_warning" in e for e in learning.state.log_history)
