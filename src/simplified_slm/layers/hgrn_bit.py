"""HGRN-Bit blocks of the MatMul-free LM: a gated linear recurrence as token mixer.

Every projection is a ternary BitLinear; the only sequence operation is the elementwise
recurrence h_t = f_t * h_{t-1} + i_t, run chunk-parallel over a whole sequence and step by
step when decoding from a cached state.

Output gate: the MatMul-free reference computes rmsnorm(g) * swish(h); we follow HGRN
(Qin et al., 2023) and compute rmsnorm(h) * swish(g). The state h sums up to 1/(1-f)
inputs, so its scale drifts with the forget gates (large in deep layers, whose lower
bound keeps f near 1); normalising h removes that drift before the gate, whereas
normalising g leaves the output scale tied to the memory length.
"""

from __future__ import annotations

import torch
from torch import nn

from simplified_slm.layers.bitlinear import BitLinear
from simplified_slm.layers.fused_norm_gate import FusedRMSNormSwishGate
from simplified_slm.layers.mlp import GatedMLP
from simplified_slm.layers.recurrent_cache import RecurrentCache
from simplified_slm.ops.activations import swiglu
from simplified_slm.ops.hgrn import hgrn


class HGRNBitAttention(nn.Module):
    """Token mixer: i/f/g projections, forget gate with a per-layer lower bound, recurrence."""

    def __init__(self, hidden_size: int, expand_ratio: int = 1, num_heads: int = 1,
                 norm_eps: float = 1e-6, layer_idx: int = 0) -> None:
        super().__init__()
        self.input_dim = hidden_size * expand_ratio
        # Heads are a reshape in the reference kernels: the recurrence never mixes channels,
        # so they change nothing numerically and we keep (batch, time, channels) throughout.
        self.num_heads = num_heads
        self.layer_idx = layer_idx
        self.i_proj = BitLinear(hidden_size, self.input_dim)
        self.f_proj = BitLinear(hidden_size, self.input_dim)
        self.g_proj = BitLinear(hidden_size, self.input_dim)
        self.g_norm = FusedRMSNormSwishGate(self.input_dim, eps=norm_eps)
        self.o_proj = BitLinear(self.input_dim, hidden_size)

    def forward(self, x: torch.Tensor, lower_bound: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: RecurrentCache | None = None) -> torch.Tensor:
        f = self.f_proj(x).sigmoid()
        if lower_bound is not None:
            f = lower_bound + (1 - lower_bound) * f
        i = swiglu(self.i_proj(x), 1 - f)
        if attention_mask is not None:  # padded positions add nothing to the state
            i = i * attention_mask[:, -x.shape[1]:, None].to(i.dtype)
        state = cache.get(self.layer_idx) if cache is not None else None
        h, final = hgrn(i, f, state, cache is not None)
        if cache is not None:
            cache.set(self.layer_idx, final)
        return self.o_proj(self.g_norm(h, self.g_proj(x)))


class HGRNBitBlock(nn.Module):
    """Pre-RMSNorm residual block: x + mixer(norm(x)), then x + SwiGLU(norm(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, expand_ratio: int = 1, num_heads: int = 1,
                 norm_eps: float = 1e-6, layer_idx: int = 0) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(hidden_size, eps=norm_eps)
        self.attn = HGRNBitAttention(hidden_size, expand_ratio, num_heads, norm_eps, layer_idx)
        self.mlp_norm = nn.RMSNorm(hidden_size, eps=norm_eps)
        self.mlp = GatedMLP(hidden_size, intermediate_size, bias=False, activation="silu", linear=BitLinear)

    def forward(self, x: torch.Tensor, lower_bound: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: RecurrentCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), lower_bound, attention_mask, cache)
        return x + self.mlp(self.mlp_norm(x))
