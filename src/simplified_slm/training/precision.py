"""Which dtype the training forward runs in: `train.precision` resolved for one device.

"auto" picks bf16 autocast only where the hardware multiplies bf16 natively, because that is
where it pays: on a GPU with bf16 support, and on a CPU with AVX512-BF16 or AMX (there a bf16
GEMM runs ~2x the float32 rate: 350-390 vs 150-190 GFLOP/s at the nanoGPT recipe's shapes on
a 2-core AMD EPYC). CPUs without them emulate bf16 and run it slower than float32 (2x slower
on the AVX-512 Xeons measured here), so "auto" keeps float32 there. Weights, gradients and the
optimizer stay float32 either way: autocast only changes the dtype matmuls compute in.
"""

from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16", "auto")  # see autocast_dtype


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX tiles: the CPU instructions oneDNN/MKL use for fast bf16 GEMMs."""
    cpu = torch.cpu
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in probes)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 when asked, or for 'auto' where the device computes bf16 natively; None means fp32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
    return None
