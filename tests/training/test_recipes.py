"""Shipped training recipes reach the figures the README quotes (slow: real training runs)."""

import csv
import subprocess

import pytest

from conftest import REPO


@pytest.mark.slow
def test_nanogpt_cpu_recipe_reaches_nanogpts_validation_loss(tmp_path, python_exe):
    """configs/nanogpt_shakespeare_char.json: nanoGPT's CPU recipe shape (char level, 4 layers,
    4 heads, 128 wide, block 64, batch 12, 2000 iterations = 1.54M tokens, dropout 0).

    nanoGPT's published figure for that recipe is 1.88 nats/char (its own run on this machine
    type: 1.8857). Our preset (exact GELU, no biases, tuned lr) measured 1.770 on the whole
    validation split (2026-11-25, seed 1337, float32 on an Intel Xeon); the config's
    `precision: auto` trains in bf16 on CPUs with native bf16, where it measured 1.768
    (2026-12-06, AMD EPYC). The margin covers thread-count rounding.
    About 1.5 minutes on 2 idle cores.
    """
    run_dir = tmp_path / "run"
    train = subprocess.run([python_exe, "-m", "simplified_slm.cli", "train", "--config",
                            str(REPO / "configs" / "nanogpt_shakespeare_char.json"),
                            "--output_dir", str(run_dir)], capture_output=True, text=True)
    assert train.returncode == 0, train.stderr[-2000:]
    with open(run_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    val = [(int(r["step"]), float(r["value"])) for r in rows if r["name"] == "val/loss"]
    assert val[-1][0] == 2000, val
    assert val[-1][1] <= 1.88, val
    tokens = [float(r["value"]) for r in rows if r["name"] == "train/tokens"]
    assert tokens[-1] == 2000 * 12 * 64  # the recipe's 1.54M training tokens, no more
