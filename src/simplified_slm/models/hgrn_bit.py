"""`hgrn_bit`: the flat MatMul-free model of the original reference API (SimplifiedSLMForCausalLM).

Embedding -> N x HGRNBitBlock -> RMSNorm -> BitLinear LM head, byte vocabulary by default.
Every linear layer is ternary; the token mixer is a linear recurrence, so the model has no
context limit and decodes in O(1) per token from a `RecurrentCache`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from simplified_slm.layers.bitlinear import BitLinear
from simplified_slm.layers.hgrn_bit import HGRNBitStackParts, mlp_width
from simplified_slm.layers.recurrent_cache import RecurrentCache
from simplified_slm.models.base import CausalLM, CausalLMOutput, normal_init, shifted_labels_loss
from simplified_slm.models.config import ModelConfig


@dataclasses.dataclass
class SimplifiedSLMConfig(ModelConfig):
    family: ClassVar[str] = "hgrn_bit"
    # the original reference API's sizes: hidden x layers; hidden_ratio 4 as in the MatMul-free reference
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "small": dict(hidden_size=256, num_hidden_layers=4),
        "base": dict(hidden_size=512, num_hidden_layers=6),
        "large": dict(hidden_size=768, num_hidden_layers=12),
    }

    vocab_size: int = 256
    hidden_size: int = 512
    num_hidden_layers: int = 6
    num_heads: int = 1
    expand_ratio: int = 1
    hidden_ratio: int = 4
    intermediate_size: int | None = None  # default: 2/3 * hidden_ratio * hidden, rounded up to 256
    use_lower_bound: bool = True
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def validate(self) -> None:
        super().validate()
        for name in ("hidden_size", "num_hidden_layers", "num_heads", "expand_ratio", "hidden_ratio"):
            if getattr(self, name) < 1:
                self._fail(name, f"must be positive, got {getattr(self, name)}")
        if (self.hidden_size * self.expand_ratio) % self.num_heads:
            self._fail("num_heads", f"hidden_size * expand_ratio ({self.hidden_size * self.expand_ratio}) "
                                    f"must be divisible by num_heads ({self.num_heads})")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            self._fail("intermediate_size", f"must be positive, got {self.intermediate_size}")

    @property
    def mlp_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return mlp_width(self.hidden_size, self.hidden_ratio)


class SimplifiedSLMForCausalLM(HGRNBitStackParts, CausalLM):
    """Embedding -> one HGRN-Bit stack (its parts under top-level names) -> BitLinear head."""

    config_class = SimplifiedSLMConfig

    def __init__(self, config: SimplifiedSLMConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.build_stack(config.hidden_size, config.num_hidden_layers, config.mlp_size, config.expand_ratio,
                         config.num_heads, config.rms_norm_eps, config.use_lower_bound)
        self.lm_head = BitLinear(config.hidden_size, config.vocab_size)
        self.init_weights()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embeddings.weight

    def init_weights(self) -> None:
        """The MatMul-free reference's init (std = `initializer_range`):

        | parameters                                         | initial value  |
        |----------------------------------------------------|----------------|
        | embeddings, every BitLinear's latent float weight  | normal(0, std) |
        | forget-gate lower bounds                           | 0              |
        | RMSNorm weights (blocks, BitLinear inputs, g_norm) | 1              |

        Zero lower bounds make the softmax over layers uniform, so the bounds start at
        0, 1/L, ..., (L-1)/L. A tied lm_head is the embedding.
        """
        normal_init(self, self.config.initializer_range)
        if self.lower_bounds is not None:
            nn.init.zeros_(self.lower_bounds)

    def make_cache(self, batch_size: int, max_length: int) -> RecurrentCache:
        return RecurrentCache(self.config.num_hidden_layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: RecurrentCache | None = None,
                use_cache: bool = False) -> CausalLMOutput:
        if use_cache and cache is None:
            cache = self.make_cache(input_ids.shape[0], 0)
        hidden = self.run_stack(self.embeddings(input_ids), attention_mask, cache)
        logits = self.lm_head(hidden)
        loss = shifted_labels_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss, cache=cache)

