"""What `slm` subcommands write, as a user runs them (fresh processes): every output path is
checked before the work, folders are replaced only with --overwrite and atomically, files
follow the umask, prompt-file runs keep finished work through Ctrl-C and resume, and
clamped or unavailable values are said rather than hidden."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_experiment
from simplified_slm.models.gpt import GPTConfig
from simplified_slm.models.registry import build_model
from simplified_slm.tokenizers import BPETokenizer, ByteTokenizer, CharTokenizer

TEXT = "the quick brown fox jumps over the lazy dog; a stitch in time saves nine.\n" * 20


def slm(*args: object, cwd: Path | None = None, umask: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "simplified_slm.cli", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def one_line_error(run: subprocess.CompletedProcess, needle: str) -> None:
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: ") and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert needle in run.stderr
    assert run.stdout == ""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Untrained tiny GPT folders with a byte, a char and a BPE tokenizer, and a text file."""
    root = tmp_path_factory.mktemp("models")
    (root / "text.txt").write_text(TEXT)
    for name, tokenizer in (("byte", ByteTokenizer()), ("char", CharTokenizer()),
                            ("bpe", BPETokenizer.train([TEXT], vocab_size=300))):
        torch.manual_seed(0)
        build_model(GPTConfig(vocab_size=tokenizer.vocab_size, n_layers=1, d_model=16, n_heads=2,
                              context_length=32, dropout=0.0)).save_pretrained(root / name, tokenizer=tokenizer)
    return root


def _readonly_dir(tmp_path: Path) -> Path:
    """A folder nobody can create files in: chmod 555, or (as root, who ignores modes) /sys."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            (candidate / ".probe").touch()
            (candidate / ".probe").unlink()
        except OSError:
            return candidate
    pytest.skip("no read-only folder available (running as root with a writable /sys)")


def _commands(models: Path, tmp_path: Path) -> dict:
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(tiny_experiment(tmp_path / "run")))
    prompts = tmp_path / "p.txt"
    prompts.write_text("KING:\n")
    return {
        "eval": lambda out: ["eval", "--checkpoint", models / "byte", "--dataset", "tinyshakespeare",
                             "--max_batches", "1", "--json", out],
        "generate": lambda out: ["generate", "--model_path", models / "byte", "--prompt", "KING:",
                                 "--max_tokens", "5", "--output_file", out],
        "generate-prompt-file": lambda out: ["generate", "--model_path", models / "byte", "--prompt_file", prompts,
                                             "--max_tokens", "5", "--output_file", out],
        "export": lambda out: ["export", "--checkpoint", models / "byte", "--format", "safetensors", "--out", out],
        "tokenizer": lambda out: ["tokenizer", "train", "--kind", "byte", "--data", models / "text.txt",
                                  "--out", out],
        "prepare": lambda out: ["prepare", "--config", config, "--out", out],
        "harness": lambda out: ["harness", "--model_path", models / "byte", "--tasks", "tinystories_ppl",
                                "--limit", "1", "--output_path", out],
    }


FILE_OUTPUTS = ["eval", "generate", "generate-prompt-file", "harness"]
FOLDER_OUTPUTS = ["export", "tokenizer", "prepare"]


@pytest.mark.parametrize("command", FILE_OUTPUTS + FOLDER_OUTPUTS)
@pytest.mark.parametrize("case", ["missing folder", "wrong kind", "read-only"])
def test_every_output_path_is_checked_before_the_work(models, tmp_path, command, case):
    """(Row 2) A bad output path ends in one `error:` line before any work, and nothing is created."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "a_file").write_text("x")
    if case == "missing folder":
        out, needle = work / "nodir" / "out.txt", "does not exist"
        if command in FOLDER_OUTPUTS:  # folders are created with their parents; a file in the way is not
            out, needle = work / "a_file" / "out", "is a file, not a folder"
    elif case == "wrong kind":
        out, needle = (work, "is a folder") if command in FILE_OUTPUTS else (work / "a_file", "is a file")
    else:
        out, needle = _readonly_dir(tmp_path) / "out.txt", "not writable"
    before = sorted(work.rglob("*"))
    one_line_error(slm(*_commands(models, tmp_path)[command](out)), needle)
    assert sorted(work.rglob("*")) == before


