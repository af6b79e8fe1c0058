"""BitNet b1.58 quantisers: absmean ternary weights, per-token absmax int8 activations, STE.

Training uses fake quantisation: the forward sees quantised values, the backward passes
gradients straight through (STE, `x + (q(x) - x).detach()`), so the float master weights
keep learning. These are the project's only quantisers; the layer built on them is
`layers/bitlinear.py::BitLinear`, which multiplies integer levels by integer codes and
divides once afterwards (`int8_linear` is its frozen int8 path).

Scale convention (the MatMul-free reference's, and transformers' `weight_scale`): `scale` multiplies the
float value into the integer grid, so the dequantised value is `code / scale`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def absmean_scale(w: torch.Tensor) -> torch.Tensor:
    """1 / mean|w|: the factor that maps a weight matrix onto the ternary grid."""
    return 1.0 / w.abs().mean().clamp(min=1e-5)


def ternarize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Ternary codes of w (held as floats in {-1, 0, 1}): round(w * scale) clipped to [-1, 1]."""
    return (w * scale).round().clamp(-1, 1)


def weight_quant(w: torch.Tensor) -> torch.Tensor:
    """Absmean ternary fake-quantisation: values in {-1, 0, 1} / scale, scale = 1/mean|w|.

    Not idempotent: the mean |.| of the result is smaller than that of w whenever some
    weights round to 0, so quantising it again yields a different scale. Keep
    `ternary_codes` (codes and scale stored apart) when the exact weights must survive.
    """
    scale = absmean_scale(w)
    return ternarize(w, scale) / scale


def ternary_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes (int8 in {-1, 0, 1}) and the 0-dim scale with codes / scale == weight_quant(w).

    Storing the scale next to the codes is what makes export lossless; recovering it from
    the dequantised tensor would shrink it (see `weight_quant`).
    """
    scale = absmean_scale(w)
    return ternarize(w, scale).to(torch.int8), scale


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


class _ScaledSTE(torch.autograd.Function):
    """Quantised values of x (as floats) and their scale; backward: the STE.

    `scale_of(x)` gives the scale (per token for activations, one for a weight) and
    `quantize(x, scale)` rounds x * scale onto the integer grid. The STE pretends rounding is
    the identity on x * scale, so d values / dx = scale. Unlike `straight_through`, the
    forward returns the quantised values themselves (x + (q - x) can round off q) and only
    the scale is saved for backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale_of: Callable[[torch.Tensor], torch.Tensor],  # type: ignore[override]
                quantize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        scale = scale_of(x)
        ctx.save_for_backward(scale)
        ctx.mark_non_differentiable(scale)
        return quantize(x, scale), scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return grad * scale, None, None


def activation_levels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 levels of x (as floats) and their scales, with the STE."""
    return _ScaledSTE.apply(x, _absmax_scale, _int8_levels)


def weight_levels(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes of w (as floats) and the absmean scale, with the STE."""
    return _ScaledSTE.apply(w, absmean_scale, ternarize)


def _int8_matmul(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """x (M, K) int8 @ codes (N, K) int8 transposed: exact integer sums (int32 on CPU).

    torch._int_mm accepts any shape on CPU (checked down to M=1, K=7, N=5 with torch
    2.13); other devices impose shape rules we cannot test here, so they take the float
    path, which is also exact while |sum| < 2**24, i.e. K < 131072.
    """
    if x.device.type == "cpu":
        return torch._int_mm(x, codes.t())
    return F.linear(x.float(), codes.float())


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """BitLinear's frozen int8 forward: quantise x per token, integer matmul, one division.

    `scale` is the weight scale (0-dim) or one per output column (stacked siblings); both
    give every column the same float32 product x_scale * w_scale, so the result equals
    the fake-quant forward bit for bit. x is flattened to 2-D *before* quantising:
    inductor (torch 2.13) lowers the (1, K) view of a quantised (1, 1, K) tensor with a
    row stride of 0, which CPU `_int_mm` silently misreads, so a compiled decode step
    must hand it a freshly made 2-D tensor.
    """
    x_int, x_scale = activation_quant_int8(x.reshape(-1, x.shape[-1]))
    # Rescale in float32 (the integer sums exceed bf16's 8-bit mantissa); dividing the
    # int32 sums directly casts them exactly, without a separate copy.
    y = _int8_matmul(x_int, codes) / (x_scale.float() * scale.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], codes.shape[0])
