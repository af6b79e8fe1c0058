"""The compiled one-token decode step that `generate(compile=True)` runs.

Dynamo guards a compiled function on everything it read: for a model, the type, hooks,
attributes, and every parameter's dtype, shape and strides, ~7800 guards for SmolLM2-135M.
They are checked before every step. A decode step streams the weights through the
caches just before, so the guards read cold memory: 1.3-1.5 ms of a quantized SmolLM2 token
(~10 ms), measured with dynamo's own guard manager right after a step.

So the step keeps dynamo's guards on its inputs (the token, mask and KV cache) and on
global state, and drops those under the model (`_guards_off_the_model`). What they
protected, `model_state` checks once per generate call instead: the module tree, every
tensor's metadata and aliasing, and the plain attributes forward reads. The result is
passed to the step as a string, which dynamo compares like any constant and never makes
dynamic. A model changed between calls (quantized, cast, hooked, re-configured), or
another model, gets its own graphs; weights updated in place need none, since parameters
are graph inputs read at every call.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

# Inductor's wrapper re-asserts the size and stride of every graph input on every call (~750
# per SmolLM2 decode step, one Python call each) although dynamo's guards have just checked
# them; without these asserts a compiled quantized decode step ran 6% faster (measured in
# one process against the default, interleaved, same tokens).
_INDUCTOR_OPTIONS = {"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}

GRAPHS_PER_STATE = 4  # a decode step's graphs: static first, then the dynamic cache length; room to spare

_STATES_SEEN: set[str] = set()


def _decode_step(state: str, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 cache: Any) -> Any:
    if not state:  # read first, so that dynamo guards on it before anything else
        raise ValueError("a compiled decode step needs the model's state (model_state)")
    return model(input_ids, attention_mask=attention_mask, cache=cache)


def _guards_off_the_model(entries: list[Any]) -> list[bool]:
    """Keep a guard unless it is on the model's own attributes (`model_state` covers those)."""
    return [not entry.name.startswith(("model.", "model[")) for entry in entries]


_COMPILED_DECODE_STEP = torch.compile(_decode_step,
                                      options={**_INDUCTOR_OPTIONS, "guard_filter_fn": _guards_off_the_model})


def compiled_step(model: nn.Module) -> Callable[..., Any]:
    """`step(input_ids, attention_mask=..., cache=...)`: the model's forward through
    torch.compile. After one recompile torch makes the growing cache length a dynamic size,
    so later steps reuse the graph instead of compiling per token."""
    state = model_state(model)
    _make_room_for(state)

    def step(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: Any = None) -> Any:
        return _COMPILED_DECODE_STEP(state, model, input_ids, attention_mask, cache)
    return step


def _make_room_for(state: str) -> None:
    """Dynamo keeps at most `recompile_limit` graphs per code object, and every model and
    state shares `_decode_step`'s: without room, the fifth or so model compiled in one
    process (a server, a notebook comparing models) would silently decode in eager mode."""
    if state not in _STATES_SEEN:
        _STATES_SEEN.add(state)
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, GRAPHS_PER_STATE * len(_STATES_SEEN))
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit,
                                                 GRAPHS_PER_STATE * len(_STATES_SEEN))


def model_state(model: nn.Module) -> str:
    """The model's identity and everything of it a compiled graph depends on besides tensor
    values: module names and types, training flags, hook counts, each parameter's and
    buffer's dtype, shape, strides, device, grad flag and aliasing, and the public plain
    attributes (ints, strings, flags, nested configs).

    Private attributes and plain tensor attributes are left out: in this package they are
    caches a forward derives from the parameters (BitLinear's codes, the RoPE table, MLA's
    absorbed weights), refreshed by the eager prompt, and describing them would recompile
    whenever they are rebuilt. A forward that read such an attribute of changing shape
    would need it in a buffer."""
    tensors: dict[int, int] = {}   # id(tensor) -> first index, so ties (and untying) show
    storages: dict[int, int] = {}  # data_ptr -> first index

    def tensor(t: torch.Tensor) -> tuple[Any, ...]:
        index = tensors.setdefault(id(t), len(tensors))
        shared = index if t.device.type == "meta" else storages.setdefault(t.data_ptr(), index)
        return (t.dtype, tuple(t.shape), t.stride(), t.device, t.requires_grad, index, shared)

    def plain(value: Any, depth: int = 0) -> Any:
        if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
            return value
        if isinstance(value, (torch.Tensor, nn.Module)) or depth > 4:
            return type(value)
        if isinstance(value, (tuple, list)):
            return tuple(plain(v, depth + 1) for v in value)
        if isinstance(value, dict):
            return tuple((plain(k, depth + 1), plain(v, depth + 1)) for k, v in value.items())
        if callable(value) or not hasattr(value, "__dict__"):
            return (type(value), id(value))
        return (type(value), plain(vars(value), depth + 1))

    def module_state(module: nn.Module) -> tuple[Any, ...]:
        attributes = vars(module)
        return (type(module), module.training, tuple(module._modules),
                tuple((k, None if t is None else tensor(t)) for k, t in module._parameters.items()),
                tuple((k, None if t is None else tensor(t)) for k, t in module._buffers.items()),
                tuple(len(hooks) for key, hooks in attributes.items() if key.endswith("hooks")),
                tuple((k, plain(v)) for k, v in attributes.items() if not k.startswith("_") and k != "training"))

    parts = tuple((name, module_state(module)) for name, module in model.named_modules(remove_duplicate=False))
    return f"{type(model).__name__}@{id(model):x}:{hash(parts) & (2 ** 64 - 1):016x}"
