"""`llama`: Llama-3.2-style decoder (RMSNorm, RoPE with scaling, GQA, SwiGLU, sliding window).

Field and module names follow transformers' LlamaConfig / LlamaForCausalLM (minus the
`model.` prefix), so importing or exporting a HF checkpoint is a rename, not a reshuffle.

Sliding-window attention is per layer and named as in transformers' Mistral / Qwen /
Gemma configs: `sliding_window` alone makes every layer local (Mistral); `layer_types`
("sliding_attention" / "full_attention" per layer, Qwen 3, Gemma 3) or
`sliding_window_pattern` (every N-th layer global, Gemma 3) mix local and global layers;
a list in `sliding_window` gives each layer its own window (null = global). Windowed
layers keep a ring-buffer KV cache bounded by their window.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from simplified_slm.errors import SLMError
from simplified_slm.layers.attention import AttentionBias, AttnImplementation, CausalSelfAttention, attention_bias
from simplified_slm.layers.kv_cache import KVCache
from simplified_slm.layers.mlp import GatedMLP
from simplified_slm.layers.rope import RotaryEmbedding, validate_rope_scaling
from simplified_slm.models.base import CausalLM, CausalLMOutput, normal_init, positions_from_mask, shifted_labels_loss
from simplified_slm.models.config import ModelConfig

LAYER_TYPES = ("full_attention", "sliding_attention")
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


@dataclasses.dataclass
class LlamaConfig(ModelConfig):
    family: ClassVar[str] = "llama"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256),
        "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=2, max_position_embeddings=1024),
        "base": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=4, max_position_embeddings=2048),
        "large": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=4, max_position_embeddings=2048),
        "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                             rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
        "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                             rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, rms_norm_eps=1e-5,
                             tie_word_embeddings=True),
    }

    vocab_size: int = 256
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # None: = num_attention_heads (MHA); 1: MQA
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    # window of the sliding layers, or one window per layer (None entries: full attention)
    sliding_window: int | list[int | None] | None = None
    layer_types: list[str] | None = None  # per layer "sliding_attention" or "full_attention"
    sliding_window_pattern: int | None = None  # Gemma 3: layers N-1, 2N-1, ... are global
    attention_dropout: float = 0.0
    # "sdpa": PyTorch's fused kernels (flash where the device has it); "eager": the
    # written-out reference, for exporters and debugging
    attn_implementation: AttnImplementation = "sdpa"
    initializer_range: float = 0.02

    def validate(self) -> None:
        super().validate()
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            if getattr(self, name) < 1:
                self._fail(name, f"must be positive, got {getattr(self, name)}")
        kv = self.num_key_value_heads or self.num_attention_heads
        if kv < 1 or self.num_attention_heads % kv:
            self._fail("num_key_value_heads", f"{kv} must divide num_attention_heads ({self.num_attention_heads})")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            self._fail("num_attention_heads", f"hidden_size ({self.hidden_size}) must be divisible by it "
                                              f"({self.num_attention_heads}) unless head_dim is set")
        if (self.head_dim or self.hidden_size // self.num_attention_heads) % 2:
            self._fail("head_dim", "must be even for rotary embeddings")
        problem = validate_rope_scaling(self.rope_scaling)
        if problem:
            self._fail("rope_scaling", problem)
        self._validate_windows()

    def _validate_windows(self) -> None:
        layers, window = self.num_hidden_layers, self.sliding_window
        if isinstance(window, list):
            if len(window) != layers:
                self._fail("sliding_window", f"a list needs one window per layer ({layers}), got {len(window)}")
            if self.layer_types is not None or self.sliding_window_pattern is not None:
                self._fail("sliding_window", "a per-layer list already says which layers are local; "
                                             "drop layer_types / sliding_window_pattern")
        windows = window if isinstance(window, list) else [window]
        bad = next((w for w in windows if w is not None and w < 1), None)
        if bad is not None:
            self._fail("sliding_window", f"windows must be positive, got {bad}")
        if self.layer_types is not None:
            if self.sliding_window_pattern is not None:
                self._fail("sliding_window_pattern", "give layer_types or sliding_window_pattern, not both")
            if len(self.layer_types) != layers:
                self._fail("layer_types", f"needs one entry per layer ({layers}), got {len(self.layer_types)}")
            unknown = next((t for t in self.layer_types if t not in LAYER_TYPES), None)
            if unknown is not None:
                self._fail("layer_types", f"{unknown!r} is not one of {list(LAYER_TYPES)}")
            if window is None and "sliding_attention" in self.layer_types:
                self._fail("sliding_window", "layer_types has sliding_attention layers; set the window size")
        if self.sliding_window_pattern is not None:
            if self.sliding_window_pattern < 1:
                self._fail("sliding_window_pattern", f"must be positive, got {self.sliding_window_pattern}")
            if window is None:
                self._fail("sliding_window", "sliding_window_pattern needs the window size")

    @property
    def layer_windows(self) -> list[int | None]:
        """Sliding window of each layer (None: full attention)."""
        window, layers = self.sliding_window, self.num_hidden_layers
        if isinstance(window, list):
            return list(window)
        if self.layer_types is not None:
            return [window if t == "sliding_attention" else None for t in self.layer_types]
        if self.sliding_window_pattern is not None:
            return [None if (i + 1) % self.sliding_window_pattern == 0 else window for i in range(layers)]
        return [window] * layers

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


class LlamaBlock(nn.Module):
    """Pre-norm block. `linear`, `sub_norm` and `activation` let BitNet reuse it unchanged:
    BitLinear projections, SubLN before o_proj / down_proj, squared-ReLU gates."""

    def __init__(self, config: LlamaConfig, linear=nn.Linear, sub_norm: bool = False,
                 activation: str = "silu", attention: nn.Module | None = None) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=eps)
        attn_width = config.num_attention_heads * config.dim_per_head
        # `attention`: another token mixer with the same call signature (BitNet's MLA)
        self.self_attn = attention if attention is not None else CausalSelfAttention(config.hidden_size, config.num_attention_heads, config.kv_heads,
                                             config.dim_per_head, bias=config.attention_bias,
                                             dropout=config.attention_dropout, linear=linear,
                                             output_norm=nn.RMSNorm(attn_width, eps=eps) if sub_norm else None,
                                             implementation=config.attn_implementation)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, bias=False, activation=activation,
                            linear=linear,
                            inner_norm=nn.RMSNorm(config.intermediate_size, eps=eps) if sub_norm else None)

    def forward(self, x: torch.Tensor, bias: AttentionBias, rotary, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), bias, rotary=rotary, cache=cache, layer=layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(CausalLM):
    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.make_block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.dim_per_head, config.rope_theta, config.rope_scaling,
                                      config.max_position_embeddings)
        self._windows = config.layer_windows
        self._window_groups = [(w, self._windows.index(w)) for w in dict.fromkeys(self._windows)]
        self.init_weights()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_weights(self) -> None:
        """transformers' Llama init (std = `initializer_range`), also the `bitnet` family's:

        | parameters                                          | initial value  |
        |-----------------------------------------------------|----------------|
        | embed_tokens, every projection, lm_head             | normal(0, std) |
        | (bitnet: BitLinear latent float weights, MLA's too) | normal(0, std) |
        | attention biases (`attention_bias`)                 | 0              |
        | RMSNorm weights (bitnet's SubLN and MLA norms too)  | 1              |

        A tied lm_head is the token embedding.
        """
        normal_init(self, self.config.initializer_range)

    def make_block(self, config: LlamaConfig) -> nn.Module:
        return LlamaBlock(config)

    @property
    def max_context(self) -> int | None:
        # RoPE has no hard limit; dynamic/llama3 scaling exist to go beyond the trained length
        return None

    def make_cache(self, batch_size: int, max_length: int) -> KVCache:
        """Windowed layers get a ring buffer of their window, full layers `max_length` slots."""
        cfg = self.config
        return KVCache(cfg.num_hidden_layers, batch_size, cfg.kv_heads, cfg.dim_per_head, max_length,
                       self.compute_dtype, self.device, windows=cfg.layer_windows)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: KVCache | None = None,
                use_cache: bool = False) -> CausalLMOutput:
        if use_cache and cache is None:
            cache = self.make_cache(input_ids.shape[0], self.config.max_position_embeddings)
        past = cache.length if cache is not None else 0
        q_len = input_ids.shape[1]
        if cache is not None and past + q_len > cache.max_length:
            raise SLMError(f"the KV cache holds {cache.max_length} tokens; make a larger one with make_cache")
        positions = positions_from_mask(attention_mask, past, q_len, input_ids.device)
        rotary = self.rotary.rotary_for(positions, past + q_len)
        # one mask per distinct window, shared by the layers that use it
        biases: dict[int | None, AttentionBias] = {}
        for window, first_layer in self._window_groups:
            key_positions = cache.key_positions(first_layer, q_len) if cache is not None else None
            biases[window] = attention_bias(q_len, past, attention_mask, window, input_ids.device, key_positions)
        x = self.embed_tokens(input_ids)
        for i, (layer, window) in enumerate(zip(self.layers, self._windows)):
            x = layer(x, biases[window], rotary, cache, i)
        if cache is not None:
            cache.advance(q_len)
        logits = self.lm_head(self.norm(x))
        loss = shifted_labels_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss, cache=cache)
