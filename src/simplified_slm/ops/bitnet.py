"""BitNet b1.58 quantisers and the BitLinear layer (ternary weights, 8-bit activations).

Training uses fake quantisation: the forward sees quantised values, the backward passes
gradients straight through (STE, `x + (q(x) - x).detach()`), so the float master weights
keep learning. Inference can `freeze()` a layer into int8 ternary codes plus one scale.
BitLinear multiplies integer levels by integer codes and divides once afterwards, so every
path (training, frozen float, frozen int8, transformers' BitNet) gives the same float32
output bit for bit; see `BitLinear`.

Scale convention (the seed's, and transformers' `weight_scale`): `scale` multiplies the
float value into the integer grid, so the dequantised value is `code / scale`.
"""

from __future__ import annotations

import weakref

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


class _ActivationLevels(torch.autograd.Function):
    """Per-token int8 levels of x (as floats) and their scale; backward: the STE.

    The STE pretends rounding is the identity on x * scale, so d levels / dx = scale.
    Nothing but the (tokens, 1) scale is saved for backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        scale = _absmax_scale(x)
        ctx.save_for_backward(scale)
        ctx.mark_non_differentiable(scale)
        return _int8_levels(x, scale), scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return grad * scale


class _WeightCodes(torch.autograd.Function):
    """Ternary codes of w (as floats) and the absmean scale; backward: the STE (d codes / dw = scale)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        scale = _absmean_scale(w)
        ctx.save_for_backward(scale)
        ctx.mark_non_differentiable(scale)
        return _ternarize(w, scale), scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return grad * scale


def _int8_matmul(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """x (M, K) int8 @ codes (N, K) int8 transposed: exact integer sums (int32 on CPU).

    torch._int_mm accepts any shape on CPU (checked down to M=1, K=7, N=5 with torch
    2.13); other devices impose shape rules we cannot test here, so they take the float
    path, which is also exact while |sum| < 2**24, i.e. K < 131072.
    """
    if x.device.type == "cpu":
        return torch._int_mm(x, codes.t())
    return F.linear(x.float(), codes.float())


class _SharedInputQuant:
    """Int8 levels and scales of the tensor the int8 path quantised last.

    Sibling projections read the same input tensor (q/k/v, gate/up), and at batch-1
    decoding the per-call overhead of quantising it dominates over the data, so doing it
    once instead of three times is worth a weak reference. A hit needs the very same
    tensor object at the same version counter: a freed, edited or different tensor never
    matches. The entry is one tuple, replaced in one assignment.
    """

    def __init__(self) -> None:
        self._entry: tuple[weakref.ref, int, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self._entry
        if entry is not None and entry[0]() is x and entry[1] == x._version:
            return entry[2], entry[3]
        levels, scale = activation_quant_int8(x)
        self._entry = (weakref.ref(x), x._version, levels, scale)
        return levels, scale


_shared_input_quant = _SharedInputQuant()


class BitLinear(nn.Linear):
    """Linear layer with ternary weights and 8-bit per-token activations (MatMul-free LM).

    forward: optional RMSNorm of the input (learnable weight, eps 1e-8 as in the
    MatMul-free reference; turn it off with `input_norm=False` for BitNet transformer
    families that place SubLN elsewhere), then

        y = F.linear(levels(x), codes(w)) / (x_scale * w_scale)

    with int8 levels and ternary codes held as floats and the STE for gradients. This is
    the seed's `F.linear(activation_quant(x), weight_quant(w))` with the two divisions
    moved after the matmul: a sum of integer products is exact in float32 (|sum| < 2**24)
    whatever order a kernel adds in, so training, the frozen float path, the frozen int8
    path (`torch._int_mm`) and transformers' packed BitLinear (same formula) all give
    bit-identical outputs in float32.

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
        self._inference_codes: tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None
        self._dense: tuple[tuple[int, int, torch.dtype | None], torch.Tensor] | None = None

    @property
    def frozen(self) -> bool:
        return self.weight_codes is not None

    @torch.no_grad()
    def freeze(self, int8: bool = False) -> None:
        """Switch to inference on stored ternary codes; drops the float weight (irreversible).

        int8=True multiplies int8 activations by the int8 codes with torch._int_mm;
        otherwise the codes are cast to float for F.linear. Both equal the training
        forward (see the class docstring).
        """
        if not self.frozen:
            self.weight_codes, self.weight_scale = ternary_codes(self.weight)
            self.weight = None
            self._inference_codes = self._dense = None
        self.int8 = int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.frozen and self.int8:
            x_int, x_scale = _shared_input_quant(x) if not torch.is_grad_enabled() else activation_quant_int8(x)
            y = _int8_matmul(x_int.reshape(-1, self.in_features), self.weight_codes)
            # Rescale in float32 (the integer sums exceed bf16's 8-bit mantissa); dividing
            # the int32 sums directly casts them exactly, without a separate copy.
            y = y.reshape(*x.shape[:-1], self.out_features) / (x_scale.float() * self.weight_scale.float())
            y = y.to(x.dtype)
        else:
            levels, x_scale = _ActivationLevels.apply(x)
            codes, w_scale = self._codes(x.dtype)
            y = F.linear(levels, codes) / (x_scale * w_scale)
        return y if self.bias is None else y + self.bias

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise SLMError(
                f"BitLinear expects inputs with last dim {self.in_features}, got shape "
                f"{tuple(x.shape)}; check the hidden size feeding this layer"
            )

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The dequantised activations (levels / scale): input norm (if any), then 8-bit quant, STE.

        Together with `dense_weight` this splits the layer into "what each token
        contributes" and "the matrix", which lets multi-head latent attention fold the
        matrix into its queries while caching one latent per token (`layers/mla.py`):
        `F.linear(quantize_input(x), dense_weight(x.dtype))` equals `forward(x)` up to
        float rounding.
        """
        self._check_input(x)
        if self.norm is not None:
            x = self.norm(x)
        levels, scale = _ActivationLevels.apply(x)
        return levels / scale

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The effective float weight codes / scale (trainable through the STE until frozen).

        Without autograd it is cached per weight version and dtype: MLA reads it at every
        decode step, and only the layers it is asked of ever hold the float copy.
        """
        if torch.is_grad_enabled():
            codes, scale = self._codes(dtype)
            return codes / scale
        source = self.weight_codes if self.frozen else self.weight
        key = (source.data_ptr(), source._version, dtype)
        if self._dense is None or self._dense[0] != key:
            codes, scale = self._codes(dtype)
            self._dense = (key, codes / scale)
        return self._dense[1]

    def _codes(self, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Ternary codes held as floats and their scale.

        Frozen: cast from the int8 buffers per call (caching a float copy would undo the
        memory saving). Otherwise, without autograd, cached per weight version: decoding
        one token would else re-quantise every weight matrix per token. The cache key is
        the storage and its version counter, which optimizer steps and `load_state_dict`
        bump; only edits through `.data` would go unnoticed.
        """
        if self.frozen:
            assert self.weight_codes is not None and self.weight_scale is not None
            dtype = dtype or self.weight_scale.dtype
            return self.weight_codes.to(dtype), self.weight_scale.to(dtype)
        if torch.is_grad_enabled():
            self._inference_codes = None
            return _WeightCodes.apply(self.weight)
        key = (self.weight.data_ptr(), self.weight._version)
        if self._inference_codes is None or self._inference_codes[0] != key:
            scale = _absmean_scale(self.weight)
            self._inference_codes = (key, (_ternarize(self.weight, scale), scale))
        return self._inference_codes[1]
