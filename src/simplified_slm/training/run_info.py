"""Run provenance (`run.json`) and the lock that keeps two runs out of one folder.

The experiment-tracking spec asks every run to record run_id, git commit, config hash and the hook list, so a
result can always be traced to the code and settings that produced it.
"""

from __future__ import annotations

import fcntl
import os
import platform
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import torch

import simplified_slm
from simplified_slm.errors import SLMError
from simplified_slm.utils.io import atomic_write_json


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def git_commit() -> str | None:
    """Commit of the source tree the package was imported from (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(simplified_slm.__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_run_info(run_dir: Path, run_id: str, cfg: Any, hooks: list[str], model: torch.nn.Module,
                   resumed_from: Path | None, compute_dtype: torch.dtype = torch.float32) -> None:
    """`compute_dtype` is what train.precision resolved to here ("auto" depends on the machine)."""
    info = {
        "run_id": run_id,
        "git_commit": git_commit(),
        "config_hash": cfg.hash(),
        "hook_list": hooks,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "family": model.config.family,
        "num_parameters": model.num_parameters(),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"simplified_slm": simplified_slm.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                 "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "config": cfg.to_dict(),
    }
    atomic_write_json(run_dir / "run.json", info)


class RunLock:
    """An exclusive lock on `<run_dir>/.lock`; the OS drops it if the process dies."""

    def __init__(self, run_dir: Path, resume: bool) -> None:
        self.path = run_dir / ".lock"
        self.resume = resume
        self._fh: Any = None

    def __enter__(self) -> "RunLock":
        try:
            self._fh = open(self.path, "a+")
        except OSError as err:
            raise SLMError(f"cannot write to {self.path.parent}: {err.strerror}; choose a writable output_dir") from None
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise SLMError(f"another run is using {self.path.parent} right now; wait for it to finish "
                           "or choose another output_dir") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"{os.getpid()}\n")
        self._fh.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()
