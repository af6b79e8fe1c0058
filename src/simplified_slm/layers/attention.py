"""Causal self-attention shared by every transformer family (MHA, GQA, MQA, sliding window).

One implementation: the projections are injectable (nn.Linear or BitLinear), positions
come in as an optional rotary callable, and the kernel is PyTorch's SDPA, which picks
flash / memory-efficient kernels where the device has them. Masks are built once per
forward by `attention_bias` and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from simplified_slm.layers.kv_cache import KVCache

LinearFactory = Callable[..., nn.Module]
Rotary = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class AttentionBias:
    """Either `is_causal` (SDPA builds the mask itself, fastest) or an explicit bool mask."""

    mask: torch.Tensor | None  # (B or 1, 1, q_len, k_len), True = may attend
    is_causal: bool


def attention_bias(q_len: int, past_len: int, attention_mask: torch.Tensor | None,
                   sliding_window: int | None, device: torch.device) -> AttentionBias:
    """Mask for `q_len` new tokens after `past_len` cached ones.

    `attention_mask` (B, past_len + q_len) marks real tokens with 1 and padding with 0.
    Each query may always see itself, so a padding row never has an empty softmax (its
    output is ignored but must stay finite).
    """
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    if not has_padding and sliding_window is None:
        if past_len == 0:
            return AttentionBias(None, q_len > 1)
        if q_len == 1:
            return AttentionBias(None, False)
    k_len = past_len + q_len
    q_pos = torch.arange(past_len, k_len, device=device).unsqueeze(1)
    k_pos = torch.arange(k_len, device=device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    allowed = allowed.unsqueeze(0).unsqueeze(0)  # (1, 1, q, k)
    if has_padding:
        keys_real = attention_mask[:, None, None, :k_len].bool()
        allowed = (allowed & keys_real) | (k_pos == q_pos).unsqueeze(0).unsqueeze(0)
    return AttentionBias(allowed, False)


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, dropout: float = 0.0,
                 linear: LinearFactory = nn.Linear, output_norm: nn.Module | None = None) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.q_proj = linear(hidden_size, num_heads * self.head_dim, bias=bias)
        self.k_proj = linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = linear(num_heads * self.head_dim, hidden_size, bias=bias)
        # SubLN (BitNet) normalises the merged heads before o_proj.
        self.output_norm = output_norm if output_norm is not None else nn.Identity()
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: AttentionBias, position_ids: torch.Tensor | None = None,
                rotary: Rotary | None = None, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        batch, q_len, _ = x.shape
        q = self.q_proj(x).view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = rotary(q, k, position_ids)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.mask, is_causal=bias.is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads)
        y = y.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim)
        return self.resid_dropout(self.o_proj(self.output_norm(y)))
