"""Training-time health numbers: ternary code shares of BitLinear weights, grad norms by
group, firing rates of spiking neurons.

Every function returns a flat `{metric name: float}` dict ready for `loggers.log`, so the
trainer can call them at log steps without knowing the model family. A model with no
BitLinear layers (e.g. `gpt`) simply yields no `ternary/...` metrics, one without LIF
neurons no `snn/...` metrics. `firing_rates` is defined next to the neurons
(`layers.lif`) so the evaluator can use it without importing the training layer.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from simplified_slm import metric_names as M
from simplified_slm.layers.lif import firing_rates
from simplified_slm.layers.bitlinear import BitLinear
from simplified_slm.ops.bitnet import ternary_codes

__all__ = ["firing_rates", "grad_norms_by_group", "parameter_group", "ternary_stats"]

_EMBEDDING_NAMES = ("embed", "wte", "wpe", "tok_emb", "pos_emb")
_HEAD_NAMES = ("lm_head", "head", "norm", "ln_f", "final_norm")
# H-Net nests each stage in the previous one's `inner`: stage.inner.encoder is stage 1's
_HNET_PART = re.compile(r"^stage\.((?:inner\.)*)(encoder|decoder|main|router|residual_proj|pad)(?:\.|$)")


@torch.no_grad()
def ternary_stats(model: nn.Module) -> dict[str, float]:
    """Share of -1 / 0 / +1 codes and the weight scale of every BitLinear.

    Names: `ternary/<module path>/neg|zero|pos|scale` (scale multiplies a weight into the
    integer grid, as in `ops.bitnet`: code = round(w * scale) clipped to [-1, 1]), plus
    `ternary/all/neg|zero|pos` over all BitLinear weights together (weighted by size) and
    `ternary/all/scale`, the mean of the per-layer scales. Frozen layers report their
    stored codes. Shares of one layer sum to 1.
    """
    out: dict[str, float] = {}
    totals = torch.zeros(3, dtype=torch.float64)
    scales: list[float] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, BitLinear):
            continue
        if module.frozen:
            codes, scale = module.weight_codes, module.weight_scale
        else:
            if id(module.weight) in seen:  # a tied weight is counted once in the total
                continue
            seen.add(id(module.weight))
            codes, scale = ternary_codes(module.weight.detach().float())
        assert codes is not None and scale is not None
        counts = torch.stack([(codes == v).sum() for v in (-1, 0, 1)]).double().cpu()
        share = counts / max(1, codes.numel())
        path = name or "root"
        out[M.ternary(path, "neg")], out[M.ternary(path, "zero")], out[M.ternary(path, "pos")] = (float(s) for s in share)
        out[M.ternary(path, "scale")] = float(scale)
        totals += counts
        scales.append(float(scale))
    if scales:
        share = totals / totals.sum().clamp(min=1)
        out[M.ternary("all", "neg")], out[M.ternary("all", "zero")], out[M.ternary("all", "pos")] = (
            float(s) for s in share)
        out[M.ternary("all", "scale")] = sum(scales) / len(scales)
    return out


def parameter_group(name: str) -> str:
    """Top-level group of a parameter name: embeddings, layer<i>, head, or its first part.

    `layers.3.attn.q_proj.weight` -> `layer3`; `embed_tokens.weight` -> `embeddings`;
    `lm_head.weight` and the final `norm.weight` -> `head`. H-Net parameters, all under
    `stage.`, are grouped by stage and part, since one "stage" group would say nothing:
    `stage.inner.encoder....` -> `stage1.encoder`, the router and residual projection of
    stage s -> `stage<s>.routing`, the innermost network -> `main`. Anything else (e.g.
    `lower_bounds`) keeps its top-level name.
    """
    match = re.match(r"^(?:model\.)?(?:layers|blocks|h)\.(\d+)\.", name)
    if match:
        return f"layer{match.group(1)}"
    match = _HNET_PART.match(name)
    if match:
        depth, part = match.group(1).count("inner."), match.group(2)
        if part == "main":
            return "main"
        return f"stage{depth}.{part if part in ('encoder', 'decoder') else 'routing'}"
    top = name.split(".", 1)[0]
    if top.startswith(_EMBEDDING_NAMES) or top in ("embeddings", "embedding"):
        return "embeddings"
    if top in _HEAD_NAMES:
        return "head"
    return top


@torch.no_grad()
def grad_norms_by_group(model: nn.Module) -> dict[str, float]:
    """L2 norm of the gradients, overall (`grad_norm/global`) and per `parameter_group`.

    The global value equals what `torch.nn.utils.clip_grad_norm_(model.parameters(), ...)`
    returns for the same gradients, so call this before clipping to see the raw norms.
    Parameters without a gradient are skipped; a tied weight counts once.
    """
    squares: dict[str, float] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if param.grad is None or id(param) in seen:
            continue
        seen.add(id(param))
        value = float(torch.linalg.vector_norm(param.grad.detach().float())) ** 2
        group = parameter_group(name)
        squares[group] = squares.get(group, 0.0) + value
    if not squares:
        return {}
    out = {M.grad_norm("global"): math.sqrt(sum(squares.values()))}
    out.update({M.grad_norm(group): math.sqrt(v) for group, v in squares.items()})
    return out
