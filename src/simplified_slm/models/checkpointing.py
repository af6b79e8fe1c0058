"""Gradient checkpointing per block, for every family at once.

Every family keeps its blocks in `nn.ModuleList`s named `layers`. Enabling checkpointing
replaces each block's `forward` (on the instance, so parameter names and checkpoints are
unchanged) with one that, when gradients are being recorded, saves only the block's inputs
and recomputes its activations during backward. RNG state is restored for the recompute,
so dropout masks, losses and gradients equal those of the plain model.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(block: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if block.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def checkpointed_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost blocks: items of `layers` lists not inside another such block."""
    blocks: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            for index, block in enumerate(module):
                path = f"{name}.{index}"
                if not any(path.startswith(outer + ".") for outer, _ in blocks):
                    blocks.append((path, block))
    return [block for _, block in blocks]


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Checkpoint every block of `model`; returns how many blocks (idempotent)."""
    blocks = checkpointed_blocks(model)
    for block in blocks:
        if not isinstance(block.__dict__.get("forward"), functools.partial):
            block.forward = functools.partial(_checkpointed, block, block.forward)
    return len(blocks)


def saved_activation_bytes(model: nn.Module, run: Callable[[], torch.Tensor]) -> int:
    """Bytes of tensors autograd keeps for backward while `run()` builds the graph (the
    activation memory checkpointing saves; parameters are counted too, as autograd saves
    them, but equally with and without checkpointing)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total
