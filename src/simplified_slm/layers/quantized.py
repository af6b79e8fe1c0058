"""Weight-only quantized linear and embedding layers, and `quantize_model` to swap them in.

State-dict buffers (what a quantized safetensors folder holds), per module:
- q8_0 / q4_0 / q4_1: `codes`, `scales`, and `mins` (q4_1 only); see `ops/quant.py` for
  the layout. bf16 / fp16: `weight` in that dtype.
- `bias` (float32) when the original linear had one.
The scheme and group size are not in the state dict: a loader rebuilds the modules with
`QuantizedLinear(in, out, scheme, group_size, bias)` (empty buffers of the right shapes)
and then loads the tensors. A tied embedding + head (SmolLM2, GPT-2) keeps ONE packed copy:
the `QuantizedEmbedding` registers the very tensors of its `QuantizedLinear`, so the
state dict holds them under both names with one storage (as `nn.Linear` ties do), and
`models.base._unique_state` writes them once.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
import torch.nn as nn

from simplified_slm.errors import SLMError
from simplified_slm.layers.bitlinear import BitLinear
from simplified_slm.ops.quant import BLOCK, FLOAT_SCHEMES, QuantizedWeight, check_scheme, dequantize, quantize
from simplified_slm.ops.quant_native import quantized_matmul


def _empty_packed(scheme: str, rows: int, cols: int, group_size: int) -> QuantizedWeight:
    """Uninitialised buffers of the shapes and dtypes `quantize` gives a (rows, cols) weight."""
    empty = torch.empty(0, dtype=torch.float16)
    if scheme in FLOAT_SCHEMES:
        return QuantizedWeight(scheme, torch.empty(rows, cols, dtype=FLOAT_SCHEMES[scheme]), empty, empty,
                               (rows, cols), 0)
    codes = (torch.empty(rows, cols, dtype=torch.int8) if scheme == "q8_0"
             else torch.empty(rows, cols // 2, dtype=torch.uint8))
    scales = torch.empty(rows, cols // group_size, dtype=torch.float16)
    mins = scales.clone() if scheme == "q4_1" else empty
    return QuantizedWeight(scheme, codes, scales, mins, (rows, cols), group_size)


class _Packed(nn.Module):
    """Holds one packed weight as buffers (see the module docstring for their names)."""

    def _register_packed(self, qw: QuantizedWeight) -> None:
        self.scheme, self.group_size = qw.scheme, qw.group_size
        if qw.scheme in FLOAT_SCHEMES:
            self.register_buffer("weight", qw.codes)
            self.register_buffer("scales", qw.scales, persistent=False)
            self.register_buffer("mins", qw.mins, persistent=False)
            return
        self.register_buffer("codes", qw.codes)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("mins", qw.mins, persistent=qw.scheme == "q4_1")

    @property
    def packed_codes(self) -> torch.Tensor:
        return self.weight if self.scheme in FLOAT_SCHEMES else self.codes

    def packed(self, shape: tuple[int, int]) -> QuantizedWeight:
        return QuantizedWeight(self.scheme, self.packed_codes, self.scales, self.mins, shape, self.group_size)


class QuantizedLinear(_Packed):
    """y = x W^T (+ b) with W packed; forward runs the C kernel, else the float reference."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int = 32,
                 bias: bool = False, packed: QuantizedWeight | None = None) -> None:
        """Empty buffers of the right shapes (to load a state dict into), or `packed`'s tensors."""
        super().__init__()
        check_scheme(scheme, in_features, group_size)
        self.in_features, self.out_features = in_features, out_features
        self._register_packed(packed or _empty_packed(scheme, out_features, in_features, group_size))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_packed(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "QuantizedLinear":
        """Wrap already packed tensors (a GGUF's blocks, or a tied embedding's)."""
        out_features, in_features = qw.shape
        layer = cls(in_features, out_features, qw.scheme, qw.group_size or BLOCK, bias is not None, qw)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int = 32) -> "QuantizedLinear":
        return cls.from_packed(quantize(linear.weight, scheme, group_size), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quantized_matmul(x, self.packed_codes, self.scales, self.mins, self.scheme, self.group_size)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.packed((self.out_features, self.in_features)))

    def to_linear(self) -> nn.Linear:
        """The float32 `nn.Linear` this layer computes (its packed values expanded)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.packed_codes.device)
        linear.weight = nn.Parameter(self.dequantized_weight())
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.float().clone())
        return linear

    @property
    def qweight(self) -> torch.Tensor:
        """The packed codes under the name peft looks for on a quantized layer it wraps in a
        LoRA adapter (to put the adapter on the layer's device)."""
        return self.packed_codes

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme not in FLOAT_SCHEMES else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"
                f"{group}, bias={self.bias is not None}")


