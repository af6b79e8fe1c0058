"""Checkpoints that survive being killed at any moment and resume the exact trajectory.

A checkpoint is a folder `checkpoints/step_XXXXXXXX/` holding the model (config.json +
model.safetensors, loadable by `from_pretrained`), tokenizer files, the optimizer state,
the RNG states and `trainer_state.json`, plus `manifest.json` with every file's size and
SHA-256. It is written under a temporary name and renamed into place (atomic), and the
`latest` / `best` symlinks are swapped atomically, so a reader sees an old complete
checkpoint or a new complete one, never half of one. Re-saving an existing step moves the
old folder aside first and back if the process dies in between, so no kill can leave a
half-deleted `step_*` folder. Nothing is unpickled: tensors go through safetensors and
`torch.load(weights_only=True)`, and checkpoint files are treated as untrusted input: any
file that is damaged, mixed up or crafted is refused with an SLMError naming it.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from simplified_slm.errors import SLMError
from simplified_slm.training.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_QUANTIZATION, base_quantization,
                                          has_lora, load_adapter_weights, named_adapter, save_adapter)
from simplified_slm.utils.io import atomic_write, atomic_write_json, fsync_dir, sha256_file, swap_dir

MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.safetensors"
STEP_DIR = re.compile(r"^step_(\d{8})$")
ASIDE_DIR = re.compile(r"^\.old-(step_\d{8})-(\d+)$")  # an old step folder moved aside while re-saving
# what `load_training_files` reads; each must be covered by the manifest
REQUIRED_FILES = ("model.safetensors", STATE_FILE, OPTIMIZER_FILE, RNG_FILE)


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


def write_manifest(directory: Path, best: bool = False) -> None:
    """`best` records that the folder was saved as the best one, so a kill before the
    `best` link was swapped can be repaired (`CheckpointManager.repair_links`)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    atomic_write_json(directory / MANIFEST, {"files": manifest, "best": best})


def _saved_as_best(directory: Path) -> bool:
    try:
        return json.loads((directory / MANIFEST).read_text(encoding="utf-8")).get("best") is True
    except (OSError, ValueError, AttributeError):
        return False


