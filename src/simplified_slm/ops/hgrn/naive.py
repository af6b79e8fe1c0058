"""Reference HGRN recurrence, and the input contract every HGRN form shares.

h_t = f_t * h_{t-1} + i_t, elementwise per channel. The loop below is the ground truth the
fast forms are tested against, so it is written as plainly as possible: one step per
token, autograd does the backward.

Shapes: time is the second-to-last dimension and every dimension before it is batch-like,
so both (B, T, D) and per-head (B, H, T, D) inputs work (channels never mix, so heads are
just more batch). The state has the input shape without the time dimension.
"""

from __future__ import annotations

import torch

from simplified_slm.errors import SLMError


def flatten_hgrn_inputs(
    i: torch.Tensor, f: torch.Tensor, initial_state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Check shapes and fold the leading batch-like dims into one, so kernels see (N, T, D).

    Shared by all forms so they reject the same inputs with the same message.
    """
    if i.dim() < 3:
        raise SLMError(
            f"HGRN inputs must be (batch, time, dim) or (batch, heads, time, dim), got shape "
            f"{tuple(i.shape)}; add the missing batch dimension with .unsqueeze(0)"
        )
    if f.shape != i.shape:
        raise SLMError(
            f"HGRN input i has shape {tuple(i.shape)} but forget gate f has {tuple(f.shape)}; "
            "project both from the same hidden states so they match"
        )
    if f.dtype != i.dtype:
        raise SLMError(
            f"HGRN input i is {i.dtype} but forget gate f is {f.dtype}; cast both to one dtype"
        )
    if i.shape[-2] == 0:
        raise SLMError("HGRN got an empty sequence (time dimension 0); pass at least one token")
    state_shape = i.shape[:-2] + i.shape[-1:]
    if initial_state is not None and initial_state.shape != state_shape:
        raise SLMError(
            f"HGRN initial_state has shape {tuple(initial_state.shape)} but inputs of shape "
            f"{tuple(i.shape)} need {tuple(state_shape)}; pass the final_state of the previous call"
        )
    t, d = i.shape[-2:]
    h0 = None if initial_state is None else initial_state.reshape(-1, d).to(i.dtype)
    return i.reshape(-1, t, d), f.reshape(-1, t, d), h0


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
