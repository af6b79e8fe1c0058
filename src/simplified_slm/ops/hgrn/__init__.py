"""HGRN linear recurrence h_t = f_t * h_{t-1} + i_t in three interchangeable forms.

All share one signature, `fn(i, f, initial_state=None, output_final_state=False) ->
(o, final_state)`, with time on the second-to-last dim ((B, T, D) or (B, H, T, D)):

- `naive_recurrent_hgrn`: the reference loop, differentiated by autograd.
- `chunk_hgrn`: chunk-parallel forward and backward, for training and prefill.
- `fused_recurrent_hgrn`: in-place stepping for decoding, bit-identical to the reference.

No Triton kernel: the project targets CPU, and triton is never imported.
"""

from simplified_slm.ops.hgrn.chunk import chunk_hgrn
from simplified_slm.ops.hgrn.naive import naive_recurrent_hgrn
from simplified_slm.ops.hgrn.recurrent_fuse import fused_recurrent_hgrn

__all__ = ["chunk_hgrn", "fused_recurrent_hgrn", "naive_recurrent_hgrn"]
