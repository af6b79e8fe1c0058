"""Optimizers and learning-rate schedules.

Weight decay applies only to tensors of rank >= 2 (matrices, embeddings): decaying norms'
gains and biases pulls them toward zero for no benefit. The schedule is a pure function of
the step so resuming needs no scheduler state.

`clip_grad_norm` is `torch.nn.utils.clip_grad_norm_` with the scaling folded into a fused
optimizer's update kernel: one pass over the gradients less per step.

`optimizer: muon` pairs `torch.optim.Muon` (orthogonalised momentum; it only accepts 2-D
tensors and is meant for hidden weight matrices) with AdamW for everything Muon should not
see: embeddings, the LM head, norms' gains and biases. Every param group carries its own
`base_lr`; the schedule gives a factor that scales all of them alike.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # the config validates against OPTIMIZERS and SCHEDULES, so it imports this module
    from simplified_slm.training.config import TrainConfig

OPTIMIZERS = ("adamw", "muon")  # see build_optimizer
SCHEDULES = ("cosine", "linear", "constant", "cosine_restarts")  # see learning_rate


def _adamw(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW at `lr`, decaying only tensors of rank >= 2."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "base_lr": cfg.lr}]
    # fused AdamW runs the whole update in one kernel per device (CPU included since torch 2.4)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)


def _muon_eligible(model: nn.Module) -> set[int]:
    """ids of hidden 2-D weight matrices: not embeddings, not the LM head (tied or not)."""
    excluded = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or name.split(".")[-1] in ("lm_head", "embed_positions"):
            excluded.update(id(p) for p in module.parameters(recurse=False))
    return {id(p) for p in model.parameters() if p.requires_grad and p.dim() == 2 and id(p) not in excluded}


class CombinedOptimizer:
    """Several optimizers stepped as one: `param_groups` lists all their groups (so the
    trainer sets learning rates in one place) and the state dict nests theirs by name."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != set(self.optimizers):
            raise ValueError(f"expected optimizer states for {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])


Optimizer = torch.optim.Optimizer | CombinedOptimizer


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return _adamw(trainable, cfg)
    hidden = _muon_eligible(model)
    muon_params = [p for p in trainable if id(p) in hidden]
    parts: dict[str, torch.optim.Optimizer] = {"adamw": _adamw([p for p in trainable if id(p) not in hidden], cfg)}
    if muon_params:
        parts["muon"] = torch.optim.Muon(
            [{"params": muon_params, "base_lr": cfg.muon_lr}], lr=cfg.muon_lr,
            weight_decay=cfg.muon_weight_decay, momentum=cfg.muon_momentum, adjust_lr_fn="original")
    return CombinedOptimizer(parts)


def clip_grad_norm(optimizer: Optimizer, params: list[nn.Parameter], max_norm: float | None,
                   fold_into_optimizer: bool = True) -> float:
    """The gradients' total 2-norm before clipping; clips them to `max_norm` (None: no clipping).

    The clip is torch's (scale by max_norm / (norm + 1e-6) when that is below 1). A fused
    torch optimizer (our AdamW) does not get its gradients rewritten: the scale goes to
    its next `step()` as the `grad_scale` it reads for AMP, which divides each gradient by
    it inside the update kernel. The update then differs from scaling first by at most an
    ulp (a divide instead of a multiply), and `.grad` holds clipped values only after the
    step. Every call sets or clears that scale, so call this once before each `step()`.
    Anything else (Muon, FSDP's sharded tensors: `fold_into_optimizer=False`) goes through
    `clip_grad_norm_`.
    """
    limit = math.inf if max_norm is None else max_norm
    if not (fold_into_optimizer and isinstance(optimizer, torch.optim.Optimizer)
            and optimizer.defaults.get("fused") and getattr(optimizer, "_step_supports_amp_scaling", False)):
        return torch.nn.utils.clip_grad_norm_(params, limit).item()
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    norm = total.item()
    optimizer.grad_scale = (total + 1e-6) / limit if norm + 1e-6 > limit else None
    return norm


def set_learning_rate(optimizer: Optimizer, lr: float, cfg: TrainConfig) -> None:
    """Scale every group's `base_lr` by the schedule's lr relative to `cfg.lr`."""
    factor = lr / cfg.lr
    for group in optimizer.param_groups:
        group["lr"] = group.get("base_lr", cfg.lr) * factor


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then decay to `min_lr` at `max_steps`: cosine, linear, or
    cosine with warm restarts (SGDR: cycles of `restart_period` steps, each `restart_mult`
    times longer than the last, the lr jumping back to `lr` at each restart)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine_restarts":
        into, period = step - cfg.warmup_steps, float(cfg.restart_period)
        while into >= period:
            into -= period
            period *= cfg.restart_mult
        progress = into / period
    else:
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.lr_schedule == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * progress
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def clock_learning_rate(train_seconds: float, step: int, cfg: TrainConfig) -> float:
    """`learning_rate` on the clock (`train.time_budget`): the schedule stands at the larger of
    the budget's and `max_steps`' elapsed shares, so it completes by whichever ends the run
    first, on any machine; `warmup_steps / max_steps` is the warmup's share."""
    share = max(train_seconds / cfg.time_budget, step / cfg.max_steps)
    return learning_rate(min(share, 1.0) * cfg.max_steps, cfg)
