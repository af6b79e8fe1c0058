"""What every HGRN form shares: the input checks, the flat (N, T, D) layout, the exact step.

Shapes: time is the second-to-last dimension and every dimension before it is batch-like,
so both (B, T, D) and per-head (B, H, T, D) inputs work (channels never mix, so heads are
just more batch). The state has the input shape without the time dimension. Each form
checks and flattens its inputs here, so all of them reject the same inputs with the same
message, then runs its own scan over (N, T, D).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from simplified_slm.errors import SLMError

# scan(x, a, h, out, reverse): write out[:, t] = a[:, t] * (previous output, or h) + x[:, t]
# in scan order (increasing t, or decreasing when `reverse`)
Scan = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool], None]


def flatten_hgrn_inputs(
    i: torch.Tensor, f: torch.Tensor, initial_state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Check shapes and fold the leading batch-like dims into one, so kernels see (N, T, D)."""
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


def run_flattened(
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    scan: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Entry of the fast forms: check and flatten to (N, T, D), run `scan`, unflatten.

    The final state is cloned out of the output so a decoding cache holding it does not
    keep the whole prefill output alive.
    """
    i3, f3, h0 = flatten_hgrn_inputs(i, f, initial_state)
    o3 = scan(i3, f3, h0)
    final = None
    if output_final_state:
        final = o3[:, -1].clone().reshape(i.shape[:-2] + i.shape[-1:])
    return o3.reshape(i.shape), final


def step_scan(x: torch.Tensor, a: torch.Tensor, h: torch.Tensor, out: torch.Tensor, steps: range) -> torch.Tensor:
    """out[:, t] = a[:, t] * h + x[:, t] for t in `steps`, h being the previous output.

    Multiply then add, like the naive reference, so stepping matches it bit for bit
    (addcmul fuses into an FMA and rounds differently). Returns the last state.
    """
    for t in steps:
        out_t = out[:, t]
        torch.mul(a[:, t], h, out=out_t)
        out_t.add_(x[:, t])
        h = out_t
    return h


class ScanFunction(torch.autograd.Function):
    """h_t = f_t * h_{t-1} + i_t on (N, T, D) by a form's `scan`, with the reversed scan as backward.

    Backward: g_t = dO_t + f_{t+1} g_{t+1} (the gradient reaching h_t, the same recurrence
    run backwards in time), then di_t = g_t, df_t = g_t * h_{t-1}, d initial_state =
    f_0 * g_0. Autograd never records the loop; only f, the output and h0 are saved.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        i: torch.Tensor,
        f: torch.Tensor,
        h0: torch.Tensor | None,
        scan: Scan,
    ) -> torch.Tensor:
        o = torch.empty(i.shape, dtype=i.dtype, device=i.device)
        scan(i, f, torch.zeros_like(i[:, 0]) if h0 is None else h0, o, False)
        ctx.scan = scan
        ctx.save_for_backward(f, o, h0)
        return o

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, do: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        f, o, h0 = ctx.saved_tensors
        g = torch.empty(do.shape, dtype=do.dtype, device=do.device)
        g[:, -1] = do[:, -1]
        # Step t of the reversed scan uses the gate of token t+1: f[:, 1:] lines up with
        # do[:, :-1] as views, so nothing is shifted into a copy.
        ctx.scan(do[:, :-1], f[:, 1:], g[:, -1], g[:, :-1], True)

        df = None
        if ctx.needs_input_grad[1]:
            df = torch.empty_like(g)
            torch.mul(g[:, 1:], o[:, :-1], out=df[:, 1:])
            if h0 is None:
                df[:, 0].zero_()
            else:
                torch.mul(g[:, 0], h0, out=df[:, 0])
        dh0 = f[:, 0] * g[:, 0] if ctx.needs_input_grad[2] else None
        di = g if ctx.needs_input_grad[0] else None
        return di, df, dh0, None