def _read_manifest(directory: Path) -> dict[str, tuple[int, str]]:
    """{file name: (size, sha256)} from the manifest; SLMError if it is missing or malformed."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise SLMError(f"checkpoint {directory} has no {MANIFEST}; it is incomplete or not a checkpoint")
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        entries = {name: (info["size"], info["sha256"]) for name, info in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):  # bad JSON, wrong shape
        raise SLMError(f"{manifest_path} is corrupt; the checkpoint cannot be trusted") from None
    for name, (size, digest) in entries.items():
        # a manifest is untrusted input too: only plain file names inside this folder
        if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name
                or "\x00" in name or isinstance(size, bool) or not isinstance(size, int)
                or not isinstance(digest, str)):
            raise SLMError(f"{manifest_path} is corrupt (bad entry {str(name)[:60]!r}); "
                           "the checkpoint cannot be trusted")
    return entries


def verify_checkpoint(directory: str | Path) -> None:
    """Raise SLMError naming the first missing, truncated or altered file."""
    directory = Path(directory)
    for name, (size, digest) in _read_manifest(directory).items():
        path = directory / name
        try:
            if not path.is_file():
                raise SLMError(f"checkpoint file {path} is missing")
            if path.stat().st_size != size:
                raise SLMError(f"checkpoint file {path} has {path.stat().st_size} bytes, expected {size} "
                               "(truncated or replaced)")
            if sha256_file(path) != digest:
                raise SLMError(f"checkpoint file {path} fails its SHA-256 check (corrupted or mixed up)")
        except OSError as err:  # unreadable: permissions, I/O error on a failing disk
            raise SLMError(f"checkpoint file {path} cannot be read ({err.strerror or err})") from None


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
        """Write a checkpoint for `step`; `write_files(tmp_dir)` fills the folder.

        A failing disk (full, read-only, I/O error) raises SLMError naming the checkpoint and
        the cause; the checkpoints already there stay intact and no temporary folder is left.
        """
        final = self.root / f"step_{step:08d}"
        try:
            self._recover()
            self.root.mkdir(parents=True, exist_ok=True)
            self._write(final, write_files, best)
            self._point("latest", final)
            if best:
                self._point("best", final)
            self._prune()
        except (OSError, RuntimeError, SafetensorError) as err:
            # OSError from Python writes; safetensors and torch.save report the same disk
            # errors as SafetensorError / RuntimeError ("file write failed", "unexpected pos")
            detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise SLMError(f"could not write checkpoint {final.name} in {self.root}: {detail}"
                           f"{_free_space(self.root)}; free disk space or fix the folder's permissions "
                           "(the checkpoints already there are intact; resume with --resume auto)") from err
        return final

    def _write(self, final: Path, write_files: Callable[[Path], None], best: bool) -> None:
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write_files(tmp)
            for path in tmp.iterdir():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
            write_manifest(tmp, best)
            fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if not final.exists():
            try:
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fsync_dir(self.root)
            return
        # Re-saving a step (e.g. resuming a finished run, or replacing a corrupt folder):
        # a directory cannot be replaced atomically, so move the old one aside first. A kill
        # between the two renames leaves `.old-step_*`, which `_recover` puts back.
        aside = self.root / f".old-{final.name}-{os.getpid()}"
        shutil.rmtree(aside, ignore_errors=True)
        try:
            swap_dir(tmp, final, aside)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _recover(self) -> None:
        """Undo what a process killed in the middle of `_write` left behind."""
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            match = ASIDE_DIR.match(entry.name)
            if match is None or not entry.is_dir() or entry.is_symlink():
                continue
            final = self.root / match.group(1)
            if final.exists() or final.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)  # the new folder made it into place
            else:
                os.rename(entry, final)  # killed between the two renames: put the old one back
                fsync_dir(self.root)

    def _point(self, name: str, target: Path) -> None:
        link = self.root / name
        tmp = self.root / f".{name}-{os.getpid()}.lnk"
        tmp.unlink(missing_ok=True)
        os.symlink(target.name, tmp)
        os.replace(tmp, link)
        fsync_dir(self.root)

    def repair_links(self) -> Path | None:
        """Point `latest` at the newest intact checkpoint and `best` at the newest intact one
        saved as best, and return the former.

        A process killed after renaming its folder into place but before swapping the links
        leaves them one checkpoint behind; resuming a run that is already finished saves
        nothing, so without this `latest` would name stale weights forever."""
        newest = self.latest_intact()
        if newest is None:
            return None
        self._point_if_stale("latest", newest)
        for candidate in self.step_dirs():
            if candidate.name <= newest.name and _saved_as_best(candidate):
                try:
                    verify_checkpoint(candidate)
                except SLMError:
                    continue
                self._point_if_stale("best", candidate)
                break
        return newest

    def _point_if_stale(self, name: str, target: Path) -> None:
        link = self.root / name
        if not (link.is_symlink() and link.resolve() == target.resolve()):
            self._point(name, target)

    def _prune(self) -> None:
        best = (self.root / "best").resolve() if (self.root / "best").is_symlink() else None
        for old in self.step_dirs()[self.keep:]:
            if best is None or old.resolve() != best:
                # rename first: a kill during the deletion must not leave a half-deleted step_*
                doomed = self.root / f".trash-{old.name}-{os.getpid()}"
                os.rename(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        self._clean_stale()

    def _clean_stale(self) -> None:
        """Remove what killed processes left: trash, unfinished temp folders, temp links.

        Also run when resuming, since a resumed run that is already finished saves nothing
        and so never prunes."""
        for stale in self.root.glob(".trash-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in self.root.glob(".tmp-step_*"):
            if not stale.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)
        for stale in self.root.glob(".*.lnk"):  # symlinks of a process killed inside `_point`
            if not stale.name.endswith(f"-{os.getpid()}.lnk"):
                stale.unlink(missing_ok=True)

    def latest_intact(self) -> Path | None:
        """Newest checkpoint that passes verification, saying which ones were skipped."""
        self._recover()
        self._clean_stale()
        for candidate in self.step_dirs():
            try:
                verify_checkpoint(candidate)
                return candidate
            except SLMError as err:
                self.say(f"warning: skipping checkpoint {candidate.name}: {err}; falling back to an older one")
        return None


def save_training_files(directory: Path, model: torch.nn.Module, tokenizer: Any,
                        optimizer_state: dict[str, Any], state: dict[str, Any]) -> None:
    """Everything needed to resume, written into `directory` (called inside `save`); a LoRA
    run's model is its adapter (peft's format), the frozen base stays where it came from."""
    if has_lora(model):  # + the run's model config; the base weights stay at base_model_name_or_path
        save_adapter(directory, *named_adapter(model), tokenizer=tokenizer)
        atomic_write_json(directory / "config.json", model.config.to_dict())
        quantized = base_quantization(model)
        if quantized:  # QLoRA: how the base is quantized again when the adapter is loaded
            atomic_write_json(directory / BASE_QUANTIZATION, {"modules": quantized})
    else:
        model.save_pretrained(directory, tokenizer=tokenizer)
    torch.save(optimizer_state, directory / OPTIMIZER_FILE)
    rng_json, rng_tensors = capture_rng()
    atomic_write(directory / RNG_FILE, lambda tmp: save_file(rng_tensors, str(tmp)))  # umask mode, not 0600
    (directory / STATE_FILE).write_text(json.dumps({**state, "rng": rng_json}) + "\n")


def _free_space(directory: Path) -> str:
    """Free space note: torch.save reports a full disk only as "unexpected pos ..."."""
    try:
        free = shutil.disk_usage(directory).free / 2**20
    except OSError:
        return ""
    return f" ({free:.1f} MiB free there{': the disk is full' if free < 1 else ''})"


def _first_line(err: BaseException, prefer: str = "") -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    picked = next((line for line in lines if prefer and prefer in line), lines[0])
    return picked[:200]


def read_trainer_state(directory: Path) -> dict[str, Any]:
    """The checkpoint's trainer state (step, run id, data fingerprint, RNG, ...), validated."""
    directory = Path(directory)
    path = directory / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # unreadable, not UTF-8, not JSON
        raise SLMError(f"{path} is not a readable trainer state ({_first_line(err)}); "
                       "the checkpoint is corrupt or was not written by `slm train`") from None
    valid = (isinstance(state, dict)
             and isinstance(state.get("step"), int) and not isinstance(state["step"], bool) and state["step"] >= 0
             and isinstance(state.get("best_val_loss"), (int, float)) and not isinstance(state["best_val_loss"], bool)
             and isinstance(state.get("run_id"), str) and isinstance(state.get("rng"), dict))
    if not valid:
        raise SLMError(f"{path} lacks a valid step, best_val_loss, run_id or rng; the checkpoint is "
                       "corrupt or was not written by `slm train`")
    return state


