"""Leaky integrate-and-fire neurons stepped over the token axis, with surrogate gradients.

The equations are snntorch's `Leaky` (its default `reset_delay=True`): with input current
I_t, membrane U_t, threshold θ, decay β and the detached reset r_t,

    r_t = H(U_{t-1} - θ)                  the neuron fired at the previous step
    U_t = β U_{t-1} + I_t - r_t θ         reset by subtraction
    U_t = β (1 - r_t) U_{t-1} + I_t       reset to zero
    S_t = H(U_t - θ)                      forward: Heaviside; backward: surrogate σ'(U_t - θ)

Two backends compute the same spikes and membranes (tested bit for bit) and the same
gradients (tested to float rounding):

- `snntorch`: `snn.Leaky` called once per token, the library's own neuron.
- `scan`: the same recurrence as 4 in-place ops per token without autograd, and a
  backward that is a single linear scan. Because r is detached, U is linear in I once the
  spikes are known, so the gradient reaching U_t is g_t = dS_t σ'(U_t - θ) + a_{t+1} g_{t+1}
  with a_t = β (subtract) or β (1 - r_t) (zero), and dI_t = g_t; that reversed
  recurrence runs chunk-parallel on `ops.hgrn`. snntorch records ~12 autograd ops per token
  per neuron layer. Measured on one CPU thread: one neuron layer at (batch 16, 128 tokens,
  128 channels) ~110 ms forward + backward against ~12 ms; a whole training step of the
  `small` spiking model (4 x 256, batch 16) 950 vs 445 ms at 128 tokens and 1440 vs 450 ms
  at 256 (the transformer of the same size: ~400 ms). So `scan` is the default and
  `snntorch` the reference.

The forward is inherently sequential (each spike depends on the previous reset), so both
backends loop over tokens; a decoding step is the same loop with one token, which is what
makes cached generation equal the full forward.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
from torch import nn

from simplified_slm import metric_names as M
from simplified_slm.ops.hgrn import hgrn

Surrogate = Literal["atan", "fast_sigmoid"]
ResetMechanism = Literal["subtract", "zero"]
LIFBackend = Literal["scan", "snntorch"]

# snntorch's defaults: atan(alpha=2.0), fast_sigmoid(slope=25)
DEFAULT_SLOPES: dict[str, float] = {"atan": 2.0, "fast_sigmoid": 25.0}


def surrogate_grad(u: torch.Tensor, surrogate: Surrogate, slope: float) -> torch.Tensor:
    """dS/dU of snntorch's surrogates at u = U - θ (the forward is always the Heaviside step)."""
    if surrogate == "atan":
        return slope / 2 / (1 + (math.pi / 2 * slope * u).pow(2))
    return 1.0 / (slope * u.abs() + 1.0).pow(2)


