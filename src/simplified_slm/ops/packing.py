"""2-bit packing of ternary codes: 4 weights per byte, each stored as code + 1 in {0, 1, 2}.

Two layouts:

- `pack_ternary` / `unpack_ternary`: our own, flat: byte j holds codes 4j..4j+3 of the
  flattened tensor, code 4j+k in bits 2k..2k+1; any shape, zero-padded to a multiple of 4.
- `pack_ternary_hf` / `unpack_ternary_hf`: transformers' `quant_method: "bitnet"` layout
  (integrations/bitnet.py): packed along the output dim, shape (ceil(out / 4), ...),
  the i-th quarter of the rows in bits 2i. Its `weight_scale` is our `ternary_codes` scale
  (dequantised weight = code / weight_scale).
"""

from __future__ import annotations

import torch

from simplified_slm.errors import SLMError

_SHIFTS = (0, 2, 4, 6)


def _offset_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes + 1 as uint8, after checking they really are ternary (else packing corrupts them)."""
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise SLMError(
            f"ternary packing needs integer codes, got {codes.dtype}; "
            "get them from simplified_slm.ops.bitnet.ternary_codes"
        )
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise SLMError(
            "ternary packing got codes outside {-1, 0, 1}; "
            "get them from simplified_slm.ops.bitnet.ternary_codes"
        )
    return (codes + 1).to(torch.uint8)


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.tensor(_SHIFTS, dtype=torch.uint8, device=device)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes of any shape into a flat uint8 tensor of ceil(numel / 4) bytes."""
    values = _offset_codes(codes).reshape(-1)
    pad = -values.numel() % 4
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    groups = values.view(-1, 4) << _shifts(values.device)
    return groups[:, 0] | groups[:, 1] | groups[:, 2] | groups[:, 3]


def unpack_ternary(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Exact inverse of `pack_ternary`: int8 codes of `shape`."""
    numel = 1
    for size in shape:
        numel *= size
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-numel // 4):
        raise SLMError(
            f"cannot unpack {packed.numel()} {packed.dtype} bytes (dim {packed.dim()}) into shape "
            f"{tuple(shape)}: it needs a flat uint8 tensor of {-(-numel // 4)} bytes; "
            "pass the shape the codes had when packed"
        )
    values = (packed.unsqueeze(1) >> _shifts(packed.device)) & 3
    return (values.reshape(-1)[:numel].to(torch.int8) - 1).reshape(shape)


def pack_ternary_hf(codes: torch.Tensor) -> torch.Tensor:
    """Pack (out_features, ...) codes in transformers' BitNet layout: (ceil(out / 4), ...) uint8.

    Rows beyond out_features are stored as 0 bits, as transformers' own packer leaves them,
    so the bytes match its output for any out_features.
    """
    if codes.dim() == 0:
        raise SLMError("transformers' BitNet packing needs at least one dimension; got a scalar")
    values = _offset_codes(codes)
    rows = -(-values.shape[0] // 4)
    pad = 4 * rows - values.shape[0]
    if pad:
        values = torch.cat([values, values.new_zeros(pad, *values.shape[1:])])
    quarters = values.view(4, rows, *values.shape[1:])
    packed = quarters[0].clone()
    for q in range(1, 4):
        packed |= quarters[q] << _SHIFTS[q]
    return packed


def unpack_ternary_hf(packed: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
    """Inverse of `pack_ternary_hf`: int8 codes (out_features, ...).

    out_features defaults to 4 * packed.shape[0], the only size transformers' BitLinear
    loads; pass it when the original row count was not a multiple of 4.
    """
    if packed.dtype != torch.uint8 or packed.dim() == 0:
        raise SLMError(
            f"transformers' BitNet weights are uint8 with at least one dimension, got "
            f"{packed.dtype} of shape {tuple(packed.shape)}; pass the packed `weight` tensor"
        )
    rows = packed.shape[0]
    out = 4 * rows if out_features is None else out_features
    if not 4 * rows - 3 <= out <= 4 * rows:
        raise SLMError(
            f"packed BitNet weight with {rows} rows holds {4 * rows - 3}..{4 * rows} output "
            f"features, not {out}; pass the layer's out_features"
        )
    quarters = [(packed >> shift) & 3 for shift in _SHIFTS]
    return (torch.cat(quarters)[:out].to(torch.int8) - 1)
