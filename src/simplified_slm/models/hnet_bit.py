"""`hnet_bit`: the hierarchical MatMul-free model (H-Net with HGRN-Bit stacks).

H-Net (Hwang, Wang & Gu 2025, "Dynamic Chunking for End-to-End Hierarchical Sequence
Modeling") with every sequence mixer an HGRN-Bit stack (ternary BitLinear + linear
recurrence). One stage at width d_s:

    x ─ encoder (HGRN-Bit blocks, RMSNorm) ─ x̂ ─┬─ routing: p_t, b_t ─ downsample ─ pad to d_{s+1}
                                               │        inner stage (another H-Net stage, or the
                                               │        main network) over chunks, sliced to d_s
                                               │   dechunk: EMA over chunks, upsample, × ste(c_t)
                                               └─ residual_proj (zero-init) ──────────(+)
                                                     decoder (HGRN-Bit blocks, RMSNorm) ─ y

The model is embedding (bytes) → stage 0 → BitLinear LM head. Two stages nest a second
stage as stage 0's inner network. Widths grow inward as in the paper: the chunk vectors are
concatenated with a learned pad vector (zero-initialised) up to the next width and the
inner output is sliced back. The routing projections and the residual projection are
float `nn.Linear` (identity / zero initialisation, see `layers/routing.py`); every
other linear layer is a ternary BitLinear.

`aux_loss` = ratio_loss_weight × Σ_s ratio_loss_s (already weighted). After each full
forward, `model.last_compression` gives the achieved compression per stage (see there)
and `model.last_routing` the detached routing of each stage.

Padding: `attention_mask` may left-pad (generation) or right-pad; each row then gets the
result it gets alone (up to float rounding). Masks with holes are not supported.
Decoding with `HNetBitCache` costs O(1) amortised per byte; see `layers/hnet_cache.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from simplified_slm import metric_names as M
from simplified_slm.errors import SLMError
from simplified_slm.layers.bitlinear import BitLinear
from simplified_slm.layers.hgrn_bit import HGRNBitStack, mlp_width
from simplified_slm.layers.hnet_cache import HNetBitCache, put_rows, take_rows
from simplified_slm.layers.routing import RoutingModule
from simplified_slm.models.base import CausalLM, CausalLMOutput, normal_init, shifted_labels_loss
from simplified_slm.models.config import ModelConfig
from simplified_slm.ops.dynamic_chunking import (
    confidence_ste,
    downsample,
    ema_dechunk,
    ema_step,
    ratio_loss,
    upsample,
)


def _list(*values: Any) -> Any:
    return dataclasses.field(default_factory=lambda: list(values))


@dataclasses.dataclass
class HNetBitConfig(ModelConfig):
    """Widths and depths per level; the number of stages is len(encoder_layers).

    d_model[s] is the width of stage s (s = 0 is the byte level) and d_model[-1] that of
    the main network, so len(d_model) = stages + 1 and widths never shrink inward.
    encoder_layers[s] / decoder_layers[s] / target_ratio[s] belong to stage s (target_ratio
    = the paper's N: stage inputs per selected chunk); main_layers to the main network.

    router_bias_init (β): initial entries of a learned vector added to each router's input
    (`RoutingModule`), so that training starts with few boundaries (p ≈ 1/4 instead of
    ≈ 1/2) and the ratio loss raises p, selecting word starts first. 0 (the paper's router)
    is the default, so configs saved before the field existed load unchanged; the 1stage
    preset uses 1. Why and when it helps: docs/ARCHITECTURE.md, "Departure from the
    paper's router"; the measurements behind it: docs/NOTES.md.

    Presets against the flat baseline (multiply-accumulates per byte counted over every
    weight matrix, each level weighted by its share of positions at the target ratios):

    | model                        | d_model          | enc/dec/main      | params | MACs/byte |
    |------------------------------|------------------|-------------------|--------|-----------|
    | hgrn_bit "small" (flat)      | 256              | 4 layers          | 3.55M  | 3.47M     |
    | hnet_bit "1stage", N=6       | [256, 384]       | [1]/[1]/5         | 10.91M | 3.44M     |
    | hnet_bit "2stage", N=(3, 3)  | [256, 320, 448]  | [1, 1]/[1, 1]/2   | 10.20M | 3.56M     |
    """

    family: ClassVar[str] = "hnet_bit"
    # 1stage / 2stage: TinyStories experiments, compute per byte about equal to the flat
    # hgrn_bit "small" (see configs/ and docs); tiny: tests and smoke runs.
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(d_model=[64, 96], encoder_layers=[1], decoder_layers=[1], main_layers=2,
                     target_ratio=[4.0]),
        "1stage": dict(d_model=[256, 384], encoder_layers=[1], decoder_layers=[1], main_layers=5,
                       target_ratio=[6.0], router_bias_init=1.0),
        "2stage": dict(d_model=[256, 320, 448], encoder_layers=[1, 1], decoder_layers=[1, 1],
                       main_layers=2, target_ratio=[3.0, 3.0]),
    }

    vocab_size: int = 256
    d_model: list[int] = _list(256, 384)
    encoder_layers: list[int] = _list(1)
    decoder_layers: list[int] = _list(1)
    main_layers: int = 5
    target_ratio: list[float] = _list(6.0)
    ratio_loss_weight: float = 0.03
    num_heads: int = 1
    expand_ratio: int = 1
    hidden_ratio: int = 4
    use_lower_bound: bool = True
    router_bias_init: float = 0.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    @property
    def num_stages(self) -> int:
        return len(self.encoder_layers)

    def validate(self) -> None:
        super().validate()
        stages = self.num_stages
        if stages < 1:
            self._fail("encoder_layers", "needs one entry per stage (at least one stage)")
        for name in ("decoder_layers", "target_ratio"):
            if len(getattr(self, name)) != stages:
                self._fail(name, f"has {len(getattr(self, name))} entries but encoder_layers has {stages}; "
                                 "give one per stage")
        if len(self.d_model) != stages + 1:
            self._fail("d_model", f"has {len(self.d_model)} widths but {stages} stage(s) need {stages + 1} "
                                  "(one per stage, then the main network)")
        for name in ("encoder_layers", "decoder_layers"):
            if any(n < 1 for n in getattr(self, name)):
                self._fail(name, f"every entry must be >= 1, got {getattr(self, name)}")
        for name in ("main_layers", "num_heads", "expand_ratio", "hidden_ratio"):
            if getattr(self, name) < 1:
                self._fail(name, f"must be positive, got {getattr(self, name)}")
        if any(d < 1 for d in self.d_model):
            self._fail("d_model", f"widths must be positive, got {self.d_model}")
        if any(b < a for a, b in zip(self.d_model, self.d_model[1:])):
            self._fail("d_model", f"widths may not shrink toward the main network, got {self.d_model}")
        if any(n <= 1 for n in self.target_ratio):
            self._fail("target_ratio", f"every entry must be > 1 (inputs per chunk), got {self.target_ratio}")
        if self.ratio_loss_weight < 0:
            self._fail("ratio_loss_weight", f"must be >= 0, got {self.ratio_loss_weight}")
        for d in self.d_model:
            if (d * self.expand_ratio) % self.num_heads:
                self._fail("num_heads", f"width {d} * expand_ratio must be divisible by num_heads "
                                        f"({self.num_heads})")


def _stack(config: HNetBitConfig, width: int, num_layers: int) -> HGRNBitStack:
    """An HGRN-Bit stack of `config` at `width`; a single layer gets no forget-gate lower
    bound (its bound would be the constant 0)."""
    return HGRNBitStack(width, num_layers, mlp_width(width, config.hidden_ratio), config.expand_ratio,
                        config.num_heads, config.rms_norm_eps, config.use_lower_bound and num_layers > 1)


@dataclass
class StageRouting:
    """Detached routing of one stage after a full forward (for logging and printing)."""

    prob: torch.Tensor      # (B, T_s)
    boundary: torch.Tensor  # (B, T_s) bool
    mask: torch.Tensor      # (B, T_s) bool, real positions of this stage's input


class HNetStage(nn.Module):
    """Stage `level` of the hierarchy; the innermost level is the main network."""

    def __init__(self, config: HNetBitConfig, level: int) -> None:
        super().__init__()
        self.level = level
        self.width = config.d_model[level]
        self.is_main = level == config.num_stages
        if self.is_main:
            self.main = _stack(config, self.width, config.main_layers)
            return
        inner_width = config.d_model[level + 1]
        self.encoder = _stack(config, self.width, config.encoder_layers[level])
        self.router = RoutingModule(self.width, config.router_bias_init)
        self.pad = nn.Parameter(torch.zeros(inner_width - self.width)) if inner_width > self.width else None
        self.inner = HNetStage(config, level + 1)
        self.residual_proj = nn.Linear(self.width, self.width, bias=False)
        self.decoder = _stack(config, self.width, config.decoder_layers[level])

    def _widen(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is None:
            return x
        return torch.cat([x, self.pad.to(x.dtype).expand(*x.shape[:-1], -1)], dim=-1)

    # ---------------------------------------------------------------- full sequences
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: HNetBitCache | None,
                routing: list[StageRouting | None]) -> torch.Tensor:
        """x (B, T, d) with `mask` (B, T) real positions (None: all). With a cache (which
        must be fresh), leaves every state as it is after the last position."""
        if self.is_main:
            return self.main(x, mask, cache.main if cache is not None else None)
        st = cache.stages[self.level] if cache is not None else None
        hidden = self.encoder(x, mask, st.encoder if st is not None else None)
        route = self.router(hidden, mask)
        chunks = downsample(hidden, route.boundary)
        chunk_mask = None if bool(chunks.mask.all()) else chunks.mask
        inner = self.inner(self._widen(chunks.x), chunk_mask, cache, routing)[..., :self.width]
        smoothed, final = ema_dechunk(inner, route.prob.gather(1, chunks.src), chunk_mask,
                                      output_final_state=cache is not None)
        ste = confidence_ste(route.prob, route.boundary).to(smoothed.dtype)
        up = upsample(smoothed, chunks.slot) * ste[..., None]
        out = self.decoder(up + self.residual_proj(hidden), mask, st.decoder if st is not None else None)
        if cache is not None:
            cache.put_key_ema(self.level, None, route.key[:, -1], final)
            cache.chunks[self.level] += int(route.boundary.sum())
        real = mask if mask is not None else torch.ones_like(route.boundary)
        routing[self.level] = StageRouting(route.prob, route.boundary, real)
        return out

    # ------------------------------------------------------------------- decoding
    def step(self, x: torch.Tensor, cache: HNetBitCache, rows: torch.Tensor | None) -> torch.Tensor:
        """One new position for the batch rows `rows` (None: all): x (N, 1, d) -> (N, 1, d)."""
        if self.is_main:
            sub = take_rows(cache.main, rows)
            out = self.main(x, None, sub)
            put_rows(cache.main, rows, sub, cache.batch_size)
            cache.main_calls += 1
            return out
        st = cache.stages[self.level]
        enc = take_rows(st.encoder, rows)
        hidden = self.encoder(x, None, enc)
        put_rows(st.encoder, rows, enc, cache.batch_size)
        key, ema = cache.take_key_ema(self.level, rows)
        route = self.router(hidden, None, key)
        prob, boundary = route.prob[:, 0], route.boundary[:, 0]
        selected = boundary.nonzero().squeeze(1)
        if selected.numel():
            everyone = selected.numel() == boundary.numel()
            inner_rows = rows if everyone else (selected if rows is None else rows.index_select(0, selected))
            h_sel = hidden if everyone else hidden.index_select(0, selected)
            z = self.inner.step(self._widen(h_sel), cache, inner_rows)[:, 0, :self.width]
            if everyone:
                ema = ema_step(ema, z, prob)
            else:
                old = None if ema is None else ema.index_select(0, selected)
                new = ema_step(old, z, prob.index_select(0, selected))
                base = ema if ema is not None else new.new_zeros(hidden.shape[0], self.width)
                ema = base.index_copy(0, selected, new)
            cache.chunks[self.level] += selected.numel()
        if ema is None:  # cannot happen after a prefill: the first position is a boundary
            ema = hidden.new_zeros(hidden.shape[0], self.width, dtype=torch.promote_types(hidden.dtype, torch.float32))
        cache.put_key_ema(self.level, rows, route.key[:, -1], ema)
        smoothed = ema.to(hidden.dtype)[:, None]
        up = smoothed * confidence_ste(route.prob, route.boundary).to(hidden.dtype)[..., None]
        dec = take_rows(st.decoder, rows)
        out = self.decoder(up + self.residual_proj(hidden), None, dec)
        put_rows(st.decoder, rows, dec, cache.batch_size)
        return out


class HNetBitForCausalLM(CausalLM):
    """Byte embedding → H-Net stages (HGRN-Bit encoders/decoders/main) → BitLinear head."""

    config_class = HNetBitConfig

    def __init__(self, config: HNetBitConfig) -> None:
        super().__init__(config)
        width = config.d_model[0]
        self.embeddings = nn.Embedding(config.vocab_size, width)
        self.stage = HNetStage(config, 0)
        self.lm_head = BitLinear(width, config.vocab_size)
        self.init_weights()
        self.last_routing: list[StageRouting | None] = []
        self._compression: list[tuple[torch.Tensor, torch.Tensor]] = []

    def init_weights(self) -> None:
        """H-Net's init (std = `initializer_range`):

        | parameters                                          | initial value          |
        |-----------------------------------------------------|------------------------|
        | embeddings, every BitLinear's latent float weight   | normal(0, std)         |
        | router q/k projections                              | identity               |
        | router input bias (`router_bias_init` β, if any)    | β                      |
        | residual projection, width pad vector               | 0                      |
        | forget-gate lower bounds                            | 0                      |
        | RMSNorm weights                                     | 1                      |

        Identity routers make p_t the dissimilarity of consecutive encoder outputs, and the
        zero residual projection starts every stage's output as the dechunked inner output
        (the paper's choices); see `layers/routing.py` and `HNetBitConfig.router_bias_init`.
        """
        normal_init(self, self.config.initializer_range)
        for module in self.modules():
            if isinstance(module, HGRNBitStack) and module.lower_bounds is not None:
                nn.init.zeros_(module.lower_bounds)
            if isinstance(module, HNetStage) and not module.is_main:
                module.router.reset_parameters()
                nn.init.zeros_(module.residual_proj.weight)
                if module.pad is not None:
                    nn.init.zeros_(module.pad)

    def make_cache(self, batch_size: int, max_length: int) -> HNetBitCache:
        c = self.config
        return HNetBitCache.create(batch_size, list(c.encoder_layers), list(c.decoder_layers), c.main_layers)

    @property
    def last_compression(self) -> dict[str, float]:
        """Compression achieved by the last full forward, per stage s:

        - "hnet/stage{s}/bytes_per_chunk": real bytes / chunks selected by stage s (for
          stage 1 of a 2-stage model: bytes per stage-1 chunk, about N_0 * N_1),
        - "hnet/stage{s}/compression": stage s's input positions per selected chunk, to
          compare with target_ratio[s].
        Empty before the first forward; stepping a cache does not update it.
        """
        out: dict[str, float] = {}
        if not self._compression:
            return out
        num_bytes = float(self._compression[0][0])
        for s, (inputs, chunks) in enumerate(self._compression):
            chunks_f = max(float(chunks), 1.0)
            out[M.hnet_bytes_per_chunk(s)] = num_bytes / chunks_f
            out[M.hnet_compression(s)] = float(inputs) / chunks_f
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, cache: HNetBitCache | None = None,
                use_cache: bool = False) -> CausalLMOutput:
        """Logits for every position; `aux_loss` is the weighted ratio loss (None when
        stepping a cache). A multi-token input to a cache that already holds a sequence
        is decoded position by position."""
        batch, length = input_ids.shape
        if use_cache and cache is None:
            cache = self.make_cache(batch, 0)
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, -length:].bool()
            if bool(mask.all()):
                mask = None
            elif not bool(mask.any(1).all()):
                raise SLMError("attention_mask has a row with no real token; every row needs at least one")
        x = self.embeddings(input_ids)
        aux_loss = None
        if cache is not None and cache.length > 0:
            if mask is not None:
                raise SLMError("HNetBit cannot continue a cached sequence with padded positions; "
                               "padding may only come before the prompt (left padding)")
            hidden = torch.cat([self.stage.step(x[:, t:t + 1], cache, None) for t in range(length)], dim=1)
        else:
            routing: list[StageRouting | None] = [None] * self.config.num_stages
            hidden = self.stage(x, mask, cache, routing)
            self.last_routing = [StageRouting(r.prob.detach(), r.boundary.detach(), r.mask.detach())
                                 for r in routing if r is not None]
            losses = [ratio_loss(r.prob, r.boundary, n, r.mask)
                      for r, n in zip(routing, self.config.target_ratio) if r is not None]
            aux_loss = self.config.ratio_loss_weight * torch.stack(losses).sum()
            self._compression = [(r.mask.sum().detach(), r.boundary.sum().detach()) for r in self.last_routing]
        if cache is not None:
            cache.advance(length)
        logits = self.lm_head(hidden)
        loss = shifted_labels_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=aux_loss, cache=cache)
