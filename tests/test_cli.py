"""The `slm` command as a user runs it: train, eval, generate, errors."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, tiny_experiment
from simplified_slm.cli.main import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tmp / "cfg.json"
    cfg.write_text(json.dumps(tiny_experiment(tmp / "run", max_steps=30)))
    assert main(["train", "--config", str(cfg)]) == 0
    return tmp / "run"


def run_cli(*args, stdin=None):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "simplified_slm.cli", *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=120)


def test_eval_writes_report(trained, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(trained / "checkpoints" / "best"), "--json", str(out),
                 "--samples", "1", "--sample_tokens", "20"]) == 0
    report = json.loads(out.read_text())
    m = report["metrics"]
    assert {"loss", "ppl", "bpb", "accuracy", "utf8_validity"} <= set(m)
    assert m["bpb"] > 0 and 0 <= m["accuracy"] <= 1
    assert "bits" not in capsys.readouterr().err


def test_eval_on_another_dataset(trained, tmp_path):
    assert main(["eval", "--checkpoint", str(trained / "checkpoints" / "latest"), "--dataset", "tinyshakespeare",
                 "--max_batches", "2", "--samples", "0", "--json", str(tmp_path / "e.json")]) == 0


def test_generate_prompt_and_file(trained, tmp_path, capsys):
    ckpt = str(trained / "checkpoints" / "best")
    assert main(["generate", "--model_path", ckpt, "--prompt", "ROMEO:", "--max_tokens", "15", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"First Citizen:\n\xff\xfe broken line\nKING:\n" + b"x" * 100 + b"\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model_path", ckpt, "--prompt_file", str(prompts), "--output_file", str(out),
                 "--max_tokens", "10", "--seed", "1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 3]  # bad UTF-8 and too-long lines reported and skipped
    err = capsys.readouterr().err
    assert ":2 is not valid UTF-8" in err and ":4:" in err and "context" in err


def test_interactive_survives_eof(trained):
    result = run_cli("generate", "--model_path", str(trained / "checkpoints" / "best"), "--interactive",
                     "--max_tokens", "5", stdin="KING:\n")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith(">>> KING:")


def test_root_scripts_work_as_in_seed(trained):
    env = {**os.environ}
    result = subprocess.run([sys.executable, str(REPO / "generate.py"), "--model_path",
                             str(trained / "checkpoints" / "best"), "--prompt", "Hello", "--max_tokens", "10",
                             "--greedy"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello")


@pytest.mark.parametrize("content,message", [
    ('{"train": {"max_step": 5}}', "did you mean 'max_steps'"),
    ('{"train": {"batch_size": "big"}}', "expected an integer"),
    ('{"model": {"family": "gpt", "n_heads": 3}}', "divisible"),
    ('{"data": {"dataset": "no_such_corpus_here"}}', "no_such_corpus_here"),
    ('{"train": ', "cannot parse config"),
])
def test_bad_config_gives_one_line_error(tmp_path, content, message):
    cfg = tmp_path / "bad.json"
    cfg.write_text(content)
    result = run_cli("train", "--config", str(cfg), "--output_dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_missing_and_corrupt_checkpoints(tmp_path, trained):
    result = run_cli("generate", "--model_path", str(tmp_path / "nothing"), "--prompt", "x")
    assert result.returncode == 2 and "missing" in result.stderr and "Traceback" not in result.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (trained / "checkpoints" / "best").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    result = run_cli("eval", "--checkpoint", str(broken), "--dataset", "tinyshakespeare")
    assert result.returncode == 2 and "model.safetensors" in result.stderr and "Traceback" not in result.stderr


def test_seed_generate_without_a_model_runs_on_a_fresh_clone(tmp_path):
    """Seed 000: `python generate.py --prompt "Hello" --max_tokens 100 --temperature 0.8`."""
    result = subprocess.run([sys.executable, str(REPO / "generate.py"), "--prompt", "Hello", "--max_tokens", "20",
                             "--temperature", "0.8"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello") and "untrained" in result.stderr


def test_generate_refuses_a_corrupted_checkpoint(trained, tmp_path):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(trained / "checkpoints" / "best", copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in a weight
    weights.write_bytes(bytes(data))
    result = run_cli("generate", "--model_path", str(copy), "--prompt", "x", "--max_tokens", "2")
    assert result.returncode == 2 and "SHA-256" in result.stderr and "Traceback" not in result.stderr