def load_training_files(directory: Path, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load weights, optimizer and RNG from a verified checkpoint; return trainer state.

    Every file is untrusted input: anything that fails to parse raises SLMError naming it,
    and optimizer.pt is only read with `weights_only=True`, so a crafted pickle is refused
    instead of run."""
    directory = Path(directory)
    verify_checkpoint(directory)
    listed = _read_manifest(directory)
    lora = (directory / ADAPTER_CONFIG).is_file()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, *REQUIRED_FILES[1:]) if lora else REQUIRED_FILES:
        if name not in listed:
            raise SLMError(f"checkpoint {directory}: {name} is not covered by its {MANIFEST}; the checkpoint "
                           "is incomplete or was not written by `slm train`")
    if lora != has_lora(model):
        raise SLMError(f"checkpoint {directory} {'holds' if lora else 'has no'} a LoRA adapter but this run "
                       f"{'does not use' if lora else 'uses'} train.lora; resume with the checkpoint's settings")
    if lora:
        load_adapter_weights(model, directory)
    else:
        model.load_weights(directory / "model.safetensors", map_location=model.device)
    state = read_trainer_state(directory)
    if optimizer is not None:
        load_optimizer_state(directory, optimizer.load_state_dict)
    try:
        restore_rng(state.pop("rng"), load_file(str(directory / RNG_FILE)))
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError, KeyError, IndexError) as err:
        raise SLMError(f"RNG state in {directory} ({RNG_FILE}, {STATE_FILE}) is invalid "
                       f"({_first_line(err)}); the checkpoint is corrupt or was not written by `slm train`") from None
    return state


def load_optimizer_state(directory: Path, load: Callable[[dict[str, Any]], None]) -> None:
    """Read optimizer.pt (tensors only, never unpickled) and hand it to `load` (the
    optimizer's `load_state_dict`, or FSDP's sharding loader)."""
    path = Path(directory) / OPTIMIZER_FILE
    try:
        opt_state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused a global: never unpickle it
        raise SLMError(f"{path} holds Python objects other than tensors "
                       f"({_first_line(err, prefer='GLOBAL')}); refusing to load it, since unpickling "
                       "it could run code. Use checkpoints you wrote yourself") from None
    except Exception as err:  # torch.load raises many types on a damaged or foreign file
        raise SLMError(f"{path} cannot be read ({type(err).__name__}: {_first_line(err)}); the "
                       "checkpoint is corrupt or was not written by `slm train`") from None
    try:
        load(opt_state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise SLMError(f"optimizer state {path} does not fit this model/optimizer "
                       f"({_first_line(err)}); start a fresh run instead of resuming") from None


def read_model_vocab_size(directory: Path) -> int | None:
    """The vocabulary size in a checkpoint's config.json (None where it cannot be read:
    loading the checkpoint then reports the damage)."""
    try:
        value = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None
