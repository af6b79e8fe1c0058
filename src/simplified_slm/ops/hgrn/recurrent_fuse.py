"""Step-by-step HGRN for decoding with a cached state.

Decoding feeds one (or a few) tokens at a time, where chunking has nothing to split: a
plain loop writing each step in place is the cheapest form, and it rounds exactly like
the naive reference, so a decoded continuation equals the full-sequence reference output.
It stays differentiable through the shared reversed-scan backward.
"""

from __future__ import annotations

import torch

from simplified_slm.ops.hgrn.chunk import scan_hgrn


def fused_recurrent_hgrn(
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HGRN stepped token by token; same contract as `naive_recurrent_hgrn`.

    Pass the returned final_state back as `initial_state` to continue a sequence.
    """
    return scan_hgrn(i, f, initial_state, output_final_state, chunked=False)
