"""The hook system: experiment without editing the model or the trainer.

Forward hooks observe activations (they must never change outputs); update hooks
transform gradients after backward and before the optimizer step. Both are enabled by
name in the config's `hooks` list and recorded in run.json's hook list.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from simplified_slm.errors import SLMError


class ForwardHook:
    """Base: `attach` registers torch hooks; `metrics` returns what to log and resets."""

    def attach(self, model: nn.Module) -> None:
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        return {}

    def detach(self) -> None:
        for handle in getattr(self, "_handles", []):
            handle.remove()


class ActivationStats(ForwardHook):
    """Mean, std and max |x| of each block's output, recorded only while `active`.

    Recording is switched on for logging steps only, so the hook costs nothing on others.
    """

    def __init__(self, every: int = 50) -> None:
        self.every = every
        self.active = False
        self._stats: dict[str, float] = {}
        self._handles: list[Any] = []

    def attach(self, model: nn.Module) -> None:
        layers = getattr(model, "layers", None)
        if layers is None:
            raise SLMError("activation_stats needs a model with a `layers` list of blocks")
        for index, block in enumerate(layers):
            self._handles.append(block.register_forward_hook(self._recorder(f"act/layer{index}")))

    def _recorder(self, prefix: str) -> Callable:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            if not self.active:
                return
            x = (output[0] if isinstance(output, tuple) else output).detach().float()
            self._stats[f"{prefix}/mean"] = x.mean().item()
            self._stats[f"{prefix}/std"] = x.std().item()
            self._stats[f"{prefix}/absmax"] = x.abs().max().item()
        return record

    def metrics(self) -> dict[str, float]:
        out, self._stats = self._stats, {}
        return out


class UpdateHook:
    """Base: `apply(model, step)` edits `.grad` in place before the optimizer step."""

    def apply(self, model: nn.Module, step: int) -> None:
        raise NotImplementedError


class ScaleGradients(UpdateHook):
    def __init__(self, factor: float = 1.0) -> None:
        self.factor = float(factor)

    def apply(self, model: nn.Module, step: int) -> None:
        for param in model.parameters():
            if param.grad is not None:
                param.grad.mul_(self.factor)


class GradientNoise(UpdateHook):
    """Gaussian noise with std `eta / (1 + step)^gamma` (Neelakantan et al., 2015).

    The noise comes from its own generator seeded by the step, so it is reproducible and
    resuming a run gives the same noise without saving any state.
    """

    def __init__(self, eta: float = 0.01, gamma: float = 0.55, seed: int = 0) -> None:
        self.eta, self.gamma, self.seed = float(eta), float(gamma), int(seed)

    def apply(self, model: nn.Module, step: int) -> None:
        std = self.eta / (1 + step) ** self.gamma
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        for param in model.parameters():
            if param.grad is not None:
                noise = torch.randn(param.grad.shape, generator=generator, dtype=param.grad.dtype)
                param.grad.add_(noise.to(param.grad.device), alpha=std)


FORWARD_HOOKS: dict[str, type[ForwardHook]] = {"activation_stats": ActivationStats}
UPDATE_HOOKS: dict[str, type[UpdateHook]] = {"scale_gradients": ScaleGradients, "gradient_noise": GradientNoise}


def build_hooks(specs: list[Any]) -> tuple[list[ForwardHook], list[UpdateHook], list[str]]:
    """Instantiate the enabled hooks of the config; return (forward, update, names)."""
    forward: list[ForwardHook] = []
    update: list[UpdateHook] = []
    names: list[str] = []
    for spec in specs:
        if not spec.enabled:
            continue
        cls = FORWARD_HOOKS.get(spec.name) or UPDATE_HOOKS.get(spec.name)
        if cls is None:
            known = sorted(FORWARD_HOOKS) + sorted(UPDATE_HOOKS)
            raise SLMError(f"hooks: unknown hook {spec.name!r}; choose one of {known}")
        try:
            hook = cls(**spec.params)
        except TypeError as err:
            raise SLMError(f"hooks: bad params for {spec.name!r}: {err}") from None
        (forward if isinstance(hook, ForwardHook) else update).append(hook)
        names.append(spec.name)
    return forward, update, names
