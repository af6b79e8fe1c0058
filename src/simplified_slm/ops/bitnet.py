"""BitNet b1.58 quantisers and the BitLinear layer (ternary weights, 8-bit activations).

Training uses fake quantisation: the forward sees quantised values, the backward passes
gradients straight through (STE, `x + (q(x) - x).detach()`), so the float master weights
keep learning. Inference can `freeze()` a layer into int8 ternary codes plus one scale.

Scale convention (the seed's, and transformers' `weight_scale`): `scale` multiplies the
float value into the integer grid, so the dequantised value is `code / scale`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simplified_slm.errors import SLMError


def _absmean_scale(w: torch.Tensor) -> torch.Tensor:
    return 1.0 / w.abs().mean().clamp(min=1e-5)


def _ternarize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w * scale).round().clamp(-1, 1)


def weight_quant(w: torch.Tensor) -> torch.Tensor:
    """Absmean ternary fake-quantisation: values in {-1, 0, 1} / scale, scale = 1/mean|w|.

    Not idempotent: the mean |.| of the result is smaller than that of w whenever some
    weights round to 0, so quantising it again yields a different scale. Keep
    `ternary_codes` (codes and scale stored apart) when the exact weights must survive.
    """
    scale = _absmean_scale(w)
    return _ternarize(w, scale) / scale


def ternary_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes (int8 in {-1, 0, 1}) and the 0-dim scale with codes / scale == weight_quant(w).

    Storing the scale next to the codes is what makes export lossless; recovering it from
    the dequantised tensor would shrink it (see `weight_quant`).
    """
    scale = _absmean_scale(w)
    return _ternarize(w, scale).to(torch.int8), scale


def _absmax_scale(x: torch.Tensor) -> torch.Tensor:
    return 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)


def _int8_levels(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # in place on the fresh product: one allocation instead of three on the hot path
    return (x * scale).round_().clamp_(-128, 127)


def activation_quant(x: torch.Tensor) -> torch.Tensor:
    """Per-token (last dim) absmax fake-quantisation to the int8 grid.

    Per token rather than per tensor so one outlier token does not crush the resolution
    of every other token in the batch.
    """
    scale = _absmax_scale(x)
    return _int8_levels(x, scale) / scale


def activation_quant_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 activations and per-token scales (shape (..., 1)) for integer matmuls.

    Same grid as `activation_quant`: levels / scale equals activation_quant(x).
    """
    scale = _absmax_scale(x)
    return _int8_levels(x, scale).to(torch.int8), scale


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Forward value `quantized`, gradient of the identity w.r.t. `x`.

    Rounding has zero gradient almost everywhere; the STE pretends quantisation is the
    identity in the backward so the latent float weights still get a training signal.
    """
    return x + (quantized - x).detach()


class _QuantizeSTE(torch.autograd.Function):
    """Forward `quantize(x)`, backward the identity: `straight_through` as a single op.

    Same gradient as `x + (q - x).detach()`, but the forward value is exactly q (no
    rounding from the add/sub pair), two passes over the tensor fewer, and nothing is
    saved for backward. This is the training hot path of every BitLinear.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: bool) -> torch.Tensor:  # type: ignore[override]
        return weight_quant(x) if weight else activation_quant(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def _int8_matmul(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """x (M, K) int8 @ codes (N, K) int8 transposed, as exact integer-valued float32.

    torch._int_mm accepts any shape on CPU (checked down to M=1, K=7, N=5 with torch
    2.13); other devices impose shape rules we cannot test here, so they take the float
    path, which is also exact while |sum| < 2**24, i.e. K < 131072.
    """
    if x.device.type == "cpu":
        return torch._int_mm(x, codes.t()).float()
    return F.linear(x.float(), codes.float())


class BitLinear(nn.Linear):
    """Linear layer with ternary weights and 8-bit per-token activations (MatMul-free LM).

    forward: optional RMSNorm of the input (learnable weight, eps 1e-8 as in the
    MatMul-free reference; turn it off with `input_norm=False` for BitNet transformer
    families that place SubLN elsewhere), then activation_quant and weight_quant through
    the STE, then F.linear.

    `freeze()` replaces the float weight by int8 ternary codes and their scale (buffers
    `weight_codes`, `weight_scale`) for inference; to load a frozen state dict, build the
    layer and call `freeze()` first so the buffers exist.
    """

    weight_codes: torch.Tensor | None
    weight_scale: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        input_norm: bool = True,
        eps: float = 1e-8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.norm = nn.RMSNorm(in_features, eps=eps, device=device, dtype=dtype) if input_norm else None
        self.register_buffer("weight_codes", None)
        self.register_buffer("weight_scale", None)
        self.int8 = False
        self._inference_weight: tuple[tuple[int, int], torch.Tensor] | None = None

    @property
    def frozen(self) -> bool:
        return self.weight_codes is not None

    @torch.no_grad()
    def freeze(self, int8: bool = False) -> None:
        """Switch to inference on stored ternary codes; drops the float weight (irreversible).

        int8=True multiplies int8 activations by the int8 codes with torch._int_mm and
        rescales once per output; otherwise the codes are cast to float for F.linear.
        Both agree with the fake-quantised forward up to float rounding.
        """
        if not self.frozen:
            self.weight_codes, self.weight_scale = ternary_codes(self.weight)
            self.weight = None
        self.int8 = int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise SLMError(
                f"BitLinear expects inputs with last dim {self.in_features}, got shape "
                f"{tuple(x.shape)}; check the hidden size feeding this layer"
            )
        if self.norm is not None:
            x = self.norm(x)
        if self.frozen:
            return self._frozen_forward(x)
        return F.linear(_QuantizeSTE.apply(x, False), self._quantized_weight(), self.bias)

    def _quantized_weight(self) -> torch.Tensor:
        """Fake-quantised weight; without autograd (generation) it is cached per weight version.

        Decoding one token would otherwise re-quantise every weight matrix per token. The
        cache key is the storage and its version counter, which optimizer steps and
        `load_state_dict` bump; only edits through `.data` would go unnoticed.
        """
        if torch.is_grad_enabled():
            self._inference_weight = None
            return _QuantizeSTE.apply(self.weight, True)
        key = (self.weight.data_ptr(), self.weight._version)
        if self._inference_weight is None or self._inference_weight[0] != key:
            self._inference_weight = (key, weight_quant(self.weight))
        return self._inference_weight[1]

    def _frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.weight_codes is not None and self.weight_scale is not None
        if self.int8:
            x_int, x_scale = activation_quant_int8(x)
            y = _int8_matmul(x_int.reshape(-1, self.in_features), self.weight_codes)
            # Rescale in float32: the integer sums exceed bf16's 8-bit mantissa.
            y = y.reshape(*x.shape[:-1], self.out_features) / (x_scale.float() * self.weight_scale.float())
            y = y.to(x.dtype)
        else:
            # same operation order as the fake-quant forward, so the two agree bit for bit
            y = F.linear(activation_quant(x), self.weight_codes.to(x.dtype) / self.weight_scale)
        return y if self.bias is None else y + self.bias
