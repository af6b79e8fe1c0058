"""`spiking`: a SpikeGPT-style spiking language model (the edge framework's SNN variant).

Embedding -> LayerNorm -> N x SpikingBlock -> LayerNorm -> LM head. Each block is
SpikeGPT's (Zhu et al., 2023):

    x = x + LIF(TimeMix(LN(x)))       token mixer, then spiking neurons over the tokens
    x = x + LIF(ChannelMix(LN(x)))    channel mixer, then spiking neurons

so the residual stream receives binary spikes only. The LIF neurons (`layers.lif`,
snntorch's `Leaky` equations) carry their membranes from token to token.

Token mixer: SpikeGPT uses RWKV-4's time mix, a receptance-gated, decayed, key-weighted
average of values (WKV). Its weights exp(k_t) overflow unless the scan tracks a running
maximum, which needs a custom sequential kernel. We keep the parts that define it (token
shift, a normalised decayed average of values, the sigmoid receptance gate) and let a
data-dependent forget gate f_t play the key's role: h_t = f_t h_{t-1} + (1 - f_t) v_t, a
convex combination that cannot overflow and runs on the project's HGRN recurrence. The
channel mixer is RWKV's unchanged: sigmoid(r) * W_v relu(W_k x)^2 with token shift.

Everything that crosses a token boundary is one (batch, hidden) vector per layer: the two
token-shift inputs, the recurrence state and the two membranes. They live stacked in one
`RecurrentCache` entry per layer, so decoding a token is O(1) in the text so far. Spikes
threshold exact values, so the prefill runs the recurrence step by step (the same rounding
as decoding; the backward is still chunk-parallel) and cached logits equal the full forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from simplified_slm.layers.lif import LIF, LIFBackend, ResetMechanism, Surrogate
from simplified_slm.layers.recurrent_cache import RecurrentCache
from simplified_slm.models.base import CausalLM, CausalLMOutput, normal_init, shifted_labels_loss
from simplified_slm.models.config import ModelConfig
from simplified_slm.ops.hgrn import fused_recurrent_hgrn

# order of the per-layer states stacked in the cache
_STATES = ("time_shift", "recurrence", "time_mem", "channel_shift", "channel_mem")


@dataclasses.dataclass
class SpikingConfig(ModelConfig):
    family: ClassVar[str] = "spiking"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(hidden_size=64, num_hidden_layers=2),
        "small": dict(hidden_size=256, num_hidden_layers=4),  # the transformer comparison's size
    }

    vocab_size: int = 256
    hidden_size: int = 256
    num_hidden_layers: int = 4
    intermediate_size: int | None = None  # channel mixer width; default 4 * hidden (RWKV)
    dropout: float = 0.0  # on the residual stream after each block (SpikeGPT: 0.03)
    tie_word_embeddings: bool = False
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    # LIF neurons; SpikeGPT: tau 2 (beta = 1 - 1/tau), threshold 1, atan surrogate (alpha 2)
    lif_beta: float = 0.5
    lif_threshold: float = 1.0
    surrogate: Surrogate = "atan"
    surrogate_slope: float | None = None  # atan alpha (default 2) / fast_sigmoid slope (default 25)
    reset_mechanism: ResetMechanism = "subtract"
    # snntorch: the library neuron (snn.Leaky); scan: the same equations without autograd per
    # token, 2-3x faster training, tested equal to snn.Leaky (spikes, membranes, gradients)
    lif_backend: LIFBackend = "snntorch"

    def validate(self) -> None:
        super().validate()
        for name in ("hidden_size", "num_hidden_layers"):
            if getattr(self, name) < 1:
                self._fail(name, f"must be positive, got {getattr(self, name)}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            self._fail("intermediate_size", f"must be positive, got {self.intermediate_size}")
        if not 0.0 <= self.dropout < 1.0:
            self._fail("dropout", f"must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.lif_beta <= 1.0:
            self._fail("lif_beta", f"is the membrane decay per token and must be in [0, 1], got {self.lif_beta}")
        if not (self.lif_threshold > 0 and self.lif_threshold < float("inf")):
            self._fail("lif_threshold", f"must be a positive finite number, got {self.lif_threshold}")
        if self.surrogate_slope is not None and not 0 < self.surrogate_slope < float("inf"):
            self._fail("surrogate_slope", f"must be a positive finite number, got {self.surrogate_slope}")
        if not 0 < self.norm_eps < 1:
            self._fail("norm_eps", f"must be in (0, 1), got {self.norm_eps}")
        if not 0 <= self.initializer_range < float("inf"):
            self._fail("initializer_range", f"must be a finite number >= 0, got {self.initializer_range}")

    @property
    def channel_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size


def _token_shift(x: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """x moved one token later: position t sees token t-1 (the cached last token at t=0)."""
    first = torch.zeros_like(x[:, :1]) if previous is None else previous[:, None]
    return torch.cat([first, x[:, :-1]], dim=1)


def _mix_ramp(hidden_size: int, exponent: float) -> torch.Tensor:
    """RWKV's token-shift init (i / C) ** exponent: channels range from mostly the previous
    token to mostly the current one, with later layers leaning on the current token."""
    return (torch.arange(hidden_size, dtype=torch.float32) / hidden_size) ** exponent


class TimeMix(nn.Module):
    """Token mixer: token shift, gated linear recurrence of values, receptance gate."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        # token-shift mixes: set by `SpikingForCausalLM.init_weights` (they depend on depth)
        self.mix_k = nn.Parameter(torch.empty(hidden_size))
        self.mix_v = nn.Parameter(torch.empty(hidden_size))
        self.mix_r = nn.Parameter(torch.empty(hidden_size))
        self.forget = nn.Linear(hidden_size, hidden_size, bias=False)
        self.value = nn.Linear(hidden_size, hidden_size, bias=False)
        self.receptance = nn.Linear(hidden_size, hidden_size, bias=False)
        self.output = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None, state: torch.Tensor | None,
                keep_state: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        previous = _token_shift(x, shift)
        f = self.forget(torch.lerp(previous, x, self.mix_k)).sigmoid()
        v = self.value(torch.lerp(previous, x, self.mix_v))
        r = self.receptance(torch.lerp(previous, x, self.mix_r)).sigmoid()
        h, final = fused_recurrent_hgrn((1 - f) * v, f, state, keep_state)
        return self.output(r * h), final


