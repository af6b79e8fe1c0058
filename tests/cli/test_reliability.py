"""Reliability under faults: training survives kills at any moment, damaged and crafted
checkpoints, a second run on the same folder and a failing disk.

The kill soak runs real `slm train` processes and SIGKILLs them at seeded random moments
(some timed right after a checkpoint folder starts being written), resuming with
`--resume auto` each time. To fit 20+ kills in CI, processes are forked from a server that
has already imported torch (the same `simplified_slm.cli.main.main` entry point, one
process per launch, killed with SIGKILL like any other); the `slow` variants also run the
plain `python -m simplified_slm.cli train` command. Run with `-s` to see the tallies.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_experiment
from simplified_slm import SLMError
from simplified_slm.cli.main import main
from simplified_slm.models import CausalLM
from simplified_slm.training import ExperimentConfig, Trainer
from simplified_slm.training import checkpoint as ckpt_mod
from simplified_slm.training.checkpoint import (
    CheckpointManager,
    load_training_files,
    verify_checkpoint,
    write_manifest,
)
from simplified_slm.training.run_info import RunLock
from simplified_slm.utils.io import atomic_write

EVERY = 3  # checkpoint_every of the kill soak: kills often land inside a checkpoint write
TALLY: Counter = Counter()  # printed at the end of the module (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def _print_tally():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # in-process runs: no OpenMP spinning on a busy 2-core machine
    yield
    torch.set_num_threads(threads)
    if TALLY:
        print("\n[reliability] " + ", ".join(f"{k}: {v}" for k, v in sorted(TALLY.items())))


def soak_config(output_dir: Path, **train) -> dict:
    """A few-kB GPT whose steps take ~1 ms, so most of a run is spent writing checkpoints."""
    settings = dict(max_steps=36, checkpoint_every=EVERY, log_every=1, eval_every=10**6, sample_every=10**6,
                    eval_batches=2, sample_tokens=4, keep_checkpoints=2)
    settings.update(train)
    cfg = tiny_experiment(output_dir, **settings)
    cfg["model"].update({"n_layers": 1, "d_model": 16, "n_heads": 2})
    return cfg


def write_config(path: Path, cfg: dict) -> str:
    path.write_text(json.dumps(cfg))
    return str(path)


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "checkpoints" / "latest" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "final model differs from the uninterrupted run"


def step_of(path: Path | None) -> int:
    return int(path.name.split("_")[1]) if path is not None else 0


def leftovers(ckpt_dir: Path) -> list[str]:
    """Temporary names a finished save must not leave behind."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir()
                  if p.name.startswith((".tmp-", ".old-", ".trash-")) or p.name.endswith(".lnk"))


def broken_checkpoints(ckpt_dir: Path) -> list[str]:
    bad = []
    for d in CheckpointManager(ckpt_dir).step_dirs():
        try:
            verify_checkpoint(d)
        except SLMError as err:
            bad.append(str(err))
    return bad


