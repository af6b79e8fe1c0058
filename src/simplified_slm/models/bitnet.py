"""`bitnet`: seed 001's TinyLM, a BitNet b1.58 transformer.

The Llama decoder with every projection a BitLinear (ternary absmean weights, per-token
8-bit activations, STE; no biases anywhere), SubLN (an RMSNorm on the merged attention
heads before o_proj and one on the gated FFN product before down_proj — the placement of
transformers' BitNetForCausalLM), RoPE, GQA, SwiGLU or squared-ReLU FFN. The quantizers
are the project's only ones (`ops/bitnet.py`); the block is the Llama block with
BitLinear injected, so there is one attention and one MLP implementation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

from torch import nn

from simplified_slm.models.llama import LlamaBlock, LlamaConfig, LlamaForCausalLM
from simplified_slm.ops.bitnet import BitLinear


@dataclasses.dataclass
class BitNetConfig(LlamaConfig):
    family: ClassVar[str] = "bitnet"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256),
        # seed 001's usage example: 768 wide, 12 layers, 12 heads, context 2048
        "tinylm": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048),
    }

    hidden_act: str = "silu"  # silu (SwiGLU, the seed) or relu2 (BitNet b1.58 2B4T)
    max_position_embeddings: int = 2048

    def validate(self) -> None:
        super().validate()
        if self.hidden_act not in ("silu", "relu2"):
            self._fail("hidden_act", f"{self.hidden_act!r} is not 'silu' or 'relu2'")
        if self.attention_bias:
            self._fail("attention_bias", "BitNet has no biases; set it to false")


class BitNetForCausalLM(LlamaForCausalLM):
    config_class = BitNetConfig

    def make_block(self, config: BitNetConfig) -> nn.Module:
        # SubLN normalises right before the projections, so BitLinear's own input norm is off
        linear = functools.partial(BitLinear, input_norm=False)
        return LlamaBlock(config, linear=linear, sub_norm=True, activation=config.hidden_act)
