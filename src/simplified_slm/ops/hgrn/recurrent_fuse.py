"""Fused recurrent HGRN: one sequential pass over time, as FLA's `fused_recurrent_hgrn`.

On CPU with float32/float64 inputs it runs the C kernel of `native.py` (one pass per
direction, all channels of a row together). Elsewhere it steps token by token in place,
which is still the cheapest form for decoding one or a few tokens. Both round exactly like
the naive reference, so a decoded continuation equals the full-sequence reference output.
"""

from __future__ import annotations

import torch

from simplified_slm.ops.hgrn.chunk import scan_hgrn, stepped_scan
from simplified_slm.ops.hgrn.native import native_available, native_scan


def fused_recurrent_hgrn(
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HGRN as one sequential pass; same contract as `naive_recurrent_hgrn`.

    Pass the returned final_state back as `initial_state` to continue a sequence.
    """
    scan = native_scan if native_available(i) else stepped_scan
    return scan_hgrn(i, f, initial_state, output_final_state, scan)