def copy_prepared(src_run: Path, dst_run: Path) -> None:
    """Reuse the tokenizer and token files (prepare_dataset finds the same fingerprint)."""
    dst_run.mkdir(parents=True)
    for name in ("tokenizer", "data"):
        shutil.copytree(src_run / name, dst_run / name)


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def the_error_line(output: str) -> str:
    """The one `error:` line of a process whose stdout and stderr were mixed."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, output
    return lines[0]


# ------------------------------------------------------------------------ launchers
FORKSERVER = r'''
import json, os, resource, signal, sys, traceback
import torch
torch.set_num_threads(1)
import torch._dynamo  # noqa: F401  (AdamW's constructor imports it: pay once, here)
import simplified_slm.training.trainer  # noqa: F401
from simplified_slm.cli.main import main

def reply(**fields):
    print(json.dumps(fields), flush=True)


for line in sys.stdin:
    req = json.loads(line)
    if req["cmd"] == "poll":  # exited? (WNOWAIT: not reaped, so the pid cannot be reused yet)
        reply(done=os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None)
        continue
    if req["cmd"] == "wait":
        reply(exit=os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        continue
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            sys.stdout.reconfigure(line_buffering=True)
            if req.get("fsize"):  # a real kernel write failure (EFBIG) past this many bytes
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
            code = main(req["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    reply(pid=pid)
'''


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


class ForkServer:
    """Forks one `slm` process per launch from a server that imported torch once.

    The server reaps a child only when asked to (`wait`), so until then its pid cannot be
    reused and signalling it can never hit another process."""

    def __init__(self, workdir: Path) -> None:
        self.errlog = workdir / "forkserver.err"
        self.proc = subprocess.Popen([sys.executable, "-c", FORKSERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(self.errlog, "wb"), env=child_env())
        self.fd = self.proc.stdout.fileno()
        self.buf = b""

    def _line(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left < 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 4096)
                if not chunk:
                    raise RuntimeError("fork server died:\n" + self.errlog.read_text())
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def ask(self, timeout: float = 60, **request) -> dict | None:
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        return self._line(timeout)

    def launch(self, argv: list[str], log: Path, fsize: int | None = None) -> "Forked":
        reply = self.ask(cmd="launch", argv=argv, log=str(log), fsize=fsize)
        assert reply is not None, "fork server did not answer"
        return Forked(self, reply["pid"], log)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Forked:
    def __init__(self, server: ForkServer, pid: int, log: Path) -> None:
        self.server, self.pid, self.log, self.code = server, pid, log, None

    def poll(self) -> int | None:
        if self.code is None and self.server.ask(cmd="poll")["done"]:
            return self.wait()
        return self.code

    def wait(self, timeout: float = 180) -> int:
        if self.code is None:
            reply = self.server.ask(timeout, cmd="wait")
            if reply is None:  # hung: the server is still waiting for it, so the pid is ours
                os.kill(self.pid, signal.SIGKILL)
                self.code = self.server._line(60)["exit"]
                raise AssertionError(f"process {self.pid} hung:\n{self.output()}")
            self.code = reply["exit"]
        return self.code

    def send(self, sig: int) -> None:
        if self.code is None:  # not reaped yet: alive or a zombie, never a reused pid
            os.kill(self.pid, sig)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Spawned:
    """A plain `python -m simplified_slm.cli ...` process."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "simplified_slm.cli", *argv], env=child_env(),
                                         stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float = 180) -> int:
        return self.proc.wait(timeout=timeout)

    def send(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class SpawnLauncher:
    def launch(self, argv: list[str], log: Path) -> Spawned:
        return Spawned(argv, log)


@pytest.fixture(scope="module")
def forkserver(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("forkserver"))
    yield server
    server.close()


# ------------------------------------------------------------------------ kill soak
def _wait_or_exit(proc, seconds: float) -> int | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return proc.poll()
        time.sleep(0.002)
    return proc.poll()


def _wait_for_checkpoint_write(ckpt_dir: Path, proc, nth: int, timeout: float = 120) -> int | None:
    """Return once this process has started its `nth` checkpoint folder (or has exited)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.update(e.name for e in os.scandir(ckpt_dir)
                        if e.name.startswith(".tmp-step_") and e.name.endswith(f"-{proc.pid}"))
        except FileNotFoundError:
            pass
        if len(seen) >= nth:
            return None
        if proc.poll() is not None:
            return proc.poll()
        time.sleep(0.0005)
    raise AssertionError("no checkpoint write started")


def _new_logged_steps(metrics: Path, offset: int) -> list[int]:
    if not metrics.exists():
        return []
    with open(metrics, "rb") as fh:
        fh.seek(offset)
        data = fh.read().decode("utf-8", errors="replace")
    steps = []
    for line in data.split("\n")[:-1]:  # only complete lines
        parts = line.split(",")
        if len(parts) == 4 and parts[1] == "train/loss" and parts[0].isdigit():
            steps.append(int(parts[0]))
    return steps


def kill_soak(launcher, tmp: Path, kills_wanted: int, seed: int, inside_write_wanted: int = 0) -> Counter:
    """SIGKILL training runs at random moments until `kills_wanted` kills, resuming each
    time; every run that completes must equal the uninterrupted reference bit for bit.

    Whether a kill aimed at a checkpoint write lands inside it depends on the machine's
    load, so after `kills_wanted` kills it goes on aiming only at writes (up to 3x the
    kills) until `inside_write_wanted` of them have.
    """
    rng = random.Random(seed)
    ref = tmp / "reference"
    started = time.monotonic()
    proc = launcher.launch(["train", "--config", write_config(tmp / "reference.json", soak_config(ref))],
                           tmp / "reference.log")
    assert proc.wait() == 0, proc.output()
    full_run_s = time.monotonic() - started
    reference = weights(ref)
    stats: Counter = Counter({"checkpoints lost": 0, "checkpoints unreadable": 0})

    def more_kills() -> bool:
        if stats["kills"] < kills_wanted:
            return True
        return stats["kills inside a checkpoint write"] < inside_write_wanted and stats["kills"] < 3 * kills_wanted

    episode = 0
    while more_kills():
        run = tmp / f"run{episode}"
        copy_prepared(ref, run)
        cfg = write_config(tmp / f"run{episode}.json", soak_config(run))
        ckpt_dir, metrics = run / "checkpoints", run / "metrics.csv"
        newest = 0  # newest intact checkpoint step seen so far in this run
        launches = 0
        while True:
            launches += 1
            offset = metrics.stat().st_size if metrics.exists() else 0
            launched = time.monotonic()
            proc = launcher.launch(["train", "--config", cfg, "--resume", "auto"],
                                   tmp / f"run{episode}-{launches}.log")
            code = None
            aimed = more_kills() and launches <= 40
            if aimed:
                at_write = stats["kills"] >= kills_wanted or rng.random() < 0.4
                if at_write:  # right after a checkpoint folder appears: a write in progress
                    code = _wait_for_checkpoint_write(ckpt_dir, proc, nth=rng.randint(1, 3))
                    if code is None:
                        code = _wait_or_exit(proc, rng.uniform(0.0, 0.03))
                else:  # any moment: start-up, resume, a step, a write, the final eval
                    code = _wait_or_exit(proc, rng.uniform(0.0, 0.9 * full_run_s))
                if code is None:
                    proc.send(signal.SIGKILL)
            code = proc.wait()
            out = proc.output()
            assert "Traceback" not in out, out
            if code == -signal.SIGKILL:
                stats["kills"] += 1
                if any(p.name.endswith(f"-{proc.pid}") for p in ckpt_dir.glob(".tmp-step_*")):
                    stats["kills inside a checkpoint write"] += 1
            else:
                assert code == 0, out
                stats["launches that finished before their kill"] += aimed
                if newest == 0:  # a whole run without data preparation: calibrates the delays
                    full_run_s = min(full_run_s, time.monotonic() - launched)
            # every checkpoint folder on disk is complete and verifies
            broken = broken_checkpoints(ckpt_dir)
            stats["checkpoints unreadable"] += len(broken)
            assert not broken, broken
            intact = step_of(CheckpointManager(ckpt_dir, say=lambda m: None).latest_intact())
            if intact < newest:
                stats["checkpoints lost"] += 1
            assert intact >= newest, f"newest intact checkpoint went back from {newest} to {intact}"
            said = re.search(r"resumed from \S+ at step (\d+)", out)
            if said:
                assert int(said.group(1)) == newest, out  # --resume auto took the newest intact one
            last_logged = max([newest, *_new_logged_steps(metrics, offset)])
            redo = last_logged - intact  # steps the next launch must repeat
            stats["most steps repeated after a kill"] = max(stats["most steps repeated after a kill"], redo)
            assert redo <= EVERY, f"killed at step {last_logged} but the newest checkpoint is {intact}"
            newest = intact
            if code == 0:
                break
        assert_same_weights(weights(run), reference)
        assert not leftovers(ckpt_dir), leftovers(ckpt_dir)
        stats["runs killed then completed bit-exact"] += launches > 1
        stats["launches"] += launches
        episode += 1
    return stats


def _report(name: str, stats: Counter) -> None:
    for key, value in stats.items():
        TALLY[f"{name} {key}"] = value


def test_sigkill_at_random_moments_never_loses_a_checkpoint(forkserver, tmp_path):
    stats = kill_soak(forkserver, tmp_path, kills_wanted=20, seed=20240611, inside_write_wanted=3)
    _report("kill soak (CI):", stats)
    assert stats["kills"] >= 20 and stats["checkpoints lost"] == 0 and stats["checkpoints unreadable"] == 0
    assert stats["kills inside a checkpoint write"] >= 3


@pytest.mark.slow
def test_sigkill_soak_200_kills(forkserver, tmp_path):
    stats = kill_soak(forkserver, tmp_path, kills_wanted=200, seed=7)
    _report("kill soak (200):", stats)
    assert stats["checkpoints lost"] == 0 and stats["checkpoints unreadable"] == 0


@pytest.mark.slow
def test_sigkill_soak_plain_cli_processes(tmp_path):
    stats = kill_soak(SpawnLauncher(), tmp_path, kills_wanted=40, seed=11)
    _report("kill soak (python -m, 40):", stats)
    assert stats["checkpoints lost"] == 0 and stats["checkpoints unreadable"] == 0


# ------------------------------------------- death at every file operation of a save
_FILE_OPS = ("rename", "replace", "symlink", "fsync", "mkdir", "unlink", "rmdir")


def _writer(tag: bytes):
    def write(directory: Path) -> None:
        (directory / "weights.bin").write_bytes(tag * 100)
        atomic_write(directory / "state.json", lambda tmp: tmp.write_bytes(b'{"tag": "%s"}' % tag))
    return write


def _run_dying_at(root: Path, action, die_at: int | None) -> int:
    """Run `action(manager)` in a forked child that dies (os._exit) right before its
    `die_at`-th file operation, like a SIGKILL landing there; returns the op count."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        status = 0
        try:
            os.close(read_fd)
            count = [0]
            for name in _FILE_OPS:
                real = getattr(os, name)

                def op(*args, _real=real, **kwargs):
                    if count[0] == die_at:
                        os._exit(137)
                    count[0] += 1
                    return _real(*args, **kwargs)
                setattr(os, name, op)
            action(CheckpointManager(root, keep=2, say=lambda m: None))
            os.write(write_fd, str(count[0]).encode())
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_fd) as fh:
        reported = fh.read()
    code = os.waitstatus_to_exitcode(status)
    if die_at is None:
        assert code == 0 and reported, "the save failed without a fault"
        return int(reported)
    assert code == 137, f"child exited {code} instead of dying at op {die_at}"
    return die_at


