"""`gpt`: the experimental-SLM decoder-only transformer (learned positions, pre-LayerNorm, GELU MLP).

Also the GPT-2 / nanoGPT architecture, so `export/` can write it as GPT2LMHeadModel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from simplified_slm.layers.attention import CausalSelfAttention, attention_bias
from simplified_slm.layers.kv_cache import KVCache
from simplified_slm.layers.mlp import GeluMLP
from simplified_slm.layers.norms import make_norm
from simplified_slm.models.base import CausalLM, CausalLMOutput, normal_init, positions_from_mask, shifted_labels_loss
from simplified_slm.models.config import ModelConfig
from simplified_slm.errors import SLMError


@dataclasses.dataclass
class GPTConfig(ModelConfig):
    family: ClassVar[str] = "gpt"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # the experimental-SLM default: 4 layers x 256 wide, 4 heads, context 256
        "small": dict(n_layers=4, d_model=256, n_heads=4, context_length=256),
        "base": dict(n_layers=6, d_model=384, n_heads=6, context_length=256),
        "large": dict(n_layers=12, d_model=768, n_heads=12, context_length=1024),
        # nanoGPT's CPU recipe for tiny shakespeare (char level)
        "nanogpt-cpu": dict(n_layers=4, d_model=128, n_heads=4, context_length=64, dropout=0.0, bias=False,
                            activation="gelu"),
    }

    vocab_size: int = 256
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    d_ff: int | None = None  # default 4 * d_model
    context_length: int = 256
    dropout: float = 0.1
    bias: bool = True
    activation: str = "gelu_tanh"  # gelu_tanh (GPT-2) or gelu (exact, nanoGPT; faster on CPU)
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def validate(self) -> None:
        super().validate()
        for name in ("n_layers", "d_model", "n_heads", "context_length"):
            if getattr(self, name) < 1:
                self._fail(name, f"must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            self._fail("n_heads", f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            self._fail("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.activation not in ("gelu", "gelu_tanh"):
            self._fail("activation", f"{self.activation!r} is not 'gelu' or 'gelu_tanh'")
        if self.d_ff is not None and self.d_ff < 1:
            self._fail("d_ff", f"must be positive, got {self.d_ff}")

    @property
    def intermediate_size(self) -> int:
        return self.d_ff or 4 * self.d_model


@torch.compiler.disable
def _eager_embedding(embedding: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
    """`embedding(input_ids)` kept out of torch.compile graphs (a graph break) when training.

    Inductor lowers the embedding's backward to a scatter with atomic adds on CPU, so the
    order in which rows sharing a token are summed, and the gradient's last bits, change
    from run to run: compiled training would not repeat itself, nor resume bit for bit.
    ATen's backward sums in a fixed order, and at nanoGPT's size it is also faster.
    """
    return embedding(input_ids)


class GPTBlock(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm("layernorm", config.d_model, config.norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config.d_model, config.n_heads, bias=config.bias, dropout=config.dropout)
        self.ln_2 = make_norm("layernorm", config.d_model, config.norm_eps, bias=config.bias)
        self.mlp = GeluMLP(config.d_model, config.intermediate_size, bias=config.bias, dropout=config.dropout,
                           approximate="tanh" if config.activation == "gelu_tanh" else "none")

    def forward(self, x: torch.Tensor, bias, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), bias, cache=cache, layer=layer)
        return x + self.mlp(self.ln_2(x))


class GPTForCausalLM(CausalLM):
    config_class = GPTConfig

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.embed_positions = nn.Embedding(config.context_length, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(GPTBlock(config) for _ in range(config.n_layers))
        self.norm = make_norm("layernorm", config.d_model, config.norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_weights(self) -> None:
        """GPT-2's init (std = `init_std`, L = `n_layers`):

        | parameters                                   | initial value           |
        |----------------------------------------------|-------------------------|
        | token and position embeddings, q/k/v, up, lm_head | normal(0, std)     |
        | o_proj, down_proj (residual projections)     | normal(0, std / sqrt(2L)) |
        | linear biases                                | 0                       |
        | LayerNorm weight / bias                      | 1 / 0                   |

        The residual projections are scaled so the residual stream's variance does not grow
        with depth. A tied lm_head is the token embedding.
        """
        std = self.config.init_std
        normal_init(self, std)
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, 0.0, std / math.sqrt(2 * self.config.n_layers))

    @property
    def max_context(self) -> int:
        return self.config.context_length

    def make_cache(self, batch_size: int, max_length: int) -> KVCache:
        cfg = self.config
        return KVCache(cfg.n_layers, batch_size, cfg.n_heads, cfg.d_model // cfg.n_heads,
                       min(max_length, cfg.context_length), self.compute_dtype, self.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: KVCache | None = None,
                use_cache: bool = False) -> CausalLMOutput:
        if use_cache and cache is None:
            cache = self.make_cache(input_ids.shape[0], self.config.context_length)
        past = cache.length if cache is not None else 0
        q_len = input_ids.shape[1]
        if past + q_len > self.config.context_length:
            raise SLMError(f"sequence of {past + q_len} tokens exceeds the model's context of "
                           f"{self.config.context_length}; shorten the input or raise context_length")
        positions = positions_from_mask(attention_mask, past, q_len, input_ids.device)
        tokens = (_eager_embedding(self.embed_tokens, input_ids)
                  if self.training and torch.is_grad_enabled() and torch.compiler.is_compiling()
                  else self.embed_tokens(input_ids))
        x = self.drop(tokens + self.embed_positions(positions))
        bias = attention_bias(q_len, past, attention_mask, None, input_ids.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, bias, cache, i)
        if cache is not None:
            cache.advance(q_len)
        logits = self.lm_head(self.norm(x))
        loss = shifted_labels_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss, cache=cache)
