"""H-Net's router as a module: identity-initialised float q/k projections of the encoder output.

Why float `nn.Linear` and not BitLinear: the boundary is a threshold on a cosine, so the
router needs the continuous value of q.k, and identity initialisation (p_t = dissimilarity
of consecutive encoder outputs, the paper's choice) is not representable by BitLinear's
input RMSNorm + absmean scale. The probabilities themselves are `ops.dynamic_chunking.route`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simplified_slm.ops.dynamic_chunking import Routing, route


class RoutingModule(nn.Module):
    """Cosine-similarity boundary predictor with identity-initialised float q/k projections.

    `bias_init` (β, default 0: no bias) adds a learned vector b, initialised to β in every
    entry, to the input of both projections: q = W_q (x + b), k = W_k (x + b). For
    RMS-normalised x and β = 1, the common component makes consecutive positions start
    at cos ≈ 1/2, p ≈ 1/4, i.e. with few boundaries, so the ratio loss first *raises* p;
    see `HNetBitConfig.router_bias_init` for why that matters.
    """

    def __init__(self, dim: int, bias_init: float = 0.0) -> None:
        super().__init__()
        self.bias_init = float(bias_init)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.bias = nn.Parameter(torch.empty(dim)) if bias_init else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.eye_(self.q_proj.weight)
        nn.init.eye_(self.k_proj.weight)
        if self.bias is not None:
            self.bias.fill_(self.bias_init)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                prev_key: torch.Tensor | None = None) -> Routing:
        """Routing of `x` (B, T, D); `mask` and `prev_key` as in `route`.

        The projections and cosines run in at least float32 with autocast off: a bf16
        cosine is too coarse to threshold at 0.5.
        """
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            xf = x.to(dtype)
            if self.bias is not None:
                xf = xf + self.bias.to(dtype)
            q = F.normalize(F.linear(xf, self.q_proj.weight.to(dtype)), dim=-1, eps=1e-6)
            k = F.normalize(F.linear(xf, self.k_proj.weight.to(dtype)), dim=-1, eps=1e-6)
        return route(q, k, mask, prev_key)