@pytest.mark.parametrize("scenario", ["new step", "new best step", "re-save an existing step"])
def test_death_at_every_file_operation_of_a_save_loses_nothing(tmp_path, scenario):
    base = tmp_path / "base"
    manager = CheckpointManager(base, keep=2, say=lambda m: None)
    manager.save(1, _writer(b"one"), best=True)
    manager.save(2, _writer(b"two"))
    action = {
        "new step": lambda m: m.save(3, _writer(b"three")),
        "new best step": lambda m: m.save(3, _writer(b"three"), best=True),
        "re-save an existing step": lambda m: m.save(2, _writer(b"TWO")),
    }[scenario]
    clean = tmp_path / "clean"
    shutil.copytree(base, clean, symlinks=True)
    ops = _run_dying_at(clean, action, None)
    assert ops > 10
    for k in range(ops):
        root = tmp_path / f"die{k}"
        shutil.copytree(base, root, symlinks=True)
        _run_dying_at(root, action, k)
        newest = CheckpointManager(root, say=lambda m: None).repair_links()  # what a resume does first
        assert newest is not None and step_of(newest) >= 2, f"died at op {k}: lost the newest checkpoint"
        assert not broken_checkpoints(root), f"died at op {k}: {broken_checkpoints(root)}"
        # the links name what the dead process meant them to, even if it died before swapping them
        assert (root / "latest").resolve() == newest.resolve(), f"died at op {k}: stale latest link"
        best = 3 if scenario == "new best step" and step_of(newest) == 3 else 1
        assert (root / "best").resolve().name == f"step_{best:08d}", f"died at op {k}: stale best link"
        # the next save, by another process, cleans up whatever the dead one left
        _run_dying_at(root, action, None)
        assert not leftovers(root), f"died at op {k}: left {leftovers(root)}"
        assert not broken_checkpoints(root)
        TALLY["save crash points tried"] += 1


