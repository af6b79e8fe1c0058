"""Output norm of HGRN attention: RMSNorm of the recurrence output, gated by swish(g).

"Fused" only in name, to keep the MatMul-free LM / flash-linear-attention API; on CPU
torch's rms_norm kernel plus one SiLU is already memory-bound, so there is no kernel here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simplified_slm.ops.activations import swish


class FusedRMSNormSwishGate(nn.Module):
    """rmsnorm(x) * weight * swish(g); g is the output-gate projection of the layer input."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps) * swish(g)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
