"""Causal self-attention shared by every transformer family (MHA, GQA, MQA, sliding window).

One implementation: the projections are injectable (nn.Linear or BitLinear; frozen int8
BitLinears run q/k/v as one matmul, see `sibling_projections`), positions
come in as an optional rotary callable, and masks are built once per forward by
`attention_bias` and shared by all layers with the same window.

Two kernels compute the same thing. "sdpa" is PyTorch's scaled_dot_product_attention,
which picks flash / memory-efficient kernels where the device has them (and its own math
kernel elsewhere). "eager" is the attention written out in matmuls and a float32 softmax:
it is the reference the fast path is tested against, what exporters that do not know SDPA
(or its `enable_gqa`) can trace, the automatic fallback for dtypes SDPA does not take, and
what "sdpa" runs where SDPA is measurably slower (`sdpa_is_slower`: bf16 training on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from simplified_slm.errors import SLMError
from simplified_slm.layers.bitlinear import sibling_projections
from simplified_slm.layers.kv_cache import KVCache
from simplified_slm.layers.rope import Rotary

LinearFactory = Callable[..., nn.Module]
AttnImplementation = Literal["sdpa", "eager"]
ATTN_IMPLEMENTATIONS: tuple[str, ...] = get_args(AttnImplementation)
# dtypes every SDPA backend accepts; anything else (fp8, integers) takes the eager path
SDPA_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})
# longest key length at which "sdpa" trains bf16 on CPU through the eager kernel
EAGER_CPU_HALF_TRAINING_MAX_KEYS = 256


@dataclass
class AttentionBias:
    """Either `is_causal` (the kernel builds the mask itself, fastest), an explicit bool mask, or neither."""

    mask: torch.Tensor | None  # (B or 1, 1, q_len, k_len), True = may attend
    is_causal: bool


def attention_bias(q_len: int, past_len: int, attention_mask: torch.Tensor | None,
                   sliding_window: int | None, device: torch.device,
                   key_positions: torch.Tensor | None = None) -> AttentionBias:
    """Mask for `q_len` new tokens after `past_len` cached ones.

    `attention_mask` (B, past_len + q_len) marks real tokens with 1 and padding with 0.
    `key_positions` gives the position of each key when a ring cache returns them out of
    order (`KVCache.key_positions`); None means keys 0..past_len+q_len-1. Each query may
    always see itself, so a padding row never has an empty softmax (its output is ignored
    but must stay finite). When no key needs hiding no mask is built at all, which keeps
    the one-token decode step free of per-step mask work.
    """
    k_len = past_len + q_len
    has_padding = attention_mask is not None and not bool(attention_mask[:, :k_len].all())
    if not has_padding:
        if key_positions is None and (sliding_window is None or k_len <= sliding_window):
            if past_len == 0:
                return AttentionBias(None, q_len > 1)
            if q_len == 1:
                return AttentionBias(None, False)
        elif key_positions is not None and q_len == 1 and sliding_window is not None \
                and key_positions.numel() <= sliding_window:
            return AttentionBias(None, False)  # a wrapped ring holds exactly the newest tokens
    k_pos = torch.arange(k_len, device=device) if key_positions is None else key_positions
    q_pos = torch.arange(past_len, k_len, device=device).unsqueeze(1)
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    allowed = allowed[None, None]  # (1, 1, q, k)
    if has_padding:
        keys = attention_mask[:, :k_len] if key_positions is None else attention_mask.index_select(1, k_pos)
        keys_real = keys.bool()[:, None, None, :]
        allowed = (allowed & keys_real) | (k_pos == q_pos)[None, None]
    return AttentionBias(allowed, False)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: AttentionBias,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v written out: the reference SDPA is tested against.

    GQA groups the query heads that share a kv head into one matmul per kv head (query
    head h uses kv head h // groups, as with repeat_interleave) instead of copying the
    keys and values `groups` times. Scores are softmaxed in float32 and cast back, as
    transformers' eager attention does, so half-precision models keep their precision.
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    scores = torch.matmul(q.reshape(batch, kv_heads, groups * q_len, head_dim), k.transpose(-2, -1))
    scores = (scores * head_dim ** -0.5).view(batch, kv_heads, groups, q_len, k_len)
    mask = bias.mask
    if bias.is_causal:  # SDPA's convention: top-left aligned lower triangle
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        mask = mask if mask.dim() == 2 else mask.unsqueeze(2)  # (B, 1, 1, q, k) across the groups
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    out = torch.matmul(probs.view(batch, kv_heads, groups * q_len, k_len), v)
    return out.view(batch, heads, q_len, v.shape[-1])  # values may be wider than queries (MLA)


def sdpa_is_slower(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """True where PyTorch's SDPA is known to lose to the written-out attention.

    On CPU, SDPA's backward in bf16 is 2-3x slower than the eager path's matmuls for short
    keys (torch 2.13, 2-core AVX512-BF16 EPYC, fwd+bwd ms, SDPA vs eager: 5.5 vs 2.0 at T=64,
    11.8 vs 4.4 at T=128, 22 vs 14 at T=256; SDPA wins from T=512 on), which made bf16
    training slower than float32 although its matmuls run twice as fast. Not fp16: there the
    eager path's matmuls are emulated and 2-3x slower than SDPA. Forward-only calls
    (evaluation, generation) keep SDPA: there the two are even or SDPA is faster.
    """
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16
            and k.shape[2] <= EAGER_CPU_HALF_TRAINING_MAX_KEYS and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: AttentionBias, dropout_p: float = 0.0,
           implementation: str = "sdpa") -> torch.Tensor:
    """Attention output (B, heads, q_len, head_dim); q has a multiple of k's heads (GQA)."""
    if implementation == "sdpa" and q.dtype in SDPA_DTYPES and not sdpa_is_slower(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.mask, is_causal=bias.is_causal,
                                              dropout_p=dropout_p, enable_gqa=k.shape[1] != q.shape[1])
    return eager_attention(q, k, v, bias, dropout_p)


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, dropout: float = 0.0,
                 linear: LinearFactory = nn.Linear, output_norm: nn.Module | None = None,
                 implementation: str = "sdpa") -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise SLMError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if implementation not in ATTN_IMPLEMENTATIONS:
            raise SLMError(f"attention implementation {implementation!r} is not one of {list(ATTN_IMPLEMENTATIONS)}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.implementation = implementation
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
        q, k, v = sibling_projections(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = rotary(q, k, position_ids)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = attend(q, k, v, bias, self.dropout if self.training else 0.0, self.implementation)
        y = y.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim)
        return self.resid_dropout(self.o_proj(self.output_norm(y)))