class ChannelMix(nn.Module):
    """RWKV's channel mixer: sigmoid(r) * W_v relu(W_k x)^2, inputs token-shifted."""

    def __init__(self, hidden_size: int, channel_size: int) -> None:
        super().__init__()
        self.mix_k = nn.Parameter(torch.empty(hidden_size))  # set by `SpikingForCausalLM.init_weights`
        self.mix_r = nn.Parameter(torch.empty(hidden_size))
        self.key = nn.Linear(hidden_size, channel_size, bias=False)
        self.value = nn.Linear(channel_size, hidden_size, bias=False)
        self.receptance = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        previous = _token_shift(x, shift)
        k = torch.relu(self.key(torch.lerp(previous, x, self.mix_k))).square()
        return self.receptance(torch.lerp(previous, x, self.mix_r)).sigmoid() * self.value(k)


class SpikingBlock(nn.Module):
    """Pre-LayerNorm SpikeGPT block; every mixer output passes through LIF neurons."""

    def __init__(self, config: SpikingConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        hidden = config.hidden_size
        lif = dict(beta=config.lif_beta, threshold=config.lif_threshold, surrogate=config.surrogate,
                   slope=config.surrogate_slope, reset_mechanism=config.reset_mechanism, backend=config.lif_backend)
        self.time_norm = nn.LayerNorm(hidden, eps=config.norm_eps)
        self.time_mix = TimeMix(hidden)
        self.time_lif = LIF(**lif)
        self.channel_norm = nn.LayerNorm(hidden, eps=config.norm_eps)
        self.channel_mix = ChannelMix(hidden, config.channel_size)
        self.channel_lif = LIF(**lif)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: RecurrentCache | None = None) -> torch.Tensor:
        stacked = cache.get(self.layer_idx) if cache is not None else None
        state = dict(zip(_STATES, stacked.unbind(1))) if stacked is not None else dict.fromkeys(_STATES)
        # Padded (left) positions feed zeros, so every state stays exactly zero until a
        # row's first real token and a padded row equals its solo run.
        keep = attention_mask[:, -x.shape[1]:, None].to(x.dtype) if attention_mask is not None else None

        a = self.time_norm(x) if keep is None else self.time_norm(x) * keep
        mixed, recurrence = self.time_mix(a, state["time_shift"], state["recurrence"], cache is not None)
        spikes, time_mem = self.time_lif(mixed, state["time_mem"])
        x = x + spikes

        b = self.channel_norm(x) if keep is None else self.channel_norm(x) * keep
        spikes, channel_mem = self.channel_lif(self.channel_mix(b, state["channel_shift"]), state["channel_mem"])
        x = self.dropout(x + spikes)

        if cache is not None:
            cache.set(self.layer_idx, torch.stack([a[:, -1], recurrence, time_mem, b[:, -1], channel_mem], dim=1))
        return x


