"""`bitnet`: the TinyLM design, a BitNet b1.58 transformer.

The Llama decoder with every projection a BitLinear (ternary absmean weights, per-token
8-bit activations, STE; no biases anywhere), SubLN (an RMSNorm on the merged attention
heads before o_proj and one on the gated FFN product before down_proj — the placement of
transformers' BitNetForCausalLM), RoPE, GQA, SwiGLU or squared-ReLU FFN. The quantizers
are the project's only ones (`ops/bitnet.py`); the block is the Llama block with
BitLinear injected, so there is one attention and one MLP implementation.

`attention: "mla"` swaps the attention for TinyLM's multi-head latent attention
(`layers/mla.py`): every projection still a BitLinear, SubLN still before o_proj, RoPE on
the shared rope key only, and a generation cache of one latent per token and layer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import torch
from torch import nn

from simplified_slm.layers.bitlinear import BitLinear
from simplified_slm.layers.kv_cache import KVCache
from simplified_slm.layers.mla import MLACache, MLADims, MultiHeadLatentAttention
from simplified_slm.layers.rope import RotaryEmbedding
from simplified_slm.models.llama import LlamaBlock, LlamaConfig, LlamaForCausalLM

_MLA_FIELDS = ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


@dataclasses.dataclass
class BitNetConfig(LlamaConfig):
    family: ClassVar[str] = "bitnet"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256),
        "tiny-mla": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=256, attention="mla", kv_lora_rank=32, q_lora_rank=48,
                         qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
        # TinyLM's usage example: 768 wide, 12 layers, 12 heads, context 2048
        "tinylm": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048),
        # the same with TinyLM's multi-head latent attention (DeepSeek-V2 ratios: latent
        # 4 head dims wide, rope key half a head dim)
        "tinylm-mla": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                           num_attention_heads=12, max_position_embeddings=2048, attention="mla"),
    }

    hidden_act: str = "silu"  # silu (SwiGLU, the seed) or relu2 (BitNet b1.58 2B4T)
    max_position_embeddings: int = 2048
    attention: str = "mha"  # "mha" (MHA/GQA/MQA by num_key_value_heads) or "mla"
    # MLA widths; None takes DeepSeek-V2's proportions of dim_per_head (see `mla_dims`)
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None  # None: a plain query projection (DeepSeek-V2-Lite)
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.hidden_act not in ("silu", "relu2"):
            self._fail("hidden_act", f"{self.hidden_act!r} is not 'silu' or 'relu2'")
        if self.attention_bias:
            self._fail("attention_bias", "BitNet has no biases; set it to false")
        if self.attention not in ("mha", "mla"):
            self._fail("attention", f"{self.attention!r} is not 'mha' or 'mla'")
        if self.attention == "mha":
            for name in _MLA_FIELDS:
                if getattr(self, name) is not None:
                    self._fail(name, "only attention 'mla' uses it; remove it or set attention to 'mla'")
            return
        for name in _MLA_FIELDS:
            value = getattr(self, name)
            if value is not None and value < 1:
                self._fail(name, f"must be positive, got {value}")
        if self.kv_heads != self.num_attention_heads:
            self._fail("num_key_value_heads", "MLA shares one latent across all heads; "
                                              "leave num_key_value_heads unset with attention 'mla'")
        if self.mla_dims().qk_rope_head_dim % 2:
            self._fail("qk_rope_head_dim", "must be even for rotary embeddings")
        if self.sliding_window is not None:
            self._fail("sliding_window", "MLA has no sliding-window form here; remove it or use attention 'mha'")

    def mla_dims(self) -> MLADims:
        """MLA widths, unset ones from dim_per_head as in DeepSeek-V2 (latent 4x, rope key 1/2)."""
        head = self.dim_per_head
        return MLADims(kv_lora_rank=self.kv_lora_rank or 4 * head, qk_nope_head_dim=self.qk_nope_head_dim or head,
                       qk_rope_head_dim=self.qk_rope_head_dim or 2 * max(1, head // 4),
                       v_head_dim=self.v_head_dim or head, q_lora_rank=self.q_lora_rank)

    def cache_values_per_token(self) -> int:
        """Numbers a generation cache holds per token over all layers (times the dtype size = bytes)."""
        if self.attention == "mla":
            per_layer = self.mla_dims().cache_width
        else:
            per_layer = 2 * self.kv_heads * self.dim_per_head
        return per_layer * self.num_hidden_layers


class BitNetForCausalLM(LlamaForCausalLM):
    config_class = BitNetConfig

    def __init__(self, config: BitNetConfig) -> None:
        super().__init__(config)
        if config.attention == "mla":  # only the shared rope key is rotated
            self.rotary = RotaryEmbedding(config.mla_dims().qk_rope_head_dim, config.rope_theta,
                                          config.rope_scaling, config.max_position_embeddings)

    def make_block(self, config: BitNetConfig) -> nn.Module:
        # SubLN normalises right before the projections, so BitLinear's own input norm is off
        linear = functools.partial(BitLinear, input_norm=False)
        attention = None
        if config.attention == "mla":
            dims = config.mla_dims()
            attention = MultiHeadLatentAttention(
                config.hidden_size, config.num_attention_heads, dims, eps=config.rms_norm_eps,
                dropout=config.attention_dropout, linear=linear,
                output_norm=nn.RMSNorm(config.num_attention_heads * dims.v_head_dim, eps=config.rms_norm_eps),
                implementation=config.attn_implementation)
        return LlamaBlock(config, linear=linear, sub_norm=True, activation=config.hidden_act, attention=attention)

    def make_cache(self, batch_size: int, max_length: int) -> KVCache | MLACache:
        cfg = self.config
        if cfg.attention != "mla":
            return super().make_cache(batch_size, max_length)
        return MLACache(cfg.num_hidden_layers, batch_size, cfg.mla_dims(), max_length,
                        self.compute_dtype, self.device)


def cache_bytes_per_token(config: BitNetConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of generation cache per token (all layers) for `config` in `dtype`."""
    return config.cache_values_per_token() * torch.empty(0, dtype=dtype).element_size()
