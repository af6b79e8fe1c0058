"""HGRN-Bit blocks of the MatMul-free LM: a gated linear recurrence as token mixer.

Every projection is a ternary BitLinear; the only sequence operation is the elementwise
recurrence h_t = f_t * h_{t-1} + i_t, run chunk-parallel over a whole sequence and step by
step when decoding from a cached state.

Output gate: the MatMul-free reference computes rmsnorm(g) * swish(h); we follow HGRN
(Qin et al., 2023) and compute rmsnorm(h) * swish(g). The state h sums up to 1/(1-f)
inputs, so its scale drifts with the forget gates (large in deep layers, whose lower
bound keeps f near 1); normalising h removes that drift before the gate, whereas
normalising g leaves the output scale tied to the memory length.

`HGRNBitStack` is what both recurrent families build on: the flat hgrn_bit model is one
stack between its embedding and head, and every hnet_bit encoder, decoder and main
network is one stack. The forget-gate lower bounds and the SwiGLU width live here once.
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


def mlp_width(width: int, hidden_ratio: int) -> int:
    """SwiGLU width of a block: 2/3 * hidden_ratio * width rounded up to a multiple of 256.

    2/3 keeps a gated MLP's parameter count at that of a plain MLP of hidden_ratio * width
    (the MatMul-free reference's choice); 256 keeps the matmuls on friendly sizes.
    """
    size = int(width * hidden_ratio * 2 / 3)
    return 256 * ((size + 255) // 256)


class HGRNBitStackParts:
    """The parts and forward of an HGRN-Bit stack, for the module that holds them.

    A mixin so that the flat hgrn_bit model can hold `layers`, `lower_bounds` and `norm`
    under its own top-level names (the names its checkpoints use) while the hnet_bit
    stages hold them inside `HGRNBitStack` modules; both run the same code.

    Lower bounds of the forget gates (HGRN): one learned vector per layer, softmax over
    layers, cumulative sum minus the first, so layer 0 has a bound of 0 and deeper layers
    are forced to remember longer.
    """

    layers: nn.ModuleList
    lower_bounds: nn.Parameter | None
    norm: nn.RMSNorm

    def build_stack(self, width: int, num_layers: int, intermediate_size: int, expand_ratio: int = 1,
                    num_heads: int = 1, norm_eps: float = 1e-6, use_lower_bound: bool = True) -> None:
        """Register `layers`, `lower_bounds` (None unless `use_lower_bound`) and `norm` on self."""
        self.layers = nn.ModuleList(
            HGRNBitBlock(width, intermediate_size, expand_ratio, num_heads, norm_eps, layer_idx=i)
            for i in range(num_layers))
        self.lower_bounds = (nn.Parameter(torch.zeros(num_layers, width * expand_ratio))
                             if use_lower_bound else None)
        self.norm = nn.RMSNorm(width, eps=norm_eps)

    def layer_lower_bounds(self) -> list[torch.Tensor | None]:
        """The forget-gate lower bound of each layer (None everywhere without bounds)."""
        if self.lower_bounds is None:
            return [None] * len(self.layers)
        bounds = self.lower_bounds.softmax(0)
        return list((bounds.cumsum(0) - bounds[0]).unbind(0))

    def run_stack(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  cache: RecurrentCache | None = None) -> torch.Tensor:
        """Every block with its bound, then the final RMSNorm; advances `cache` by x's length."""
        for layer, bound in zip(self.layers, self.layer_lower_bounds()):
            x = layer(x, bound, attention_mask, cache)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)


class HGRNBitStack(HGRNBitStackParts, nn.Module):
    """HGRN-Bit blocks with per-layer forget-gate lower bounds, then an RMSNorm."""

    def __init__(self, width: int, num_layers: int, intermediate_size: int, expand_ratio: int = 1,
                 num_heads: int = 1, norm_eps: float = 1e-6, use_lower_bound: bool = True) -> None:
        super().__init__()
        self.build_stack(width, num_layers, intermediate_size, expand_ratio, num_heads, norm_eps, use_lower_bound)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: RecurrentCache | None = None) -> torch.Tensor:
        return self.run_stack(x, attention_mask, cache)
