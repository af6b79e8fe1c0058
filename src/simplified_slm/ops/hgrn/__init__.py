"""HGRN linear recurrence h_t = f_t * h_{t-1} + i_t in three interchangeable forms.

All share one signature, `fn(i, f, initial_state=None, output_final_state=False) ->
(o, final_state)`, with time on the second-to-last dim ((B, T, D) or (B, H, T, D)):

- `naive_recurrent_hgrn`: the reference loop, differentiated by autograd.
- `chunk_hgrn`: chunk-parallel forward and backward in pure PyTorch, for training and
  prefill anywhere.
- `fused_recurrent_hgrn`: one sequential pass; a small C kernel on CPU (built on first
  use, see `native.py`), in-place stepping elsewhere. Bit-identical to the reference.

Each form is its own module; what they share (input checks, the flat (N, T, D) layout,
the exact step, the reversed-scan backward) is `common.py`.

`hgrn` picks the fastest exact form for its inputs; models call it. No Triton kernel: the
project targets CPU, and triton is never imported.
"""

import torch

from simplified_slm.ops.hgrn.chunk import chunk_hgrn
from simplified_slm.ops.hgrn.naive import naive_recurrent_hgrn
from simplified_slm.ops.hgrn.native import native_available
from simplified_slm.ops.hgrn.recurrent_fuse import fused_recurrent_hgrn


def hgrn(
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence in its fastest form here: the C kernel when it serves these inputs,
    else the chunk form for sequences and in-place stepping for single decode steps."""
    if native_available(i) or i.shape[-2:-1] == (1,):  # [-2:-1]: bad shapes reach the form's check
        return fused_recurrent_hgrn(i, f, initial_state, output_final_state)
    return chunk_hgrn(i, f, initial_state, output_final_state)


__all__ = ["chunk_hgrn", "fused_recurrent_hgrn", "hgrn", "naive_recurrent_hgrn"]
