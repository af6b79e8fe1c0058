"""Normalisation layers shared by every family.

torch ships LayerNorm and RMSNorm with fused CPU/CUDA kernels; we only choose between them
by name so configs can say `norm: rmsnorm` without each family importing both.
"""

from __future__ import annotations

from torch import nn


def make_norm(kind: str, hidden_size: int, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """`layernorm` (GPT) or `rmsnorm` (Llama, BitNet, HGRN)."""
    if kind == "layernorm":
        return nn.LayerNorm(hidden_size, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(hidden_size, eps=eps)
    raise ValueError(f"unknown norm kind {kind!r}; use 'layernorm' or 'rmsnorm'")
