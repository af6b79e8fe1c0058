"""Batches of (input, next-token target) windows cut from a flat token array.

The batch for a step is a pure function of (seed, step, settings): there is no iterator
state to save, so a run resumed from a checkpoint at step N sees exactly the batches an
uninterrupted run would have seen. `state_dict` therefore only records the settings, to
refuse a resume whose data or batch settings silently changed.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

import numpy as np
import torch

from simplified_slm.errors import SLMError

SAMPLER_MODES = ("random", "sequential")
_CHECKSUM_SAMPLES = 1 << 16  # evenly spaced tokens hashed to notice changed data cheaply


def _check_windows(tokens: np.ndarray, block_size: int, split: str) -> None:
    if block_size < 1:
        raise SLMError(f"block_size must be at least 1, got {block_size}")
    if len(tokens) < block_size + 1:
        raise SLMError(f"the {split} split has {len(tokens)} tokens, fewer than block_size + 1 "
                       f"= {block_size + 1}; use a smaller block_size or more {split} data")


def _num_windows(num_tokens: int, block_size: int, stride: int) -> int:
    """Windows of block_size + 1 tokens starting at 0, stride, 2*stride, ... that fit."""
    return (num_tokens - block_size - 1) // stride + 1


def _gather(tokens: np.ndarray, starts: np.ndarray,
            block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 tensors of shape (len(starts), block_size); y is x shifted by one."""
    index = starts[:, None] + np.arange(block_size + 1)
    windows = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class BatchSampler:
    """Training batches: "random" window starts (nanoGPT style) or "sequential" windows.

    "sequential" walks windows spaced `stride` tokens apart (default `block_size`, i.e.
    non-overlapping) in order and wraps around at the end of the split.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 mode: str = "random", stride: int | None = None, split: str = "train") -> None:
        if mode not in SAMPLER_MODES:
            raise SLMError(f"sampler mode {mode!r} is unknown; choose one of {list(SAMPLER_MODES)}")
        if batch_size < 1:
            raise SLMError(f"batch_size must be at least 1, got {batch_size}")
        if seed < 0:
            raise SLMError(f"seed must be a non-negative integer, got {seed}")
        if stride is not None and mode != "sequential":
            raise SLMError("stride only applies to mode='sequential'; remove it or switch mode")
        if stride is not None and stride < 1:
            raise SLMError(f"stride must be at least 1, got {stride}")
        _check_windows(tokens, block_size, split)
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.mode = mode
        self.stride = stride or block_size
        self.split = split
        self._checksum: str | None = None

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) batch of training step `step`, each of shape (batch_size, block_size)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, step])
            starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        else:
            windows = _num_windows(len(self.tokens), self.block_size, self.stride)
            starts = (step * self.batch_size + np.arange(self.batch_size)) % windows * self.stride
        return _gather(self.tokens, starts, self.block_size)

    def _data_checksum(self) -> str:
        """Hash of evenly spaced tokens (num_tokens is compared separately): notices
        re-tokenized or different data without reading a multi-GB split on every save."""
        if self._checksum is None:
            every = max(1, len(self.tokens) // _CHECKSUM_SAMPLES)
            sample = np.ascontiguousarray(self.tokens[::every], dtype=np.int64)
            self._checksum = hashlib.sha256(sample.tobytes()).hexdigest()
        return self._checksum

    def state_dict(self) -> dict[str, Any]:
        """Settings that determine every batch; there is no position to save."""
        return {"mode": self.mode, "block_size": self.block_size, "batch_size": self.batch_size,
                "seed": self.seed, "stride": self.stride, "split": self.split,
                "num_tokens": len(self.tokens), "data_checksum": self._data_checksum()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse to resume when the batches would differ from the checkpointed run's."""
        for key, now in self.state_dict().items():
            if key not in state:
                raise SLMError(f"sampler state in the checkpoint lacks '{key}'; it was written "
                               "by another version, start a new run")
            if state[key] != now:
                what = ("the data changed (different text or tokenizer)"
                        if key in ("num_tokens", "data_checksum")
                        else f"{key} was {state[key]!r} and is now {now!r}")
                raise SLMError(f"cannot resume the {self.split} sampler: {what}; resume with the "
                               "settings and data the run started with, or start a new run")


def iter_eval_batches(tokens: np.ndarray, block_size: int, batch_size: int,
                      max_batches: int | None = None,
                      split: str = "val") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows covering the split in order, batched, for evaluation.

    Every token after the first is a target exactly once (up to the last partial window,
    which is dropped), so the mean loss is the split's per-token loss rather than a random
    estimate. The last batch may hold fewer than `batch_size` windows.
    """
    if batch_size < 1:
        raise SLMError(f"batch_size must be at least 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise SLMError(f"max_batches must be at least 1 (or None for the whole split), "
                       f"got {max_batches}")
    _check_windows(tokens, block_size, split)
    starts = np.arange(_num_windows(len(tokens), block_size, block_size)) * block_size
    if max_batches is not None:
        starts = starts[:max_batches * batch_size]
    # a generator expression, so bad arguments fail at the call rather than at first use
    return (_gather(tokens, starts[i:i + batch_size], block_size)
            for i in range(0, len(starts), batch_size))
