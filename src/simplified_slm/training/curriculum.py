"""Curriculum phases at run time: which phase a step is in, its batches and its schedule.

The phase of a step is a pure function of the step (phases are laid end to end), and each
phase's batches a pure function of (seed, phase, step), so resuming in the middle of any
phase continues exactly. Weights carry over from phase to phase untouched: a RoPE model
simply sees longer windows, and a phase with `rope_scaling` also rescales its positions
from its first step on ("train short, extend long"; the model's config records it, so its
checkpoints and exports keep the scaling).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from simplified_slm.data import BatchSampler
from simplified_slm.errors import SLMError
from simplified_slm.layers.rope import RotaryEmbedding
from simplified_slm.training.config import ExperimentConfig, TrainConfig
from simplified_slm.training.optim import learning_rate


@dataclass
class Phase:
    index: int
    name: str
    start: int  # first global step of the phase
    cfg: TrainConfig  # the train section with the phase's changes; max_steps = its length
    sampler: BatchSampler
    rope_scaling: dict[str, Any] | None = None  # applied when the phase starts; None: unchanged

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
                 world_size: int = 1, make_sampler: Callable[..., Any] = BatchSampler) -> list[Phase]:
    """`phase_tokens(index, dataset)` returns the training tokens of a phase that names its
    own dataset; the others train on `train_tokens`. `make_sampler` has BatchSampler's
    signature (data.chat.ChatBatchSampler draws whole chat examples instead)."""
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
        sampler = make_sampler(tokens, pcfg.block_size, pcfg.batch_size, cfg.seed + index, mode=pcfg.sampler)
        phases.append(Phase(index, (spec.name if spec is not None else "") or f"phase{index + 1}",
                            start, pcfg, sampler, spec.rope_scaling if spec is not None else None))
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase that trains step `step` (0-based); the last one past the end."""
    return phases[min(bisect.bisect_right([p.start for p in phases], step) - 1, len(phases) - 1)]


def apply_rope_scaling(model: nn.Module, scaling: dict[str, Any]) -> None:
    """Rescale every RoPE of `model` (and its config) to `scaling`, a HF `rope_scaling` mapping.

    The rotary modules hold no weights, so they are replaced by new ones with the same head
    size and base; a family without RoPE (learned or no positions) refuses.
    """
    rotaries = [(name, m) for name, m in model.named_modules() if isinstance(m, RotaryEmbedding)]
    if not rotaries or not hasattr(model.config, "rope_scaling"):
        raise SLMError(f"a phase sets rope_scaling but the {model.config.family} model has no rotary "
                       "position embeddings; remove rope_scaling from the phase")
    model.config.rope_scaling = dict(scaling)
    for name, old in rotaries:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr,
                RotaryEmbedding(old.head_dim, old.theta, dict(scaling), old.max_positions))
