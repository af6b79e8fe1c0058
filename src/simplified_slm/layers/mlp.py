"""Feed-forward blocks: GELU MLP (GPT) and gated SwiGLU (Llama, BitNet, HGRN).

`linear` is injectable so ternary families reuse the same block with BitLinear.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from simplified_slm.layers.bitlinear import sibling_projections

LinearFactory = Callable[..., nn.Module]


class GeluMLP(nn.Module):
    """GPT MLP. `approximate="tanh"` is GPT-2's GELU; "none" (exact) is nanoGPT's and is
    several times faster on CPU in this torch build."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = True,
                 dropout: float = 0.0, linear: LinearFactory = nn.Linear, approximate: str = "tanh") -> None:
        super().__init__()
        self.up_proj = linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = linear(intermediate_size, hidden_size, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate)))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); act is SiLU (SwiGLU) or squared ReLU (BitNet b1.58 2B4T)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 activation: str = "silu", linear: LinearFactory = nn.Linear,
                 inner_norm: nn.Module | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if activation not in ("silu", "relu2"):
            raise ValueError(f"unknown gated activation {activation!r}; use 'silu' or 'relu2'")
        self.activation = activation
        self.gate_proj = linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = linear(intermediate_size, hidden_size, bias=bias)
        # SubLN (BitNet) normalises the gated product before the down projection.
        self.inner_norm = inner_norm if inner_norm is not None else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = sibling_projections(x, (self.gate_proj, self.up_proj))  # one matmul when int8 BitLinear
        gate = F.silu(gate) if self.activation == "silu" else F.relu(gate).square()
        return self.dropout(self.down_proj(self.inner_norm(gate * up)))
