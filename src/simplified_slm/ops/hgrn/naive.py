"""Reference HGRN recurrence: h_t = f_t * h_{t-1} + i_t, elementwise per channel.

The loop below is the ground truth the fast forms are tested against, so it is written as
plainly as possible: one step per token, autograd does the backward. Shapes and input
checks are those of every form (`common.py`).
"""

from __future__ import annotations

import torch

from simplified_slm.ops.hgrn.common import flatten_hgrn_inputs


def naive_recurrent_hgrn(
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequential reference: one Python step per token, differentiated by autograd.

    Returns (o, final_state): o holds h_t for every t (same shape as i); final_state is
    h_{T-1} without the time dimension, or None unless `output_final_state`.
    """
    i3, f3, h0 = flatten_hgrn_inputs(i, f, initial_state)
    h = torch.zeros_like(i3[:, 0]) if h0 is None else h0
    # unbind (not i3[:, t]) so the backward stacks the step gradients once instead of
    # scattering each step into a fresh full-size zero tensor.
    steps = []
    for i_t, f_t in zip(i3.unbind(1), f3.unbind(1)):
        h = f_t * h + i_t
        steps.append(h)
    o = torch.stack(steps, dim=1).reshape(i.shape)
    final = h.reshape(i.shape[:-2] + i.shape[-1:]) if output_final_state else None
    return o, final