# ------------------------------------------------------------ damaged checkpoints
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted in-process run with checkpoints at steps 4, 8 and 12."""
    run = tmp_path_factory.mktemp("trained") / "run"
    cfg = soak_config(run, max_steps=12, checkpoint_every=4, keep_checkpoints=3)
    Trainer(ExperimentConfig.from_dict(cfg), say=lambda m: None).run()
    return run


def clone_run(trained: Path, dst: Path, **train) -> tuple[Path, str]:
    """A copy of the trained run (checkpoints included) and a config file pointing at it."""
    shutil.copytree(trained, dst, symlinks=True)
    cfg = soak_config(dst, max_steps=12, checkpoint_every=4, keep_checkpoints=3, **train)
    return dst, write_config(dst.parent / f"{dst.name}.json", cfg)


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_bit(path: Path, seed: int = 0) -> None:
    data = bytearray(path.read_bytes())
    position = random.Random(seed).randrange(len(data))
    data[position] ^= 1 << random.Random(seed + 1).randrange(8)
    path.write_bytes(bytes(data))


CHECKPOINT_FILES = ["config.json", "model.safetensors", "optimizer.pt", "rng.safetensors", "tokenizer_config.json",
                    "tokenizer_identity.json",
                    "trainer_state.json", "vocab.json"]
DIFFERING_FILES = ["model.safetensors", "optimizer.pt", "rng.safetensors", "trainer_state.json"]


def test_checkpoint_files_are_as_expected(trained):
    names = sorted(p.name for p in ckpt(trained, 8).iterdir())
    assert names == sorted([*CHECKPOINT_FILES, "manifest.json"])
    for step in (4, 8, 12):
        verify_checkpoint(ckpt(trained, step))


@pytest.mark.parametrize("fault", ["truncated", "bit-flipped", "deleted"])
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_verify_names_a_damaged_file(trained, tmp_path, fault, name):
    run, _ = clone_run(trained, tmp_path / "run")
    path = ckpt(run, 8) / name
    {"truncated": truncate, "bit-flipped": flip_bit, "deleted": Path.unlink}[fault](path)
    with pytest.raises(SLMError, match=re.escape(name)) as err:
        verify_checkpoint(ckpt(run, 8))
    assert "\n" not in str(err.value)
    TALLY[f"checkpoint files {fault} (all detected)"] += 1


@pytest.mark.parametrize("name", DIFFERING_FILES)
def test_verify_names_a_file_mixed_up_from_another_checkpoint(trained, tmp_path, name):
    run, _ = clone_run(trained, tmp_path / "run")
    other = (ckpt(run, 4) / name).read_bytes()
    assert other != (ckpt(run, 8) / name).read_bytes()
    (ckpt(run, 8) / name).write_bytes(other)
    with pytest.raises(SLMError, match=re.escape(name) + ".*(SHA-256|bytes)"):
        verify_checkpoint(ckpt(run, 8))
    TALLY["checkpoint files mixed up (all detected)"] += 1


@pytest.mark.parametrize("damage", ["truncated", "deleted", "not JSON", "list", "entry not a mapping",
                                    "path outside the folder", "NUL in a name", "size is text"])
def test_verify_refuses_a_damaged_manifest(trained, tmp_path, damage):
    run, _ = clone_run(trained, tmp_path / "run")
    manifest = ckpt(run, 8) / "manifest.json"
    files = json.loads(manifest.read_text())["files"]
    content = {
        "truncated": manifest.read_text()[:40],
        "not JSON": "\x00\xff garbage",
        "list": json.dumps([1, 2]),
        "entry not a mapping": json.dumps({"files": {"model.safetensors": "abc"}}),
        "path outside the folder": json.dumps({"files": {"../../etc/passwd": files["config.json"]}}),
        "NUL in a name": json.dumps({"files": {"a\x00b": files["config.json"]}}),
        "size is text": json.dumps({"files": {"config.json": {**files["config.json"], "size": "233"}}}),
    }.get(damage)
    if damage == "deleted":
        manifest.unlink()
    else:
        manifest.write_text(content)
    with pytest.raises(SLMError, match="manifest.json") as err:
        verify_checkpoint(ckpt(run, 8))
    assert "\n" not in str(err.value)


def test_resume_auto_falls_back_past_a_corrupt_checkpoint_and_ends_the_same(trained, tmp_path, capsys):
    run, cfg = clone_run(trained, tmp_path / "run")
    flip_bit(ckpt(run, 12) / "model.safetensors")
    truncate(ckpt(run, 8) / "optimizer.pt")  # the two newest are both damaged
    assert main(["train", "--config", cfg, "--resume", "auto"]) == 0
    said = capsys.readouterr()
    text = said.out + said.err
    assert re.search(r"warning: skipping checkpoint step_00000012: .*model\.safetensors", text), text
    assert re.search(r"warning: skipping checkpoint step_00000008: .*optimizer\.pt", text), text
    assert "resumed from" in text and "step_00000004 at step 4" in text
    assert "Traceback" not in text
    assert_same_weights(weights(run), weights(trained))  # replayed 5..12 exactly
    assert not broken_checkpoints(run / "checkpoints") and not leftovers(run / "checkpoints")
    TALLY["resumes past corrupt checkpoints (bit-exact)"] += 1


def test_resuming_a_finished_run_rewrites_its_last_checkpoint_safely(trained, tmp_path):
    """`--resume auto` on a finished run re-saves the final step over the existing folder
    (trainer.py saves whenever the loop wrote no checkpoint); that replace must be atomic,
    which the death-at-every-operation test above checks op by op."""
    run, cfg = clone_run(trained, tmp_path / "run")
    assert main(["train", "--config", cfg, "--resume", "auto"]) == 0
    assert_same_weights(weights(run), weights(trained))
    assert not broken_checkpoints(run / "checkpoints") and not leftovers(run / "checkpoints")


def test_fallback_warning_goes_to_stderr(trained, tmp_path, capsys):
    run, cfg = clone_run(trained, tmp_path / "run")
    flip_bit(ckpt(run, 12) / "model.safetensors")
    assert main(["train", "--config", cfg, "--resume", "auto"]) == 0
    assert "warning: skipping checkpoint step_00000012" in capsys.readouterr().err


@pytest.mark.parametrize("fault", ["bit-flipped", "truncated", "no manifest", "missing"])
def test_resume_from_an_explicit_corrupt_path_refuses_in_one_line(trained, tmp_path, capsys, fault):
    run, cfg = clone_run(trained, tmp_path / "run")
    target = ckpt(run, 8)
    if fault == "bit-flipped":
        flip_bit(target / "rng.safetensors")
    elif fault == "truncated":
        truncate(target / "model.safetensors")
    elif fault == "no manifest":
        (target / "manifest.json").unlink()
    else:
        target = run / "checkpoints" / "step_99999999"
    before = (run / "metrics.csv").read_bytes()
    assert main(["train", "--config", cfg, "--resume", str(target)]) == 2
    line = one_error_line(capsys.readouterr().err)
    expected = {"bit-flipped": "rng.safetensors", "truncated": "model.safetensors",
                "no manifest": "manifest.json", "missing": "does not exist"}[fault]
    assert expected in line
    assert (run / "metrics.csv").read_bytes() == before  # nothing was trained
    assert step_of(CheckpointManager(run / "checkpoints").latest_intact()) == 12


# -------------------------------------------------------------- untrusted files
class _RunsACommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _craft(run: Path, step: int, name: str, write) -> Path:
    """Replace a checkpoint file and regenerate the manifest, as an attacker would."""
    target = ckpt(run, step)
    write(target / name)
    write_manifest(target)
    verify_checkpoint(target)  # the manifest cannot tell: the loader must refuse it
    return target


@pytest.mark.parametrize("how", ["explicit path", "auto"])
def test_malicious_pickle_in_a_checkpoint_is_refused_and_never_runs(trained, tmp_path, capsys, how):
    run, cfg = clone_run(trained, tmp_path / "run")
    marker = tmp_path / "pwned"
    payload = {"state": {0: {"step": torch.tensor(1.0), "hook": _RunsACommand(f"touch {marker}")}},
               "param_groups": []}
    target = _craft(run, 12, "optimizer.pt", lambda p: torch.save(payload, p))
    assert main(["train", "--config", cfg, "--resume", str(target) if how == "explicit path" else "auto"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "optimizer.pt" in line and "refusing" in line and "system" in line
    assert not marker.exists(), "the pickle's command ran"
    TALLY["crafted checkpoint files refused"] += 1


@pytest.mark.parametrize("name,content", [
    ("optimizer.pt", b"not a torch file at all"),
    ("optimizer.pt", "tensor list"),
    ("trainer_state.json", b"{not json"),
    ("trainer_state.json", b"[1, 2, 3]"),
    ("trainer_state.json", b'{"step": "twelve", "best_val_loss": 1.0, "run_id": "x", "rng": {}}'),
    ("trainer_state.json", "no rng"),
    ("trainer_state.json", "garbage rng"),
    ("rng.safetensors", "wrong dtype"),
    ("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "),
])
def test_crafted_checkpoint_files_are_refused_in_one_line(trained, tmp_path, capsys, name, content):
    from safetensors.torch import save_file

    run, cfg = clone_run(trained, tmp_path / "run")
    state = json.loads((ckpt(run, 12) / "trainer_state.json").read_text())

    def write(path: Path) -> None:
        if content == "tensor list":
            torch.save([torch.zeros(3)], path)
        elif content == "no rng":
            path.write_text(json.dumps({k: v for k, v in state.items() if k != "rng"}))
        elif content == "garbage rng":
            path.write_text(json.dumps({**state, "rng": {"python": [3, "x"], "numpy": 5}}))
        elif content == "wrong dtype":
            save_file({"torch_cpu": torch.zeros(4)}, str(path))
        else:
            path.write_bytes(content)
    target = _craft(run, 12, name, write)
    assert main(["train", "--config", cfg, "--resume", str(target)]) == 2
    assert name in one_error_line(capsys.readouterr().err)
    TALLY["crafted checkpoint files refused"] += 1


def test_manifest_must_cover_the_files_resume_reads(trained, tmp_path, capsys):
    run, cfg = clone_run(trained, tmp_path / "run")
    target = ckpt(run, 12)
    manifest = json.loads((target / "manifest.json").read_text())
    del manifest["files"]["optimizer.pt"]  # an unlisted file could be swapped in unnoticed
    (target / "manifest.json").write_text(json.dumps(manifest))
    assert main(["train", "--config", cfg, "--resume", str(target)]) == 2
    assert "optimizer.pt is not covered" in one_error_line(capsys.readouterr().err)


_UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}
_UNSAFE_ATTRS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("marshal", "load"),
                 ("marshal", "loads"), ("shelve", "open"), ("dill", "load"), ("dill", "loads"),
                 ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("yaml", "load_all"),
                 ("os", "system"), ("os", "popen")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _unsafe_uses(path: Path, root: Path) -> tuple[list[str], int]:
    """Problems found in one source file, and how many torch.load calls it makes."""
    problems, torch_loads = [], 0
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "marshal", "shelve", "dill"):
            problems.append(f"{where}: from {node.module} import ...")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if name in _UNSAFE_CALLS:
            problems.append(f"{where}: {name}(")
        if tuple(name.rsplit(".", 1)[-2:]) in _UNSAFE_ATTRS and "." in name:
            problems.append(f"{where}: {name}(")
        if name == "torch.load":
            torch_loads += 1
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append(f"{where}: torch.load without weights_only=True")
        if name in ("np.load", "numpy.load"):
            flag = keywords.get("allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                problems.append(f"{where}: np.load(allow_pickle=...)")
        shell = keywords.get("shell")
        if name.startswith("subprocess.") and shell is not None and not (
                isinstance(shell, ast.Constant) and shell.value is False):
            problems.append(f"{where}: subprocess with shell=True")
    return problems, torch_loads


def test_source_never_unpickles_or_executes_user_files():
    """Every torch.load passes weights_only=True; no eval/exec/pickle/unsafe yaml; no
    np.load(allow_pickle=True); no shell=True: in the package, the scripts and the root
    train.py/generate.py."""
    sources = sorted(REPO.glob("src/**/*.py")) + sorted(REPO.glob("scripts/**/*.py"))
    sources += [REPO / "train.py", REPO / "generate.py"]  # the original reference's entry points users run
    assert all(p.is_file() for p in sources)
    assert {p.relative_to(REPO).parts[0] for p in sources} == {"src", "scripts", "train.py", "generate.py"}
    problems, torch_loads = [], 0
    for path in sources:
        found, loads = _unsafe_uses(path, REPO)
        problems += found
        torch_loads += loads
    assert not problems, problems
    assert torch_loads >= 1  # the scan does see the optimizer load


def test_the_source_scan_flags_what_it_should(tmp_path):
    script = tmp_path / "scripts" / "bad.py"
    script.parent.mkdir()
    script.write_text("import pickle, subprocess, torch, yaml\n"
                      "eval(open('cfg').read())\n"
                      "pickle.loads(b'')\n"
                      "torch.load('x.pt')\n"
                      "yaml.load(open('c.yaml'))\n"
                      "subprocess.run('ls', shell=True)\n"
                      "torch.load('y.pt', weights_only=True)\n")
    problems, loads = _unsafe_uses(script, tmp_path)
    assert loads == 2
    assert [p.split(": ", 1)[1] for p in problems] == [
        "eval(", "pickle.loads(", "torch.load without weights_only=True", "yaml.load(", "subprocess with shell=True"]
    assert all(p.startswith("scripts/bad.py:") for p in problems)


# ---------------------------------------------------------- concurrency and disks
def _wait_for_training(run: Path, proc, steps: int = 3, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(_new_logged_steps(run / "metrics.csv", 0)) >= steps:
            return
        assert proc.poll() is None, proc.output()
        time.sleep(0.02)
    raise AssertionError("training did not start")


def test_second_run_on_the_same_folder_is_refused(forkserver, trained, tmp_path, capsys):
    run = tmp_path / "run"
    copy_prepared(trained, run)
    cfg = write_config(tmp_path / "long.json", soak_config(run, max_steps=100_000, checkpoint_every=50))
    first = forkserver.launch(["train", "--config", cfg], tmp_path / "first.log")
    try:
        _wait_for_training(run, first)
        run_json = (run / "run.json").read_bytes()
        for extra in ([], ["--resume", "auto"]):
            assert main(["train", "--config", cfg, *extra]) == 2
            line = one_error_line(capsys.readouterr().err)
            assert "another run is using" in line and str(run) in line
        assert first.poll() is None, "the first run was disturbed"
        assert (run / "run.json").read_bytes() == run_json
    finally:
        first.send(signal.SIGTERM)
    assert first.wait() == 130, first.output()
    assert not broken_checkpoints(run / "checkpoints") and CheckpointManager(run / "checkpoints").latest_intact()
    with RunLock(run, resume=True):  # the OS dropped the first run's lock when it exited
        pass
    TALLY["concurrent runs refused"] += 2


def _enospc_at_second_checkpoint(monkeypatch, how: str) -> None:
    err = OSError(28, "No space left on device")
    if how == "safetensors.save_file":
        calls = []
        real = ckpt_mod.save_file

        def save_file(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise err
            return real(*args, **kwargs)
        monkeypatch.setattr(ckpt_mod, "save_file", save_file)
    else:
        real_fsync = os.fsync

        def fsync(fd):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if ".tmp-step_00000008" in target:
                raise err
            return real_fsync(fd)
        monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("how", ["safetensors.save_file", "os.fsync"])
def test_disk_full_while_checkpointing_fails_cleanly_and_resumes(trained, tmp_path, capsys, monkeypatch, how):
    run = tmp_path / "run"
    copy_prepared(trained, run)
    cfg = write_config(tmp_path / "cfg.json", soak_config(run, max_steps=12, checkpoint_every=4,
                                                          keep_checkpoints=3))
    _enospc_at_second_checkpoint(monkeypatch, how)
    assert main(["train", "--config", cfg]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "step_00000008" in line
    monkeypatch.undo()
    ckpts = run / "checkpoints"
    assert not leftovers(ckpts) and not broken_checkpoints(ckpts)
    assert [p.name for p in CheckpointManager(ckpts).step_dirs()] == ["step_00000004"]
    assert (ckpts / "latest").resolve().name == "step_00000004"
    model = CausalLM.from_pretrained(ckpts / "latest")  # loadable as a model ...
    assert load_training_files(ckpts / "latest", model, None)["step"] == 4  # ... and for resuming
    assert main(["train", "--config", cfg, "--resume", "auto"]) == 0  # space is back: carry on
    assert_same_weights(weights(run), weights(trained))
    TALLY["disk-full faults survived (bit-exact after resume)"] += 1


@pytest.mark.parametrize("target", ["model.safetensors", "optimizer.pt"])
def test_real_write_failure_from_the_kernel_is_one_line(forkserver, trained, tmp_path, target):
    """RLIMIT_FSIZE makes the kernel fail writes past a size (EFBIG), with the real
    exception types safetensors and torch.save raise for a failed write."""
    run = tmp_path / "run"
    copy_prepared(trained, run)
    cfg = write_config(tmp_path / "cfg.json", soak_config(run, max_steps=12, checkpoint_every=4,
                                                          keep_checkpoints=3))
    assert forkserver.launch(["train", "--config", cfg, "--until", "4"], tmp_path / "a.log").wait() == 0
    sizes = {p.name: p.stat().st_size for p in ckpt(run, 4).iterdir()}
    limit = sizes[target] - 1
    others = [n for n, s in sizes.items() if s > limit and n not in ("model.safetensors", "optimizer.pt")]
    assert not others and sizes["model.safetensors"] < sizes["optimizer.pt"]
    proc = forkserver.launch(["train", "--config", cfg, "--resume", "auto"], tmp_path / "b.log", fsize=limit)
    code, out = proc.wait(), proc.output()
    assert code == 2, out
    line = the_error_line(out)
    assert "could not write checkpoint step_00000008" in line and "MiB free" in line
    ckpts = run / "checkpoints"
    assert not leftovers(ckpts) and not broken_checkpoints(ckpts)
    assert step_of(CheckpointManager(ckpts).latest_intact()) == 4
    assert forkserver.launch(["train", "--config", cfg, "--resume", "auto"], tmp_path / "c.log").wait() == 0
    TALLY["kernel write failures survived"] += 1


@pytest.mark.slow
def test_real_full_filesystem(forkserver, trained, tmp_path):
    """A real ENOSPC: checkpoints on a tmpfs that holds one checkpoint and a half."""
    run = tmp_path / "run"
    copy_prepared(trained, run)
    cfg = write_config(tmp_path / "cfg.json", soak_config(run, max_steps=12, checkpoint_every=4,
                                                          keep_checkpoints=3))
    size = sum(p.stat().st_size for p in ckpt(trained, 4).iterdir())
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.6) // 4096 * 4096 + 8192}", "tmpfs",
                       str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        (run / "checkpoints").symlink_to(mnt)
        assert forkserver.launch(["train", "--config", cfg], tmp_path / "a.log").wait() == 2
        line = the_error_line((tmp_path / "a.log").read_text())
        # torch.save reports ENOSPC only as "unexpected pos ...": the free space says why
        assert "could not write checkpoint step_00000008" in line and "MiB free" in line
        print("\n[reliability] real ENOSPC:", line)
        assert not leftovers(mnt) and not broken_checkpoints(mnt)
        assert step_of(CheckpointManager(mnt).latest_intact()) == 4
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _read_only(monkeypatch, folder: Path) -> None:
    """As root, chmod does not stop writes: refuse them the way a read-only folder would."""
    import builtins
    import io

    folder = str(folder)

    def inside(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(folder + os.sep)

    def denied(path):
        return PermissionError(13, "Permission denied", os.fspath(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def open_(file, mode="r", *args, **kwargs):
        if inside(file) and any(c in mode for c in "wax+"):
            raise denied(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise denied(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if inside(path):
            raise denied(path)
        return real_mkdir(path, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)


def test_unwritable_output_folder_is_a_one_line_error(trained, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    copy_prepared(trained, run)
    cfg = write_config(tmp_path / "cfg.json", soak_config(run, max_steps=4))
    if os.geteuid() == 0:
        _read_only(monkeypatch, run)
    else:
        run.chmod(0o500)
    try:
        code = main(["train", "--config", cfg])
    finally:
        run.chmod(0o755)
    assert code == 2
    assert "Permission denied" in one_error_line(capsys.readouterr().err)


def _unwritable_from_the_second_checkpoint(monkeypatch, ckpts: Path, how: str) -> None:
    """`folder`: the checkpoint folder turns read-only once the first checkpoint is written
    (chmod, or refused writes as root, whom chmod does not stop); `mid-save`: the write of
    the second checkpoint's optimizer file is refused after its weights were written."""
    if how == "mid-save":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if ".tmp-step_00000008" in os.fspath(f):
                raise PermissionError(13, "Permission denied", os.fspath(f))
            return real_save(obj, f, *args, **kwargs)
        monkeypatch.setattr(torch, "save", save)
        return
    real = CheckpointManager.save

    def save_then_lock(self, step, *args, **kwargs):
        path = real(self, step, *args, **kwargs)
        if step == 4:
            if os.geteuid() == 0:
                _read_only(monkeypatch, ckpts)
            else:
                ckpts.chmod(0o500)
        return path
    monkeypatch.setattr(CheckpointManager, "save", save_then_lock)