def test_non_empty_output_folders_need_overwrite(models, tmp_path):
    """(Row 2 / row 4) `export`, `tokenizer train` and `prepare` refuse a folder holding other files."""
    commands = _commands(models, tmp_path)
    for command in FOLDER_OUTPUTS:
        out = tmp_path / f"{command}_out"
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
        one_line_error(slm(*commands[command](out)), "--overwrite")
        assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_a_linked_output_folder_is_refused(tmp_path):
    """Swapping in a new folder would replace the link (e.g. checkpoints/best), not its target."""
    from simplified_slm.cli.outputs import check_output_dir
    from simplified_slm.errors import SLMError

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(SLMError, match="symbolic link"):
        check_output_dir(tmp_path / "link", "--out", overwrite=True)


def test_hf_export_replaces_a_folder_only_with_overwrite_and_atomically(models, tmp_path):
    """(Row 4) A second model exported over the first: refused, then with --overwrite the
    folder holds the second model's files only, and AutoTokenizer loads its tokenizer."""
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "X"
    assert slm("export", "--checkpoint", models / "bpe", "--format", "hf", "--out", out).returncode == 0
    assert transformers.AutoTokenizer.from_pretrained(str(out)).vocab_size == 300
    first = sorted(p.name for p in out.iterdir())
    one_line_error(slm("export", "--checkpoint", models / "byte", "--format", "hf", "--out", out), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == first

    run = slm("export", "--checkpoint", models / "byte", "--format", "hf", "--out", out, "--overwrite")
    assert run.returncode == 0, run.stderr
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    assert auto("héllo")["input_ids"] == list("héllo".encode())  # the byte tokenizer, not the old BPE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X"]  # no temporary or set-aside folder left


def test_a_refused_or_failed_export_creates_nothing(models, tmp_path):
    """(Rows 4, friction 4) A char tokenizer cannot become an AutoTokenizer: refused with the
    reason. An exporter failing half way (ternary needs BitLinear layers) leaves no folder."""
    one_line_error(slm("export", "--checkpoint", models / "char", "--format", "hf", "--out", tmp_path / "Y"),
                   "CharTokenizer has no transformers equivalent")
    one_line_error(slm("export", "--checkpoint", models / "byte", "--format", "ternary", "--out",
                       tmp_path / "Z"), "BitLinear")
    assert list(tmp_path.iterdir()) == []


def test_weight_files_follow_the_umask(models, tmp_path):
    """(Row 3) safetensors writes through a temp file of its own (0600); checkpoints and every
    export format we write must come out as umask 0022 gives: 0644."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(tiny_experiment(tmp_path / "run", max_steps=2, checkpoint_every=2,
                                              eval_every=2, sample_every=2)))
    run = slm("train", "--config", cfg, umask=0o022)
    assert run.returncode == 0, run.stderr
    for fmt in ("safetensors", "hf"):
        run = slm("export", "--checkpoint", models / "byte", "--format", fmt, "--out", tmp_path / fmt, umask=0o022)
        assert run.returncode == 0, run.stderr
    files = [*(tmp_path / "run" / "checkpoints").glob("step_*/*"), *(tmp_path / "safetensors").iterdir(),
             *(tmp_path / "hf").iterdir()]
    assert sum(f.suffix == ".safetensors" for f in files) >= 4
    modes = {str(f.relative_to(tmp_path)): oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
    assert set(modes.values()) == {"0o644"}, modes
    assert oct(stat.S_IMODE((tmp_path / "hf").stat().st_mode)) == "0o755"


def test_eval_without_samples_and_with_a_clamped_block(models):
    """(Row 5, friction 3) No samples: UTF-8 validity is "n/a", not a perfect 1.000; a block
    longer than the context is clamped with a note."""
    run = slm("eval", "--checkpoint", models / "byte", "--dataset", "tinyshakespeare", "--max_batches", "1",
              "--samples", "0", "--block_size", "100000")
    assert run.returncode == 0, run.stderr
    assert "utf8 validity n/a" in run.stdout
    assert "note: --block_size 100000 is longer than the model's context; evaluating with 32" in run.stderr


def test_eval_prints_metrics_then_writes_the_report(models, tmp_path):
    run = slm("eval", "--checkpoint", models / "byte", "--dataset", "tinyshakespeare", "--max_batches", "1",
              "--samples", "1", "--sample_tokens", "5", "--json", tmp_path / "e.json")
    assert run.returncode == 0, run.stderr
    assert "val loss" in run.stdout and "utf8 validity " in run.stdout and "n/a" not in run.stdout
    assert json.loads((tmp_path / "e.json").read_text())["metrics"]["loss"] > 0


@pytest.mark.parametrize("option,value,needle", [("--top_p", "0", "top_p must be"),
                                                 ("--temperature", "-1", "temperature must be"),
                                                 ("--max_tokens", "-3", "max_new_tokens must be")])
def test_generation_arguments_are_checked_before_the_prompt_is_echoed(models, option, value, needle):
    """(Friction 2) The error is the only output: no `ROMEO:error: ...`."""
    run = slm("generate", "--model_path", models / "byte", "--prompt", "ROMEO:", option, value)
    one_line_error(run, needle)


def test_tokenizer_train_says_when_the_vocab_is_smaller_than_asked(models, tmp_path):
    """(Friction 3) BPE stops when nothing is left to merge: said in one note, not silently."""
    run = slm("tokenizer", "train", "--kind", "bpe", "--vocab-size", "100000000", "--data", models / "text.txt",
              "--out", tmp_path / "tok")
    assert run.returncode == 0, run.stderr
    size = json.loads(run.stdout)["vocab_size"]
    assert f"note: the tokenizer has {size} tokens, not the 100000000 asked for" in run.stderr
    assert "pairs to merge" in run.stderr


def test_prompt_file_progress_and_a_summary_with_skipped_lines(models, tmp_path):
    """(Friction 1, 3) A line per prompt on stderr (not a TTY), each completion on stdout as it
    finishes, and skipped lines give a summary and exit code 1."""
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"KING:\n\xff bad\n\nQUEEN:\n" + b"x" * 40 + b"\n")
    run = slm("generate", "--model_path", models / "byte", "--prompt_file", prompts, "--max_tokens", "4",
              "--seed", "1")
    assert run.returncode == 1, run.stderr
    assert run.stdout.count("=== prompt (line") == 2
    for line in ("[1/3] line 1:", "[2/3] line 4:", "[3/3] line 5:"):
        assert line in run.stderr
    assert run.stderr.strip().splitlines()[-1] == "generated 2 completions; 2 lines skipped (see the warnings above)"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


N_PROMPTS = 12


def test_prompt_file_interrupted_keeps_finished_completions_and_resumes(models, tmp_path):
    """(Row 1) SIGINT in the middle: exit 130, the finished completions are in out.jsonl, and
    rerunning the same command answers only the prompts not there yet."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}:\n" for i in range(N_PROMPTS)))
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model_path", models / "byte", "--prompt_file", prompts, "--max_tokens", "400",
            "--seed", "3", "--output_file", out]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "simplified_slm.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out.is_file() and out.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "[1/%d] line 1:" % N_PROMPTS in err and "rerun the same command" in err and "Traceback" not in err
    kept = _rows(out)
    assert 2 <= len(kept) < N_PROMPTS and [r["line"] for r in kept] == list(range(1, len(kept) + 1))

    run = slm(*args)
    assert run.returncode == 0, run.stderr
    assert f"resuming: {len(kept)} of {N_PROMPTS} prompts already answered" in run.stderr
    rows = _rows(out)
    assert [r["line"] for r in rows] == list(range(1, N_PROMPTS + 1))
    assert rows[:len(kept)] == kept
    assert f"[{N_PROMPTS - len(kept)}/{N_PROMPTS - len(kept)}]" in run.stderr
    one_line_error(slm(*[("7" if a == "3" else a) for a in args]), "other settings")
