"""Gating activations used by the HGRN-Bit attention and MLP.

Thin names over torch's fused SiLU, kept so layer code reads like the MatMul-free LM
reference (swish gate, SwiGLU) without each layer re-deriving the formulas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), i.e. SiLU."""
    return F.silu(x)


def swiglu(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """silu(x) * y: the gate x decides how much of the value y passes."""
    return F.silu(x) * y
