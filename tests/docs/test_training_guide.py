"""docs/TRAINING_GUIDE.md stays true: its `# tested` commands run, its `# checked` ones parse.

Every line of a ```bash block in the guide must end in one of the two markers. `# tested`
lines run in order, as written, in a scratch folder that links the repository's configs/
and scripts/ (so the guide's relative paths work and its runs/ stay out of the checkout).
`slm ...` and `python <file> ...` run in this process (same argv, no torch re-import per
command); anything else runs in bash. `# checked` lines are too long or interactive to
run: their `slm` arguments must parse and their configs load, their make targets and files
must exist. The figures the guide quotes from `# tested` commands are checked against what
those commands produce, within the tolerance the guide states.
"""

import importlib.util
import json
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from simplified_slm.cli.main import build_parser
from simplified_slm.cli.main import main as slm_main
from simplified_slm.training.config import load_experiment_config

GUIDE = REPO / "docs" / "TRAINING_GUIDE.md"
MARKER = re.compile(r"\s+#\s*(tested|checked)\s*$")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def guide_commands() -> list[tuple[int, str, str]]:
    """(line number, command without its marker, marker or None) of every command in ```bash blocks."""
    commands, in_bash = [], False
    for number, line in enumerate(GUIDE.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_bash = stripped == "```bash" if not in_bash else False
            continue
        if not in_bash or not stripped or stripped.startswith("#"):
            continue
        match = MARKER.search(stripped)
        if match:
            commands.append((number, stripped[:match.start()], match.group(1)))
        else:
            commands.append((number, stripped, None))
    return commands


def split_env(command: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(command)
    env = {}
    while words and ENV_ASSIGNMENT.match(words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


def run_command(command: str, cwd: Path, monkeypatch) -> int:
    env, words = split_env(command)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if words[0] == "slm":
        with torch.enable_grad():  # loading a model for eval/generate turns grad off process-wide
            return slm_main(words[1:])
    if words[0] == "python" and words[1].endswith(".py"):
        saved = sys.argv
        sys.argv = words[1:]
        try:
            with torch.enable_grad():
                runpy.run_path(words[1], run_name="__main__")
        except SystemExit as stop:
            return stop.code or 0
        finally:
            sys.argv = saved
        return 0
    return subprocess.run(command, shell=True, cwd=cwd, executable="/bin/bash", timeout=60).returncode


def check_command(command: str) -> None:
    """What a long-running or interactive command can be checked for without running it."""
    _, words = split_env(command)
    tool, args = words[0], words[1:]
    if tool == "make":
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.MULTILINE)
        assert args and all(a in targets for a in args), f"make target {args} not in the Makefile"
    elif tool == "source":
        assert args == [".venv/bin/activate"] and "VENV := .venv" in (REPO / "Makefile").read_text()
    elif tool == "pip":
        assert args[0] == "install"
        for package in args[1:]:
            if package == "-e":
                continue
            if package.startswith(".["):
                extra = package[2:-1]
                assert f"\n{extra} = [" in (REPO / "pyproject.toml").read_text(), f"no [{extra}] extra"
            else:
                assert package in ("wandb", "matplotlib", "tensorboard", "datasets"), package
    elif tool in ("torchrun", "accelerate"):  # launchers: what they start must parse as `slm`
        assert "-m" in args and args[args.index("-m") + 1] == "simplified_slm.cli", args
        check_command(" ".join(["slm", *args[args.index("-m") + 2:]]))
    elif tool == "slm":
        parsed = build_parser().parse_args(args)
        if getattr(parsed, "config", None):
            overrides = list(parsed.overrides)
            if parsed.output_dir:
                overrides.append(f"output_dir={parsed.output_dir}")
            load_experiment_config(REPO / parsed.config, overrides)
    elif tool == "python":
        assert (REPO / args[0]).is_file(), args[0]
    elif tool == "tensorboard":
        assert importlib.util.find_spec("tensorboard") is not None
    else:
        raise AssertionError(f"no check for '{tool}' commands; run it (# tested) or add a check here")


def quoted(pattern: str) -> list[float]:
    """The numbers `pattern`'s groups capture in the guide (prose wraps lines: any run of
    whitespace in the guide matches one space in `pattern`)."""
    text = re.sub(r"\s+", " ", GUIDE.read_text(encoding="utf-8"))
    match = re.search(pattern, text)
    assert match, f"{GUIDE.name} no longer quotes /{pattern}/; update this test with the guide"
    return [float(g) for g in match.groups()]


def check_quoted_figures(eval_report: dict, full_report: dict) -> None:
    """Each BPB the guide quotes equals the one its command produced, within its stated ±."""
    [tolerance] = quoted(r"checks each quoted figure against what they produce, within ±(\d+\.\d+) BPB")
    [first_run] = quoted(r"it ends at a validation BPB of (\d+\.\d+)")
    assert eval_report["metrics"]["bpb"] == pytest.approx(first_run, abs=tolerance)
    paragraph, lower, upper, stream = quoted(r"the per-paragraph BPB came out at (\d+\.\d+) \(95% interval "
                                             r"(\d+\.\d+) to (\d+\.\d+)\) against a stream BPB of (\d+\.\d+)")
    ci, metrics = full_report["bpb_ci95"], full_report["metrics"]
    for got, said in ((ci["bpb"], paragraph), (ci["lower"], lower), (ci["upper"], upper), (metrics["bpb"], stream)):
        assert got == pytest.approx(said, abs=tolerance), (got, said)
    # the guide explains which of the two is lower; that must stay true, not just close
    assert (ci["bpb"] < metrics["bpb"]) == (paragraph < stream), (ci["bpb"], metrics["bpb"])


def test_every_guide_command_is_marked():
    commands = guide_commands()
    unmarked = [f"{GUIDE.name}:{n}: {c}" for n, c, marker in commands if marker is None]
    assert not unmarked, "end these commands with '# tested' or '# checked':\n" + "\n".join(unmarked)
    assert sum(marker == "tested" for _, _, marker in commands) >= 10


@pytest.mark.parametrize("number,command", [(n, c) for n, c, m in guide_commands() if m == "checked"],
                         ids=lambda v: str(v) if isinstance(v, int) else "")
def test_checked_commands_parse(number, command):
    check_command(command)


def test_tested_commands_run(tmp_path, monkeypatch, capsys):
    for name in ("configs", "scripts", "train.py", "generate.py"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; spare the shared CPU (see test_analysis_and_scripts)
    try:
        for number, command, marker in guide_commands():
            if marker != "tested":
                continue
            code = run_command(command, tmp_path, monkeypatch)
            out = capsys.readouterr()
            assert code == 0, f"{GUIDE.name}:{number} failed ({code}): {command}\n{out.err[-2000:]}"
            if command.startswith("slm generate") and "--prompt" in command:
                prompt = shlex.split(command)[shlex.split(command).index("--prompt") + 1]
                assert out.out.startswith(prompt), out.out
    finally:
        torch.set_num_threads(before)

    # what the guide says the commands produce
    run = tmp_path / "runs" / "tiny_test"
    check_quoted_figures(json.loads((run / "eval.json").read_text()), json.loads((run / "report.json").read_text()))
    assert (run / "checkpoints" / "latest").resolve().name == "step_00000040"  # trained longer
    report = json.loads((run / "report.json").read_text())
    assert report["bpb_ci95"]["lower"] <= report["bpb_ci95"]["bpb"] <= report["bpb_ci95"]["upper"]
    for name in ("loss", "bpb", "lr", "grad_norm", "compare_val"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 0
    assert "(paused)" in (run / "plots" / "comparison.md").read_text()
    byte_rows = json.loads((tmp_path / "runs" / "tiny_byte" / "plots" / "comparison.json").read_text())
    assert len(byte_rows) == 2  # the byte run compared with the char run
    assert (tmp_path / "data" / "tinystories_byte" / "meta.json").is_file()
    assert (tmp_path / "runs" / "hooked" / "metrics.csv").read_text().count("act/layer0/mean") >= 1
