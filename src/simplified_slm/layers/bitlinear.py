"""BitLinear: the ternary-weight, 8-bit-activation linear layer of BitNet b1.58.

Inference can `freeze()` a layer into int8 ternary codes plus one scale. BitLinear
multiplies integer levels by integer codes and divides once afterwards, so every path
(training, frozen float, frozen int8, transformers' BitNet) gives the same float32 output
bit for bit; see `BitLinear`. Frozen int8 projections that read one input (q/k/v,
gate/up) run as one stacked matmul, still bit for bit; see `sibling_projections`. The
quantisers themselves are functions in `ops/bitnet.py`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from simplified_slm.errors import SLMError
from simplified_slm.ops.bitnet import (
    absmean_scale,
    activation_levels,
    int8_linear,
    ternarize,
    ternary_codes,
    weight_levels,
)


class _Stack(NamedTuple):
    """Ternary codes of sibling BitLinears stacked along the output dim, one scale per row."""

    key: tuple[int, ...]
    codes: torch.Tensor  # (sum of out_features, in_features) int8
    scales: torch.Tensor  # (sum of out_features,) float32
    sizes: list[int]


def _stack_key(layers: Sequence["BitLinear"]) -> tuple[int, ...]:
    """Storage address and version of every code and scale buffer: changes whenever one is
    replaced (`load_packed`, `.to()`), edited in place (`load_state_dict`) or re-frozen."""
    return tuple(v for layer in layers for t in (layer.weight_codes, layer.weight_scale)
                 for v in (t.data_ptr(), t._version))


@torch.inference_mode(False)
def _build_stack(layers: Sequence["BitLinear"]) -> _Stack:
    """Concatenate the codes once and make each layer's `weight_codes` a view of the result,
    so the stack costs no memory and the state dict keeps its names and shapes.

    Built outside inference mode even when called inside it: the buffers must stay normal
    tensors, which `load_state_dict` can write and whose versions `_stack_key` reads.
    """
    codes = torch.cat([layer.weight_codes for layer in layers])
    sizes = [layer.out_features for layer in layers]
    scales = torch.cat([layer.weight_scale.float().reshape(1).expand(n) for layer, n in zip(layers, sizes)])
    for layer, rows in zip(layers, codes.split(sizes)):
        layer.weight_codes = rows
    return _Stack(_stack_key(layers), codes, scales, sizes)


def _stackable(layer: nn.Module, in_features: int) -> bool:
    """A frozen int8 BitLinear that multiplies its raw input: no input norm, no bias."""
    return (isinstance(layer, BitLinear) and layer.frozen and layer.int8 and layer.norm is None
            and layer.bias is None and layer.in_features == in_features)


def _stacked(layers: Sequence[nn.Module]) -> _Stack | None:
    """The stack of `layers` if they can run as one int8 matmul (all `_stackable`, autograd
    off), else None.

    The stack lives on the first layer and is rebuilt when any buffer changes. While
    torch.compile traces, the key (storage addresses) cannot be read, so the stack the last
    eager call checked is used as is, or the layers run one by one when there is none yet:
    `generate(compile=True)` runs the prompt eagerly before every compiled decode, which
    refreshes it. Buffers made inside `torch.inference_mode` (a model frozen there) have no
    version counter to watch, so they are not stacked.
    """
    first = layers[0]
    if torch.is_grad_enabled() or not all(_stackable(layer, first.in_features) for layer in layers):
        return None
    stack = first._stack
    if torch.compiler.is_compiling():
        return stack
    if any(layer.weight_codes.is_inference() or layer.weight_scale.is_inference() for layer in layers):
        return None
    if stack is None or stack.key != _stack_key(layers):
        stack = first._stack = _build_stack(layers)
    return stack


def sibling_projections(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]` for projections that read one input (q/k/v, gate/up).

    Frozen int8 BitLinears run as one: a single activation quantisation, `_int_mm` and
    rescale instead of one each per layer, which matters because per-call overhead, not
    data, dominates batch-1 decoding on CPU. Quantising once is exact (the inputs are the
    same tensor) and each output column is the same integer sum divided by the same
    product as in its own layer, so the outputs are bit-identical to the separate calls.
    Any other layers (nn.Linear, fake-quant or float-frozen BitLinear) run one by one.

    The parts are made contiguous, as separate outputs would be: on a strided column
    slice torch's CPU SiLU takes its scalar loop, whose last bit differs from the
    vectorised one. A decode step's single row is contiguous already (no copy).
    """
    stack = _stacked(layers)
    if stack is None:
        return [layer(x) for layer in layers]
    layers[0]._check_input(x)
    return [part.contiguous() for part in int8_linear(x, stack.codes, stack.scales).split(stack.sizes, dim=-1)]


class BitLinear(nn.Linear):
    """Linear layer with ternary weights and 8-bit per-token activations (MatMul-free LM).

    forward: optional RMSNorm of the input (learnable weight, eps 1e-8 as in the
    MatMul-free reference; turn it off with `input_norm=False` for BitNet transformer
    families that place SubLN elsewhere), then

        y = F.linear(levels(x), codes(w)) / (x_scale * w_scale)

    with int8 levels and ternary codes held as floats and the STE for gradients. This is
    the MatMul-free reference's `F.linear(activation_quant(x), weight_quant(w))` with the two divisions
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
        self._stack: _Stack | None = None  # set by `sibling_projections` on the first of a group

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
            y = int8_linear(x, self.weight_codes, self.weight_scale)
        else:
            levels, x_scale = activation_levels(x)
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
        levels, scale = activation_levels(x)
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
            return weight_levels(self.weight)
        if torch.compiler.is_compiling() and self._inference_codes is not None:
            return self._inference_codes[1]  # storage addresses cannot be traced; see `_stacked`
        key = (self.weight.data_ptr(), self.weight._version)
        if self._inference_codes is None or self._inference_codes[0] != key:
            scale = absmean_scale(self.weight)
            self._inference_codes = (key, (ternarize(self.weight, scale), scale))
        return self._inference_codes[1]
