"""Refuse a training config that cannot fit in memory, before anything is allocated or written.

A typo such as `model.d_model=1000000000` otherwise ends in an allocator traceback, or in a
minute of swapping up to a MemoryError, with the run folder already half written. The
estimate is a lower bound read from the size fields every family shares in some spelling
(width, depth, feed-forward width, vocabulary), so a refusal is always right; a config
close to the limit passes and is left to the allocator.
"""

from __future__ import annotations

from typing import Any

from simplified_slm.errors import SLMError
from simplified_slm.utils.memory import available_memory

BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW's two moments
WIDTH_FIELDS = ("d_model", "hidden_size")
DEPTH_FIELDS = ("n_layers", "num_hidden_layers", "main_layers", "encoder_layers", "decoder_layers")
FFN_FIELDS = ("d_ff", "intermediate_size")


def _total(value: Any) -> int:
    return sum(value) if isinstance(value, (list, tuple)) else int(value or 0)


def _largest(value: Any) -> int:
    return max(value) if isinstance(value, (list, tuple)) and value else int(value or 0)


def lower_bound_bytes(model_cfg: Any, batch_size: int, block_size: int) -> tuple[int, int, int]:
    """(parameters, bytes of weights + gradients + AdamW state, bytes of activations), at least.

    Per layer at least the four d x d attention (or token-mixer) projections and two d x ffn
    MLP matrices; activations at least the inputs of those matrices for every token, plus
    the logits and their gradient.
    """
    width = max((_largest(getattr(model_cfg, f, 0)) for f in WIDTH_FIELDS), default=0)
    depth = sum(_total(getattr(model_cfg, f, 0)) for f in DEPTH_FIELDS)
    ffn = next((_largest(getattr(model_cfg, f)) for f in FFN_FIELDS if getattr(model_cfg, f, None)), width)
    vocab = int(getattr(model_cfg, "vocab_size", 0))
    params = depth * (4 * width * width + 2 * width * ffn) + vocab * width
    tokens = batch_size * block_size
    activations = 4 * tokens * (depth * (2 * width + ffn) + 2 * vocab)
    return params, params * BYTES_PER_PARAM, activations


def check_fits_in_memory(model_cfg: Any, batch_size: int, block_size: int) -> None:
    """SLMError naming the sizes when even the lower bound exceeds the machine's free memory."""
    available = available_memory()
    if available is None:
        return
    params, state, activations = lower_bound_bytes(model_cfg, batch_size, block_size)
    if state + activations <= available:
        return
    gib = 2**30
    raise SLMError(f"this model needs at least {params / 1e9:.3g}B parameters: {state / gib:,.1f} GiB for "
                   f"weights, gradients and AdamW state plus {activations / gib:,.1f} GiB of activations at batch "
                   f"{batch_size} x {block_size}, but this machine has {available / gib:.1f} GiB free; shrink the "
                   "model (width, layers) or the batch")
