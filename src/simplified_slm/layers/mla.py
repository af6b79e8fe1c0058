"""Multi-head latent attention (DeepSeek-V2) and its latent-only generation cache.

Keys and values are not projected per head from the hidden state; one down-projection
makes a small latent c_KV (`kv_lora_rank` wide, RMS-normalised) plus one RoPE key
(`qk_rope_head_dim`) shared by every head, and an up-projection `kv_b_proj` expands c_KV
into each head's un-rotated key part (`qk_nope_head_dim`) and value (`v_head_dim`).
Positions enter only through the shared rope key, because a rotation between `kv_b_proj`
and the query would stop the up-projection from being folded into the query (below).
Queries come from a plain projection or, with `q_lora_rank`, through a normalised
low-rank bottleneck too. Module names follow transformers' DeepSeek-V2/V3.

Why it exists: the cache. A token needs only [c_KV; k_rope] per layer — kv_lora_rank +
qk_rope_head_dim numbers instead of MHA's 2 * heads * head_dim — and decoding never
expands it: since q_nope . (W_k c) = (W_k^T q_nope) . c and sum_t p_t W_v c_t =
W_v sum_t p_t c_t, the up-projection is absorbed into the query and the output, and
all heads attend over the same cached entries ("absorbed" form). The prompt and
cacheless passes use the expanded form (the cheaper one when every key is new).

With BitLinear projections (the bitnet family) the latent that kv_b_proj multiplies is
its 8-bit quantised input, so that is what the cache holds and the absorbed form attends
over. Both forms compute the same function up to float rounding; as with any cached
decoding of a BitNet, a later activation sitting on an int8 rounding boundary can then
land on the other level, so cached and cacheless logits agree closely (mean |diff| ~3e-5
over 20 random tiny models, 40 tokens each) and give the same greedy tokens, not bit
for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from simplified_slm.errors import SLMError
from simplified_slm.layers.attention import ATTN_IMPLEMENTATIONS, AttentionBias, LinearFactory, Rotary, attend
from simplified_slm.layers.bitlinear import BitLinear, sibling_projections


@dataclasses.dataclass(frozen=True)
class MLADims:
    """The widths of one MLA layer (DeepSeek-V2's names)."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None

    @property
    def cache_width(self) -> int:
        """Numbers cached per token and layer: the latent and the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


class MLACache:
    """[c_KV; k_rope] of every layer for `batch_size` sequences of up to `max_length` tokens.

    c_KV is stored as kv_b_proj multiplies it (for BitLinear: after its 8-bit per-token
    quantisation, held as float), so a decode step never re-quantises old tokens.

    Same interface as `KVCache` (`length`, `max_length`, `key_positions`, `advance`,
    `reorder`, `nbytes`), so the model's forward and the generation loop treat both
    alike; pre-allocated for the same reason (no per-token re-allocation).
    """

    def __init__(self, num_layers: int, batch_size: int, dims: MLADims, max_length: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.latents = [torch.zeros(batch_size, max_length, dims.cache_width, dtype=dtype, device=device)
                        for _ in range(num_layers)]
        self.max_length = max_length
        self.length = 0

    def update(self, layer: int, latent: torch.Tensor) -> torch.Tensor:
        """Store (B, new, cache_width) for `layer`; return every token's entry so far (a view)."""
        start, end = self.length, self.length + latent.shape[1]
        if end > self.max_length:
            raise SLMError(f"MLA cache holds {self.max_length} tokens; cannot grow to {end}")
        self.latents[layer][:, start:end] = latent
        return self.latents[layer][:, :end]

    def key_positions(self, layer: int, q_len: int) -> None:
        """Always the plain layout (positions 0..length+q_len-1): MLA has no ring-buffer layers."""
        return None

    def advance(self, num_tokens: int) -> None:
        """Called by the model once every layer has stored the new tokens."""
        self.length += num_tokens

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index`."""
        self.latents = [t.index_select(0, index) for t in self.latents]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.latents)


def _input_transform(linear: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What `linear` does to its input before the matmul: BitLinear quantises per token."""
    if isinstance(linear, BitLinear):
        return linear.quantize_input
    if isinstance(linear, nn.Linear) and linear.bias is None:
        return lambda x: x
    raise SLMError(f"MLA cannot absorb a {type(linear).__name__} into its queries; use nn.Linear or BitLinear "
                   "without bias")


def _dense_weight(linear: nn.Module) -> torch.Tensor:
    """The float matrix with linear(x) == F.linear(_input_transform(linear)(x), weight)."""
    return linear.dense_weight() if isinstance(linear, BitLinear) else linear.weight


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA with the call signature of `CausalSelfAttention` (so `LlamaBlock` takes it).

    `rotary` must rotate `qk_rope_head_dim` channels (the model builds its RoPE at that
    width). `output_norm` is BitNet's SubLN over the merged heads before o_proj. No
    projection has a bias (DeepSeek-V2 has none, BitNet forbids them). `implementation`
    picks the attention kernel as in `CausalSelfAttention` ("sdpa", with the eager
    fallback for dtypes SDPA lacks, or "eager").
    """

    def __init__(self, hidden_size: int, num_heads: int, dims: MLADims, eps: float = 1e-6,
                 dropout: float = 0.0, linear: LinearFactory = nn.Linear,
                 output_norm: nn.Module | None = None, implementation: str = "sdpa") -> None:
        super().__init__()
        if implementation not in ATTN_IMPLEMENTATIONS:
            raise SLMError(f"attention implementation {implementation!r} is not one of {list(ATTN_IMPLEMENTATIONS)}")
        self.num_heads, self.dims, self.implementation = num_heads, dims, implementation
        qk_dim = dims.qk_nope_head_dim + dims.qk_rope_head_dim
        if dims.q_lora_rank is None:
            self.q_proj = linear(hidden_size, num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = linear(hidden_size, dims.q_lora_rank, bias=False)
            self.q_a_layernorm = nn.RMSNorm(dims.q_lora_rank, eps=eps)
            self.q_b_proj = linear(dims.q_lora_rank, num_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = linear(hidden_size, dims.cache_width, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(dims.kv_lora_rank, eps=eps)
        self.kv_b_proj = linear(dims.kv_lora_rank, num_heads * (dims.qk_nope_head_dim + dims.v_head_dim), bias=False)
        self.o_proj = linear(num_heads * dims.v_head_dim, hidden_size, bias=False)
        self.output_norm = output_norm if output_norm is not None else nn.Identity()
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        self._absorbed_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and the kv down-projection; their first matmuls read x, so frozen int8
        BitLinears run them as one (`sibling_projections`)."""
        low_rank = self.dims.q_lora_rank is not None
        first, kv = sibling_projections(x, (self.q_a_proj if low_rank else self.q_proj, self.kv_a_proj_with_mqa))
        return (self.q_b_proj(self.q_a_layernorm(first)) if low_rank else first), kv

    def forward(self, x: torch.Tensor, bias: AttentionBias, position_ids: torch.Tensor | None = None,
                rotary: Rotary | None = None, cache: MLACache | None = None, layer: int = 0) -> torch.Tensor:
        if rotary is None:
            raise SLMError("multi-head latent attention needs RoPE positions; pass rotary=")
        d, heads = self.dims, self.num_heads
        batch, q_len, _ = x.shape
        q, kv = self._project(x)
        q_nope, q_rope = q.view(batch, q_len, heads, -1).transpose(1, 2).split(
            [d.qk_nope_head_dim, d.qk_rope_head_dim], dim=-1)
        latent, k_rope = kv.split([d.kv_lora_rank, d.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_rope, k_rope = rotary(q_rope, k_rope.unsqueeze(1), position_ids)  # one rope key for all heads
        dropout = self.dropout if self.training else 0.0
        if cache is None or cache.length == 0:
            if cache is not None:
                self._store(cache, layer, latent, k_rope)
            y = self._expanded(q_nope, q_rope, latent, k_rope, bias, dropout)
        else:
            y = self._absorbed(q_nope, q_rope, self._store(cache, layer, latent, k_rope), bias, dropout)
        y = y.transpose(1, 2).reshape(batch, q_len, heads * d.v_head_dim)
        return self.resid_dropout(self.o_proj(self.output_norm(y)))

    def _expanded(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                  bias: AttentionBias, dropout: float) -> torch.Tensor:
        """Per-head keys and values from kv_b_proj: plain multi-head attention."""
        d = self.dims
        batch, heads, q_len, _ = q_nope.shape
        kv = self.kv_b_proj(latent).view(batch, -1, heads, d.qk_nope_head_dim + d.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([d.qk_nope_head_dim, d.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, heads, -1, -1)], dim=-1)
        return attend(torch.cat([q_nope, q_rope], dim=-1), k, v, bias, dropout, self.implementation)

    def _store(self, cache: MLACache, layer: int, latent: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """Cache c_KV as kv_b_proj sees it (8-bit quantised for BitLinear) beside the rotated
        rope key, so decoding attends over the entries as they are; return all entries."""
        return cache.update(layer, torch.cat([_input_transform(self.kv_b_proj)(latent), k_rope.squeeze(1)], dim=-1))

    def _absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, entries: torch.Tensor,
                  bias: AttentionBias, dropout: float) -> torch.Tensor:
        """Attention over the cached entries with kv_b_proj folded into query and output:
        one shared key [c_KV; k_rope] and value c_KV per token, for all heads (like MQA)."""
        w_k, w_v = self._absorbed_weights()
        d = self.dims
        batch, heads, q_len, _ = q_nope.shape
        # attend scales by 1/sqrt(query width); MLA's scores use 1/sqrt(nope + rope)
        rescale = (d.cache_width / (d.qk_nope_head_dim + d.qk_rope_head_dim)) ** 0.5
        q = torch.cat([torch.matmul(q_nope, w_k), q_rope * rescale], dim=-1)  # (B, H, q, cache_width)
        # Every head reads the same keys, so the heads fold into query rows of one head:
        # plain attention, where GQA's kernels would first copy the keys per head. Only
        # called with cached tokens, where `attention_bias` gives a mask or none, never
        # is_causal (whose corner alignment the folding would break).
        q = q.reshape(batch, 1, heads * q_len, d.cache_width)
        mask = None if bias.mask is None else bias.mask.repeat(1, 1, heads, 1)  # row h*q_len + t is query t
        entries = entries.unsqueeze(1)  # (B, 1, S, cache_width)
        y = attend(q, entries, entries[..., :d.kv_lora_rank], AttentionBias(mask, False), dropout, self.implementation)
        return torch.matmul(y.view(batch, heads, q_len, d.kv_lora_rank), w_v)  # (B, H, q, v_head_dim)

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head into W_k^T (H, nope, rank) — pre-multiplied by the score
        rescale of `_absorbed` — and W_v^T (H, rank, v), contiguous for batched matmuls.

        Kept while kv_b_proj returns the same dense weight object (it caches it per weight
        version without autograd), so a decode step does not re-slice and copy it.
        """
        dense = _dense_weight(self.kv_b_proj)
        cached = self._absorbed_cache
        if cached is not None and cached[0] is dense:
            return cached[1], cached[2]
        d = self.dims
        weight = dense.view(self.num_heads, d.qk_nope_head_dim + d.v_head_dim, d.kv_lora_rank)
        rescale = (d.cache_width / (d.qk_nope_head_dim + d.qk_rope_head_dim)) ** 0.5
        w_k = (weight[:, :d.qk_nope_head_dim] * rescale).contiguous()
        w_v = weight[:, d.qk_nope_head_dim:].transpose(1, 2).contiguous()
        self._absorbed_cache = (dense, w_k, w_v)
        return w_k, w_v
