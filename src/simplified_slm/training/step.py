"""One optimisation step: what the Trainer runs each step and the speed benchmark times.

`TrainState` is everything a run carries from step to step (and a checkpoint restores);
`StepSetup` is how a step computes, built once; `train_step` does forward, backward,
clipping and the update for one global batch and reports `StepStats`. A step whose loss or
gradient is not finite leaves the weights untouched (the caller decides when to give up).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from simplified_slm.models.base import CausalLM, next_token_loss
from simplified_slm.training.monitoring import grad_norms_by_group
from simplified_slm.training.optim import clip_grad_norm

Batch = tuple[torch.Tensor, torch.Tensor]


def model_loss(forward: Callable[[torch.Tensor], Any], compile: bool = False) -> Callable[..., Any]:
    """`(x, y) -> (next-token loss, the model's aux loss or None)`: one training forward.

    With `compile` the model's forward and the loss become one torch.compile graph (and its
    backward one more), so the cross-entropy fuses with the LM head instead of running as
    separate eager ops.
    """
    def loss_of(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = forward(x)
        return next_token_loss(out.logits, y), out.aux_loss
    return torch.compile(loss_of) if compile else loss_of


@dataclass
class TrainState:
    """The run's state between steps; with the RNGs, what a checkpoint holds."""
    model: CausalLM
    optimizer: torch.optim.Optimizer
    run_id: str
    step: int = 0  # optimisation steps done (skipped non-finite steps count)
    best_val: float = math.inf
    skipped_total: int = 0  # non-finite steps skipped over the whole run, resumes included
    bad_in_row: int = 0  # consecutive non-finite steps up to now
    train_seconds: float = 0.0  # time spent in training steps (evaluation and checkpoints excluded)
    phase: Any = None  # the curriculum phase of the last step (curriculum.Phase)


@dataclass
class StepSetup:
    """How a step computes: built once by the trainer (or a benchmark) from the config.

    `loss_fn(x, y) -> (loss, aux)` is `model_loss` over `forward` (the model, or its DDP /
    compiled wrapper). With a `distiller` the loss comes from it instead, on `forward`'s
    logits. `dist` (training.distributed.Distributed) shards global batches and averages
    losses over ranks; None runs single-process.
    """
    loss_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    forward: Callable[[torch.Tensor], Any]
    params: list[nn.Parameter]
    device: torch.device
    amp: torch.dtype | None = None
    grad_clip: float | None = None
    fold_clip: bool = True  # clip inside the fused AdamW's update (see optim.clip_grad_norm)
    distiller: Any = None
    dist: Any = None
    update_hooks: Sequence[Any] = ()


@dataclass
class StepStats:
    loss: float  # next-token loss (the distillation loss with a teacher), mean over the global batch
    grad_norm: float  # before clipping
    aux_loss: float = 0.0
    ce_loss: float | None = None  # distillation's two parts
    kd_loss: float | None = None
    group_norms: dict[str, float] = field(default_factory=dict)
    skipped: bool = False  # non-finite loss or gradient: no update was made

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def _no_mark(label: str) -> None:
    pass


def train_step(state: TrainState, batches: Sequence[Batch], setup: StepSetup, *, group_norms: bool = False,
               mark: Callable[[str], None] = _no_mark) -> StepStats:
    """One update from `batches` (the micro-batches of one global batch); advances `state`.

    `group_norms` also measures per-group gradient norms (before clipping) for logging;
    `mark(label)` is called after each phase of the step (the benchmark's timing hook).
    """
    dist, accum = setup.dist, len(batches)
    loss_sum = aux_sum = ce_sum = kd_sum = 0.0  # means over the micro-batches
    for micro, (x, y) in enumerate(batches):
        if dist is not None:
            x, y = dist.shard(x), dist.shard(y)
        x, y = x.to(setup.device), y.to(setup.device)
        mark("batch")
        # DDP averages gradients once per step, on the last micro-batch
        sync = micro == accum - 1 or dist is None or not dist.enabled
        with contextlib.nullcontext() if sync else setup.forward.no_sync():
            with torch.autocast(setup.device.type, dtype=setup.amp, enabled=setup.amp is not None):
                if setup.distiller is None:
                    loss, aux_loss = setup.loss_fn(x, y)
                else:
                    out = setup.forward(x)
                    loss, ce, kd = setup.distiller.loss(out.logits, x, y)
                    aux_loss = out.aux_loss
                    ce_sum += ce.item() / accum
                    kd_sum += kd.item() / accum
                total = loss + aux_loss if aux_loss is not None else loss
            mark("forward+loss")
            (total / accum).backward()
        mark("backward")
        loss_sum += loss.item() / accum
        if aux_loss is not None:
            aux_sum += aux_loss.item() / accum
    mean = dist.mean if dist is not None else (lambda v: v)
    stats = StepStats(loss=mean(loss_sum), grad_norm=math.nan, aux_loss=mean(aux_sum))
    if setup.distiller is not None:
        stats.ce_loss, stats.kd_loss = ce_sum, kd_sum
    for hook in setup.update_hooks:
        hook.apply(state.model, state.step)
    if group_norms:
        stats.group_norms = grad_norms_by_group(state.model)  # raw, before clipping
    stats.grad_norm = clip_grad_norm(state.optimizer, setup.params, setup.grad_clip or None,
                                     fold_into_optimizer=setup.fold_clip)
    mark("clip")
    state.step += 1
    if not stats.finite:
        state.optimizer.zero_grad(set_to_none=True)
        state.bad_in_row += 1
        state.skipped_total += 1
        stats.skipped = True
        return stats
    state.bad_in_row = 0
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    mark("optimizer")
    return stats
