"""`train.time_budget`: the learning-rate schedule follows the clock, the run ends on time with
its schedule complete, evaluation time is not charged to the budget, and resume continues the
budget where the checkpoint left it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import tiny_experiment
from simplified_slm.errors import SLMError
from simplified_slm.training import ExperimentConfig, Trainer
from simplified_slm.training.config import TrainConfig
from simplified_slm.training.optim import clock_learning_rate, learning_rate


def test_clock_schedule_warms_up_and_decays_to_min_lr_by_the_budget_end():
    cfg = TrainConfig(max_steps=1000, lr=1e-2, min_lr=1e-4, warmup_steps=100, time_budget=60.0)
    assert clock_learning_rate(60.0, 3, cfg) == pytest.approx(1e-4)  # budget spent: min_lr
    assert clock_learning_rate(90.0, 3, cfg) == pytest.approx(1e-4)  # past it stays there
    assert clock_learning_rate(3.0, 3, cfg) == pytest.approx(learning_rate(50, cfg))  # 5% = half the warmup
    assert clock_learning_rate(30.0, 3, cfg) == pytest.approx(learning_rate(500, cfg))  # halfway
    # a fast machine that reaches max_steps first also ends its schedule
    assert clock_learning_rate(1.0, 1000, cfg) == pytest.approx(1e-4)
    lrs = [clock_learning_rate(t, 0, cfg) for t in range(6, 61)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # decays monotonically after the warmup
    # halfway through the decay (after the 10% warmup) the cosine is at its midpoint
    assert clock_learning_rate(33.0, 0, cfg) == pytest.approx((cfg.lr + cfg.min_lr) / 2, rel=1e-6)


def test_time_budget_rejects_bad_values_and_phases():
    with pytest.raises(SLMError, match="time_budget: must be a positive number"):
        TrainConfig(time_budget=0.0).validate()
    with pytest.raises(SLMError, match="curriculum phases are laid out in steps"):
        TrainConfig.from_dict({"max_steps": 10, "time_budget": 5.0,
                               "phases": [{"steps": 5}, {"steps": 5, "block_size": 16}]}).validate()


def metrics(run: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    with open(run / "metrics.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            out.setdefault(row["name"], []).append((int(row["step"]), float(row["value"])))
    return out


def budgeted(tmp_path: Path, budget: float) -> ExperimentConfig:
    # evaluation every 5 steps costs about as much as the steps: it must not count
    return ExperimentConfig.from_dict(tiny_experiment(
        tmp_path, max_steps=100_000, time_budget=budget, warmup_steps=1000, eval_every=5, eval_batches=8,
        log_every=1, sample_every=10**6, checkpoint_every=10**6, lr=3e-3, min_lr=3e-4))


def test_a_budgeted_run_stops_on_time_with_its_schedule_complete(tmp_path):
    said: list[str] = []
    result = Trainer(budgeted(tmp_path, 4.0), say=said.append).run()
    m = metrics(tmp_path)
    step_times = [b - a for (_, a), (_, b) in zip(m["train/seconds"], m["train/seconds"][1:])]
    assert 4.0 <= result.train_seconds <= 4.0 + 3 * max(step_times)  # stops at the first step past the budget
    assert 5 < result.step < 100_000
    last_lr = m["train/lr"][-1][1]
    assert last_lr == pytest.approx(3e-4, rel=0.05)  # decayed to min_lr by the end
    assert max(lr for _, lr in m["train/lr"]) > 2e-3  # and warmed up on the clock (1% of 100k steps)
    assert "val/loss" in m and m["val/loss"][-1][0] == result.step  # the planned end is evaluated
    report = [line for line in said if "of the 4 s budget" in line]
    assert report and "evaluation, samples and checkpoints" in report[0], said


def test_resuming_a_budgeted_run_continues_its_budget(tmp_path):
    paused = Trainer(budgeted(tmp_path, 4.0), say=lambda s: None, until=8).run()
    assert paused.step == 8 and 0 < paused.train_seconds < 4.0
    done = Trainer(budgeted(tmp_path, 4.0), resume="auto", say=lambda s: None).run()
    assert done.step > 8
    assert 4.0 <= done.train_seconds < 6.0  # the paused part counted once, not restarted
    m = metrics(tmp_path)
    assert m["train/lr"][-1][1] == pytest.approx(3e-4, rel=0.05)