class _LIFScan(torch.autograd.Function):
    """Spikes and final membrane of a (B, T, C) current; backward by one reversed scan."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        current: torch.Tensor,
        mem0: torch.Tensor | None,
        beta: float,
        threshold: float,
        subtract: bool,
        surrogate: Surrogate,
        slope: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mem = torch.empty_like(current)
        spikes = torch.empty_like(current)
        prev = torch.zeros_like(current[:, 0]) if mem0 is None else mem0
        fired = (prev > threshold).to(current.dtype)
        for t in range(current.shape[1]):
            # snntorch's order of operations, so both backends round alike
            m = mem[:, t]
            torch.mul(prev, beta, out=m)
            if subtract:
                m.add_(current[:, t]).sub_(fired, alpha=threshold)
            else:
                m.mul_(1 - fired).add_(current[:, t])
            fired = spikes[:, t]
            torch.gt(m, threshold, out=fired)
            prev = m
        ctx.save_for_backward(mem, spikes, mem0)
        ctx.settings = (beta, threshold, subtract, surrogate, slope)
        return spikes, mem[:, -1].clone()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, d_spikes: torch.Tensor, d_final: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, None, None, None, None, None]:
        mem, spikes, mem0 = ctx.saved_tensors
        beta, threshold, subtract, surrogate, slope = ctx.settings
        grad = d_spikes * surrogate_grad(mem - threshold, surrogate, slope)
        if d_final is not None:
            grad[:, -1] += d_final
        # a_{t+1}, the factor carrying g_{t+1} back to U_t; r_{t+1} is S_t
        decay = torch.full_like(grad, beta) if subtract else beta * (1 - spikes)
        g = hgrn(grad.flip(1), decay.flip(1))[0].flip(1)
        d_mem0 = None
        if ctx.needs_input_grad[1]:
            first = beta if subtract else beta * (1 - (mem0 > threshold).to(g.dtype))
            d_mem0 = first * g[:, 0]
        return g, d_mem0, None, None, None, None, None


class LIF(nn.Module):
    """A layer of LIF neurons over (batch, tokens, channels), state carried across tokens.

    `forward(current, mem)` returns (spikes, membrane after the last token); pass that
    membrane back to continue a sequence. The mean firing rate of the last call is kept in
    `last_rate` for monitoring.
    """

    def __init__(self, beta: float = 0.5, threshold: float = 1.0, surrogate: Surrogate = "atan",
                 slope: float | None = None, reset_mechanism: ResetMechanism = "subtract",
                 backend: LIFBackend = "scan") -> None:
        super().__init__()
        self.beta, self.threshold = beta, threshold
        self.surrogate = surrogate
        self.slope = DEFAULT_SLOPES[surrogate] if slope is None else slope
        self.reset_mechanism = reset_mechanism
        self.backend = backend
        self.last_rate: torch.Tensor | None = None
        if backend == "snntorch":
            self.neuron = snntorch_leaky(beta, threshold, surrogate, self.slope, reset_mechanism)

    def forward(self, current: torch.Tensor, mem: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backend == "snntorch":
            state = torch.zeros_like(current[:, 0]) if mem is None else mem
            steps = []
            for t in range(current.shape[1]):
                spk, state = self.neuron(current[:, t], state)
                steps.append(spk)
            spikes, final = torch.stack(steps, 1), state
        else:
            spikes, final = _LIFScan.apply(current, mem, self.beta, self.threshold,
                                           self.reset_mechanism == "subtract", self.surrogate, self.slope)
        self.last_rate = spikes.detach().float().mean()
        return spikes, final

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, threshold={self.threshold}, surrogate={self.surrogate}({self.slope}), "
                f"reset={self.reset_mechanism}, backend={self.backend}")


def snntorch_leaky(beta: float, threshold: float, surrogate: Surrogate, slope: float,
                   reset_mechanism: ResetMechanism) -> nn.Module:
    """`snn.Leaky` with our settings; its beta/threshold buffers are settings, not weights,
    so they are kept out of the state dict and both backends load the same checkpoints."""
    import snntorch as snn
    from snntorch import surrogate as sg

    spike_grad = sg.atan(alpha=slope) if surrogate == "atan" else sg.fast_sigmoid(slope=slope)
    neuron = snn.Leaky(beta=beta, threshold=threshold, spike_grad=spike_grad, reset_mechanism=reset_mechanism)
    # snntorch registers every neuron in a class-level list for its global reset helpers,
    # which we never use (state lives in our cache); left there, no model would ever be freed
    snn.SpikingNeuron.instances.remove(neuron)
    for name, buffer in list(neuron.named_buffers(recurse=False)):
        delattr(neuron, name)
        neuron.register_buffer(name, buffer, persistent=False)
    return neuron


def firing_rates(model: nn.Module) -> dict[str, float]:
    """Mean spike rate per layer from the model's last forward: `snn/firing_rate/layer_<i>`.

    Neurons under `layers.<i>.` are averaged into that layer's rate (other LIF modules keep
    their module path); `snn/firing_rate/all` averages every neuron layer. A model without
    LIF neurons, or one that has not run yet, gives an empty dict.
    """
    groups: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LIF) and module.last_rate is not None:
            match = re.match(r"^(?:.*\.)?layers\.(\d+)\.", name)
            groups.setdefault(f"layer_{match.group(1)}" if match else name, []).append(module.last_rate)
    if not groups:
        return {}
    rates = [torch.stack(v).mean() for v in groups.values()]
    values = torch.stack(rates + [torch.stack([r for v in groups.values() for r in v]).mean()]).tolist()
    out = {M.firing_rate(key): value for key, value in zip(groups, values)}
    out[M.firing_rate("all")] = values[-1]
    return out
