"""Curriculum phases at run time: which phase a step is in, its batches and its schedule.

The phase of a step is a pure function of the step (phases are laid end to end), and each
phase's batches a pure function of (seed, phase, step), so resuming in the middle of any
phase continues exactly. Weights carry over from phase to phase untouched: a RoPE model
simply sees longer windows.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from simplified_slm.data import BatchSampler
from simplified_slm.errors import SLMError
from simplified_slm.training.config import ExperimentConfig, TrainConfig
from simplified_slm.training.optim import learning_rate


@dataclass
class Phase:
    index: int
    name: str
    start: int  # first global step of the phase
    cfg: TrainConfig  # the train section with the phase's changes; max_steps = its length
    sampler: BatchSampler

    @property
    def end(self) -> int:
        return self.start + self.cfg.max_steps

    def learning_rate(self, step: int) -> float:
        return learning_rate(step - self.start, self.cfg)

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.batch((step - self.start) * self.cfg.grad_accum_steps + micro)

    def describe(self) -> str:
        return (f"phase {self.index + 1} {self.name!r}: steps {self.start}-{self.end}, block_size "
                f"{self.cfg.block_size}, batch_size {self.cfg.batch_size}, lr {self.cfg.lr:g}")


def build_phases(cfg: ExperimentConfig, train_tokens: np.ndarray,
                 phase_tokens: Callable[[int, str], np.ndarray], max_context: int | None,
                 world_size: int = 1) -> list[Phase]:
    """`phase_tokens(index, dataset)` returns the training tokens of a phase that names its
    own dataset; the others train on `train_tokens`."""
    phases = []
    for index, (start, pcfg, spec) in enumerate(cfg.train.phase_configs()):
        where = f"train.phases[{index}]" if spec is not None else "train"
        if max_context is not None and pcfg.block_size > max_context:
            raise SLMError(f"{where}.block_size ({pcfg.block_size}) exceeds the model's context "
                           f"({max_context}); lower block_size or raise the model's context")
        if pcfg.batch_size % world_size:
            raise SLMError(f"{where}.batch_size ({pcfg.batch_size}) is the global batch and must divide "
                           f"evenly over {world_size} processes; make it a multiple of {world_size}")
        tokens = phase_tokens(index, spec.dataset) if spec is not None and spec.dataset else train_tokens
        # each phase draws its own stream: the seed is offset by the phase index
        sampler = BatchSampler(tokens, pcfg.block_size, pcfg.batch_size, cfg.seed + index, mode=pcfg.sampler)
        phases.append(Phase(index, (spec.name if spec is not None else "") or f"phase{index + 1}",
                            start, pcfg, sampler))
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase that trains step `step` (0-based); the last one past the end."""
    return phases[min(bisect.bisect_right([p.start for p in phases], step) - 1, len(phases) - 1)]
