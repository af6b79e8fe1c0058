"""Checkpoints that survive being killed at any moment and resume the exact trajectory.

A checkpoint is a folder `checkpoints/step_XXXXXXXX/` holding the model (config.json +
model.safetensors, loadable by `from_pretrained`), tokenizer files, the optimizer state,
the RNG states and `trainer_state.json`, plus `manifest.json` with every file's size and
SHA-256. It is written under a temporary name and renamed into place (atomic), and the
`latest` / `best` symlinks are swapped atomically, so a reader sees an old complete
checkpoint or a new complete one, never half of one. Nothing is unpickled: tensors go
through safetensors and `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from simplified_slm.errors import SLMError
from simplified_slm.utils.io import atomic_write_json, fsync_dir, sha256_file

MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.safetensors"
STEP_DIR = re.compile(r"^step_(\d{8})$")


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """JSON-able python/numpy RNG states and the torch RNG states as tensors."""
    np_state = np.random.get_state()
    json_state = {"python": _listify(random.getstate()),
                  "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    return json_state, tensors


def restore_rng(json_state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    random.setstate(_tuplify(json_state["python"]))
    kind, keys, *rest = json_state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _listify(value: Any) -> Any:
    return [_listify(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    atomic_write_json(directory / MANIFEST, {"files": manifest})


def verify_checkpoint(directory: str | Path) -> None:
    """Raise SLMError naming the first missing, truncated or altered file."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise SLMError(f"checkpoint {directory} has no {MANIFEST}; it is incomplete or not a checkpoint")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise SLMError(f"{manifest_path} is corrupt; the checkpoint cannot be trusted") from None
    for name, info in files.items():
        path = directory / name
        if not path.is_file():
            raise SLMError(f"checkpoint file {path} is missing")
        if path.stat().st_size != info["size"]:
            raise SLMError(f"checkpoint file {path} has {path.stat().st_size} bytes, expected {info['size']} "
                           "(truncated or replaced)")
        if sha256_file(path) != info["sha256"]:
            raise SLMError(f"checkpoint file {path} fails its SHA-256 check (corrupted or mixed up)")


class CheckpointManager:
    """Writes, prunes and finds checkpoints under `root` (usually `<run>/checkpoints`)."""

    def __init__(self, root: str | Path, keep: int = 2, say: Callable[[str], None] = print) -> None:
        self.root = Path(root)
        self.keep = keep
        self.say = say

    def step_dirs(self) -> list[Path]:
        """Completed checkpoint folders, newest first."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink() and STEP_DIR.match(p.name)]
        return sorted(dirs, key=lambda p: p.name, reverse=True)

    def save(self, step: int, write_files: Callable[[Path], None], best: bool = False) -> Path:
        """Write a checkpoint for `step`; `write_files(tmp_dir)` fills the folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write_files(tmp)
            for path in tmp.iterdir():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
            write_manifest(tmp)
            fsync_dir(tmp)
            if final.exists():  # re-saving the same step (e.g. signal right after a periodic save)
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._point("latest", final)
        if best:
            self._point("best", final)
        self._prune()
        return final

    def _point(self, name: str, target: Path) -> None:
        link = self.root / name
        tmp = self.root / f".{name}-{os.getpid()}.lnk"
        tmp.unlink(missing_ok=True)
        os.symlink(target.name, tmp)
        os.replace(tmp, link)
        fsync_dir(self.root)

    def _prune(self) -> None:
        best = (self.root / "best").resolve() if (self.root / "best").is_symlink() else None
        for old in self.step_dirs()[self.keep:]:
            if best is None or old.resolve() != best:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-step_*"):
            if not stale.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)

    def latest_intact(self) -> Path | None:
        """Newest checkpoint that passes verification, saying which ones were skipped."""
        for candidate in self.step_dirs():
            try:
                verify_checkpoint(candidate)
                return candidate
            except SLMError as err:
                self.say(f"warning: skipping checkpoint {candidate.name}: {err}; falling back to an older one")
        return None


def save_training_files(directory: Path, model: torch.nn.Module, tokenizer: Any,
                        optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Everything needed to resume, written into `directory` (called inside `save`)."""
    model.save_pretrained(directory, tokenizer=tokenizer)
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    rng_json, rng_tensors = capture_rng()
    save_file(rng_tensors, str(directory / RNG_FILE))
    (directory / STATE_FILE).write_text(json.dumps({**state, "rng": rng_json}) + "\n")


def load_training_files(directory: Path, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load weights, optimizer and RNG from a verified checkpoint; return trainer state."""
    verify_checkpoint(directory)
    model.load_weights(directory / "model.safetensors", map_location=model.device)
    state = json.loads((directory / STATE_FILE).read_text())
    if optimizer is not None:
        try:
            opt_state = torch.load(directory / OPTIMIZER_FILE, map_location=model.device, weights_only=True)
            optimizer.load_state_dict(opt_state)
        except (RuntimeError, ValueError, KeyError) as err:
            raise SLMError(f"optimizer state in {directory} does not fit this model/optimizer "
                           f"({str(err).splitlines()[0]}); start a fresh run instead of resuming") from None
    restore_rng(state.pop("rng"), load_file(str(directory / RNG_FILE)))
    return state
