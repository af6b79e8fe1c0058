"""Fused recurrent HGRN: one sequential pass over time, as FLA's `fused_recurrent_hgrn`.

On CPU with float inputs it runs the C kernel of `native.py` (one pass per direction, all
channels of a row together). Elsewhere it steps token by token in place, forward and
backward, which is still the cheapest form for decoding one or a few tokens. Both round
exactly like the naive reference, gradients included, so a decoded continuation equals the
full-sequence reference output.
"""

from __future__ import annotations

import torch

from simplified_slm.ops.hgrn.common import ScanFunction, run_flattened, step_scan
from simplified_slm.ops.hgrn.native import native_available, native_scan


def _step_scan(x: torch.Tensor, a: torch.Tensor, h: torch.Tensor, out: torch.Tensor, reverse: bool) -> None:
    """One exact step per token, in scan order."""
    length = x.shape[1]
    step_scan(x, a, h, out, range(length - 1, -1, -1) if reverse else range(length))


def _stepped_hgrn(i: torch.Tensor, f: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    return ScanFunction.apply(i, f, h0, _step_scan)


def fused_recurrent_hgrn(
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HGRN as one sequential pass; same contract as `naive_recurrent_hgrn`.

    Pass the returned final_state back as `initial_state` to continue a sequence.
    """
    scan = native_scan if native_available(i) else _stepped_hgrn
    return run_flattened(i, f, initial_state, output_final_state, scan)
