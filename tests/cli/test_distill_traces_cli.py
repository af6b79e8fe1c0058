"""`slm distill traces` killed mid-run and rerun: every prompt answered exactly once."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO, family_model
from simplified_slm.cli.main import main
from simplified_slm.tokenizers import ByteTokenizer


def _lines(path):
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def test_kill_and_rerun_answers_every_prompt_exactly_once(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    family_model("llama").save_pretrained(teacher, tokenizer=ByteTokenizer())
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"{i} + {i} ="}) + "\n" for i in range(80)))
    out, reference = tmp_path / "traces.jsonl", tmp_path / "reference.jsonl"
    args = ["distill", "traces", "--teacher", str(teacher), "--prompts", str(prompts), "--max-new-tokens", "40",
            "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "simplified_slm.cli", *args, "--out", str(out),
                             "--batch-size", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and _lines(out) < 3:  # the first rows are out
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert 3 <= _lines(out) < 80

    assert main([*args, "--out", str(out), "--batch-size", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kept"] >= 3 and summary["kept"] + summary["written"] == 80
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == sorted(f"q{i}" for i in range(80))  # each exactly once
    assert main([*args, "--out", str(reference), "--batch-size", "8"]) == 0
    expected = {row["id"]: row for row in map(json.loads, reference.read_text().splitlines())}
    assert {row["id"]: row for row in rows} == expected  # greedy: the same answers, however they were batched