class QuantizedEmbedding(_Packed):
    """Token embedding whose rows are dequantized on lookup from a packed (vocab, dim) table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: str, group_size: int = 32,
                 packed: QuantizedWeight | None = None) -> None:
        super().__init__()
        check_scheme(scheme, embedding_dim, group_size)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self._register_packed(packed or _empty_packed(scheme, num_embeddings, embedding_dim, group_size))

    @classmethod
    def from_packed(cls, qw: QuantizedWeight) -> "QuantizedEmbedding":
        return cls(qw.shape[0], qw.shape[1], qw.scheme, qw.group_size or BLOCK, qw)

    @classmethod
    def sharing(cls, head: QuantizedLinear) -> "QuantizedEmbedding":
        """The embedding of a tied pair: the same tensors as `head`, not a copy."""
        return cls.from_packed(head.packed((head.out_features, head.in_features)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return dequantize(self.packed((self.num_embeddings, self.embedding_dim)), input_ids)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme not in FLOAT_SCHEMES else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme}{group}"


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` inside `model`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantizable_modules(model: nn.Module, scheme: str | None = None, group_size: int = 32,
                        skip: Iterable[str] = ()) -> dict[str, nn.Module]:
    """Float `nn.Linear`/`nn.Embedding` modules by name, minus `skip` fnmatch patterns
    (BitLinear keeps its own ternary quantization); with a `scheme`, each is checked to
    take it before the caller replaces any."""
    skip = tuple(skip)
    found = {name: module for name, module in model.named_modules()
             if isinstance(module, (nn.Linear, nn.Embedding)) and not isinstance(module, BitLinear)
             and not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)}
    if scheme is not None:
        for name, module in found.items():
            try:
                check_scheme(scheme, module.in_features if isinstance(module, nn.Linear) else module.embedding_dim,
                             group_size)
            except SLMError as err:
                raise SLMError(f"cannot quantize {name or 'the model'}: {err}") from None
    return found


def quantize_model(model: nn.Module, scheme: str, group_size: int = 32, skip: Iterable[str] = ()) -> nn.Module:
    """Replace, in place, every float `nn.Linear` by a `QuantizedLinear` and every
    `nn.Embedding` by a `QuantizedEmbedding`; an embedding tied to a linear (same weight
    tensor) becomes the packed tensors of that linear, not a second copy.

    BitLinear (ternary, its own quantization) is left alone, so this quantizes the float
    parts of bitnet / hgrn_bit. `skip` holds fnmatch patterns of module names to keep in
    float (e.g. "lm_head", "layers.0.*"). Returns `model`.
    """
    found = list(quantizable_modules(model, scheme, group_size, skip).items())  # all checked first
    packed: dict[int, QuantizedLinear] = {}  # weight storage -> its quantized linear, for ties
    for name, module in found:
        if isinstance(module, nn.Linear):
            layer = QuantizedLinear.from_linear(module, scheme, group_size)
            packed[module.weight.data_ptr()] = layer
            replace_module(model, name, layer)
    for name, module in found:
        if isinstance(module, nn.Embedding):
            head = packed.get(module.weight.data_ptr())
            layer = (QuantizedEmbedding.sharing(head) if head is not None
                     else QuantizedEmbedding.from_packed(quantize(module.weight, scheme, group_size)))
            replace_module(model, name, layer)
    return model