class SpikingForCausalLM(CausalLM):
    config_class = SpikingConfig

    def __init__(self, config: SpikingConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # SpikeGPT's ln0: the embedding enters at unit scale, comparable to the spikes added to it
        self.embed_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.layers = nn.ModuleList(SpikingBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_weights()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """SpikeGPT / RWKV's init (std = `initializer_range`; layer l of L, C channels,
        ramp(e) = (c / C) ** e for channel c, rest = 1 - l / L, depth = l / max(1, L - 1)):

        | parameters                                        | initial value             |
        |---------------------------------------------------|---------------------------|
        | embed_tokens, every mixer projection, lm_head     | normal(0, std)            |
        | time mix: mix_k / mix_v / mix_r                   | ramp(rest) / ramp(rest) + 0.3 depth / ramp(rest / 2) |
        | channel mix: mix_k / mix_r                        | ramp(rest)                |
        | LayerNorm weight / bias                           | 1 / 0                     |

        The ramps let early layers lean on the previous token and later ones on the current
        token. A tied lm_head is the token embedding.
        """
        normal_init(self, self.config.initializer_range)
        hidden, num_layers = self.config.hidden_size, self.config.num_hidden_layers
        for layer_idx, block in enumerate(self.layers):
            depth = layer_idx / max(1, num_layers - 1)  # 0 at the first layer, 1 at the last
            rest = 1.0 - layer_idx / num_layers  # 1 at the first layer, -> 0
            time, channel = block.time_mix, block.channel_mix
            time.mix_k.copy_(_mix_ramp(hidden, rest))
            time.mix_v.copy_(_mix_ramp(hidden, rest) + 0.3 * depth)
            time.mix_r.copy_(_mix_ramp(hidden, 0.5 * rest))
            channel.mix_k.copy_(_mix_ramp(hidden, rest))
            channel.mix_r.copy_(_mix_ramp(hidden, rest))

    def make_cache(self, batch_size: int, max_length: int) -> RecurrentCache:
        return RecurrentCache(self.config.num_hidden_layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: RecurrentCache | None = None,
                use_cache: bool = False) -> CausalLMOutput:
        if use_cache and cache is None:
            cache = self.make_cache(input_ids.shape[0], 0)
        x = self.embed_norm(self.embed_tokens(input_ids))
        for layer in self.layers:
            x = layer(x, attention_mask, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        logits = self.lm_head(self.norm(x))
        loss = shifted_labels_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss, cache=cache)
