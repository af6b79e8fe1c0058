"""`slm train` checks before it works, in a fresh process as a user runs it: resuming on
changed data or a rebuilt tokenizer, a file passed to --resume, a finished run, a model too
big for the machine, and a warmup longer than the run."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

TINY = ["train.max_steps=8", "train.checkpoint_every=4", "train.eval_every=4", "train.eval_batches=1",
        "train.sample_every=8", "train.sample_tokens=4", "train.loggers=[csv]", "train.batch_size=4",
        "train.block_size=32", "train.warmup_steps=2", "data.dataset=null"]


def slm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "simplified_slm.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def train(run: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    sets = [a for s in [*TINY, f"data.train_file={data}", "tokenizer.char_policy=corpus"] for a in ("--set", s)]
    return slm("train", "--config", str(REPO / "configs" / "tiny_test.json"), "--output_dir", str(run),
               *sets, *extra)


def shakespeare(path: Path, start: int = 0, size: int = 60_000) -> Path:
    text = gzip.open(REPO / "src" / "simplified_slm" / "corpora" / "tinyshakespeare.txt.gz", "rt").read()
    path.write_text(text[start:start + size])
    return path


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr  # no traceback
    return lines[0]


def test_resume_on_changed_data_is_refused_unless_allowed(tmp_path):
    data = shakespeare(tmp_path / "my.txt")
    run = tmp_path / "run"
    assert train(run, data, "--until", "4").returncode == 0
    data.write_text(data.read_text().replace("the", "THE"))  # same characters, different text
    line = one_error_line(train(run, data, "--resume", "auto"))
    assert "training data" in line and str(data) in line and "--allow-data-change" in line
    assert not (run / "checkpoints" / "step_00000008").exists()
    resumed = train(run, data, "--resume", "auto", "--allow-data-change")
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "checkpoints" / "step_00000008").is_dir()


def test_resume_with_a_rebuilt_tokenizer_says_so(tmp_path):
    first = tmp_path / "first"
    assert train(first, shakespeare(tmp_path / "a.txt")).returncode == 0
    # a second run folder whose tokenizer was built from other text (fewer characters)
    other = tmp_path / "other"
    small = tmp_path / "b.txt"
    small.write_text("abc abc cab\n" * 500)
    tok = slm("tokenizer", "train", "--kind", "char", "--data", str(small), "--out", str(other / "tokenizer"))
    assert tok.returncode == 0, tok.stderr
    line = one_error_line(train(other, small, "--resume", str(first / "checkpoints" / "latest")))
    assert "tokenizer was rebuilt" in line


def test_resume_from_a_file_the_finished_run_and_warmup(tmp_path):
    data = shakespeare(tmp_path / "my.txt")
    line = one_error_line(train(tmp_path / "r", data, "--resume", str(data)))
    assert "is a file" in line and "checkpoint folder" in line
    run = tmp_path / "run"
    first = train(run, data, "--set", "train.warmup_steps=20")
    assert first.returncode == 0 and "warmup_steps (20) is not shorter than the run (8 steps)" in first.stderr
    again = train(run, data, "--resume", "auto")
    assert again.returncode == 0
    assert "already finished at step 8" in again.stderr and "train.max_steps" in again.stderr


def test_a_model_too_big_for_memory_is_refused_before_anything_is_written(tmp_path):
    data = shakespeare(tmp_path / "my.txt")
    for override in ("model.d_model=1000000000", "model.n_layers=100000000"):
        run = tmp_path / override.split("=")[0]
        line = one_error_line(train(run, data, "--set", override))
        assert "GiB" in line and "this machine has" in line and "shrink the model" in line
        assert not run.exists()  # no .lock, data/ or tokenizer/ left behind
    # the estimate is a lower bound: the shipped experiment configs pass it
    from simplified_slm.training.config import load_experiment_config
    from simplified_slm.training.memory import check_fits_in_memory

    for config in sorted((REPO / "configs").rglob("*.json")):
        if "train" not in json.loads(config.read_text()):
            continue  # a model config, not an experiment
        cfg = load_experiment_config(config, [])
        if cfg.train.init_from:
            continue  # the pretrained source fixes the model (checked when it loads)
        vocab = cfg.model.get("vocab_size") or cfg.tokenizer.vocab_size or 256
        check_fits_in_memory(cfg.model_config(vocab), cfg.train.batch_size, cfg.train.block_size)
