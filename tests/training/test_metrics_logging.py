"""What a real (tiny) training run writes to metrics.csv for ternary and H-Net models:
per-group gradient norms, ternary code shares and scales per BitLinear, H-Net compression
per stage; and the lines the console logger prints during that run."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from conftest import tiny_experiment
from simplified_slm.export.ternary import bitlinear_modules
from simplified_slm.models import CausalLM
from simplified_slm.training import ExperimentConfig, Trainer

LOG_STEPS = [3, 6]


def train(tmp_path: Path, model: dict) -> tuple[Path, list[str]]:
    """Six steps of a byte-level model on tiny shakespeare, logging every 3 steps."""
    cfg = tiny_experiment(tmp_path / "run", max_steps=6, batch_size=4, log_every=3, eval_every=6,
                          eval_batches=1, sample_every=6, sample_tokens=8, checkpoint_every=6,
                          loggers=["csv", "console"])
    cfg["model"] = model
    cfg["tokenizer"] = {"kind": "byte"}
    cfg["data"]["max_train_bytes"] = 50_000
    said: list[str] = []
    result = Trainer(ExperimentConfig.from_dict(cfg), say=said.append).run()
    assert result.step == 6
    return tmp_path / "run", said


def read_metrics(run: Path) -> dict[int, dict[str, float]]:
    by_step: dict[int, dict[str, float]] = {}
    with open(run / "metrics.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            by_step.setdefault(int(row["step"]), {})[row["name"]] = float(row["value"])
    return by_step


def check_grad_norms(metrics: dict[str, float], expected: set[str]) -> None:
    groups = {k.removeprefix("grad_norm/"): v for k, v in metrics.items() if k.startswith("grad_norm/")}
    assert set(groups) == {"global", *expected}, sorted(groups)
    assert all(math.isfinite(v) and v >= 0 for v in groups.values())
    parts = [v for k, v in groups.items() if k != "global"]
    # the groups partition the parameters: their norms add up (in squares) to the global one
    assert math.sqrt(sum(v * v for v in parts)) == pytest.approx(groups["global"], rel=1e-5)
    assert groups["global"] > 0


def check_ternary(metrics: dict[str, float], model: CausalLM) -> None:
    layers = set(bitlinear_modules(model))
    assert layers, "the model has no BitLinear layers to report"
    for name in [*layers, "all"]:
        shares = [metrics[f"ternary/{name}/{code}"] for code in ("neg", "zero", "pos")]
        assert all(0.0 <= s <= 1.0 for s in shares), (name, shares)
        assert sum(shares) == pytest.approx(1.0, abs=1e-6), (name, shares)
        assert 0.05 < shares[1] < 0.95  # absmean quantisation: a real mix of zeros and +-1
        assert metrics[f"ternary/{name}/scale"] > 0
    reported = {k.split("/")[1] for k in metrics if k.startswith("ternary/")}
    assert reported == layers | {"all"}


def check_console(said: list[str]) -> None:
    """The console logger prints a line per log step (loss, lr, tokens/s), each evaluation
    and the samples."""
    for step in LOG_STEPS:
        train = [line for line in said if line.startswith(f"step {step}: loss ")]
        assert len(train) == 1 and " lr " in train[0] and " tok/s " in train[0], said
    evals = [line for line in said if line.startswith("step 6: val/loss ")]
    assert len(evals) == 1 and "val/bpb " in evals[0], said
    assert any(line.startswith("--- sample at step 6 ---\n") for line in said), said


def test_bitnet_run_logs_grad_norms_and_ternary_shares(tmp_path):
    run, said = train(tmp_path, {"family": "bitnet", "preset": "tiny"})
    metrics = read_metrics(run)
    model = CausalLM.from_pretrained(run / "checkpoints" / "latest")
    for step in LOG_STEPS:
        layers = {f"layer{i}" for i in range(model.config.num_hidden_layers)}
        check_grad_norms(metrics[step], {"embeddings", "head", *layers})
        check_ternary(metrics[step], model)
    check_console(said)


def test_hnet_bit_run_logs_compression_per_stage(tmp_path):
    model_cfg = {"family": "hnet_bit", "preset": "tiny", "d_model": [32, 48, 64], "encoder_layers": [1, 1],
                 "decoder_layers": [1, 1], "main_layers": 1, "target_ratio": [2.0, 2.0]}
    run, said = train(tmp_path, model_cfg)
    metrics = read_metrics(run)
    model = CausalLM.from_pretrained(run / "checkpoints" / "latest")
    for step in LOG_STEPS:
        m = metrics[step]
        assert {k for k in m if k.startswith("hnet/")} == {
            f"hnet/stage{s}/{name}" for s in (0, 1) for name in ("compression", "bytes_per_chunk")}
        for s in (0, 1):
            assert 1.0 < m[f"hnet/stage{s}/compression"] <= 32  # at most one chunk per block
        # bytes per stage-1 chunk = stage-0 compression x stage-1 compression
        assert m["hnet/stage0/bytes_per_chunk"] == pytest.approx(m["hnet/stage0/compression"])
        assert m["hnet/stage1/bytes_per_chunk"] == pytest.approx(
            m["hnet/stage0/compression"] * m["hnet/stage1/compression"], rel=1e-6)
        parts = {f"stage{s}.{part}" for s in (0, 1) for part in ("encoder", "decoder", "routing")}
        check_grad_norms(m, {"embeddings", "head", "main", *parts})
        check_ternary(m, model)
    check_console(said)