@pytest.mark.parametrize("how", ["folder", "mid-save"])
def test_folder_unwritable_during_training_fails_loudly_and_keeps_the_last_checkpoint(
        trained, tmp_path, capsys, monkeypatch, how):
    run = tmp_path / "run"
    copy_prepared(trained, run)
    cfg = write_config(tmp_path / "cfg.json", soak_config(run, max_steps=12, checkpoint_every=4,
                                                          keep_checkpoints=3))
    ckpts = run / "checkpoints"
    _unwritable_from_the_second_checkpoint(monkeypatch, ckpts, how)
    try:
        code = main(["train", "--config", cfg])
    finally:
        monkeypatch.undo()
        if ckpts.exists():
            ckpts.chmod(0o755)
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "could not write checkpoint step_00000008" in line and "Permission denied" in line, line
    assert "the checkpoints already there are intact" in line
    assert not leftovers(ckpts) and not broken_checkpoints(ckpts)
    assert [p.name for p in CheckpointManager(ckpts).step_dirs()] == ["step_00000004"]
    assert (ckpts / "latest").resolve().name == "step_00000004"
    verify_checkpoint(ckpts / "latest")
    model = CausalLM.from_pretrained(ckpts / "latest")
    assert load_training_files(ckpts / "latest", model, None)["step"] == 4
    assert main(["train", "--config", cfg, "--resume", "auto"]) == 0  # writable again: carry on
    assert_same_weights(weights(run), weights(trained))
    TALLY["unwritable-folder faults survived (bit-exact after resume)"] += 1
