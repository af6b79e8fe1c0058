"""Quantized models: scheme names, building a model one tensor at a time, and the record
a saved quantized folder keeps.

The packed formats and layers are `ops/quant.py` and `layers/quantized.py`; this module is
about whole models:

- `resolve_scheme`: the user's names (`int8` = q8_0, `int4` = q4_1: GGUF's 4-bit type with
  a per-group minimum, which SmolLM2's own file uses and which loses less than q4_0;
  `none` = float32) -> a scheme of `ops.quant.SCHEMES`.
- `build_model(config, source, plan)`: the model is built on the meta device (no float
  weights exist), then each planned linear / embedding is read from `source` in row
  chunks, quantized and swapped in, and the remaining float tensors (norms, biases) are
  read as they are. Peak memory is the packed model plus one chunk of one tensor, which
  is how the 1.23B Llama loads in int4 within 1.5 GB. Sources: a safetensors file
  (`SafetensorsWeights`), a GGUF file (`export/gguf.py`, which also hands over blocks that
  are already packed), or seeded random values (`RandomWeights`, for sizing a preset).
- `quantization_record` / `build_skeleton`: `save_pretrained` writes the scheme and group
  of every quantized module to `quantization.json`; `from_pretrained` rebuilds those
  modules empty on the meta device and loads the packed buffers into them.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch
from torch import nn

from simplified_slm.errors import SLMError
from simplified_slm.layers.quantized import (
    QuantizedEmbedding,
    QuantizedLinear,
    quantizable_modules,
    quantize_model,
    replace_module,
)
from simplified_slm.models.config import ModelConfig
from simplified_slm.ops.quant import FLOAT_SCHEMES, SCHEMES, QuantizedWeight, dequantize, quantize
from simplified_slm.utils.memory import release_freed_memory

QUANTIZATION_FILE = "quantization.json"
SCHEME_ALIASES = {"int8": "q8_0", "int4": "q4_1"}
FLOAT_NAMES = ("none", "fp32", "float32")  # `--quantize none`: keep (or make) the model float32
SCHEME_CHOICES = (*SCHEME_ALIASES, *SCHEMES, *FLOAT_NAMES)
CHUNK_BYTES = 16 << 20  # float32 rows read and quantized at a time (each takes ~5x this in temporaries)
Plan = dict[str, tuple[str, int]]  # module name -> (scheme, group size)


def resolve_scheme(name: str) -> str | None:
    """A scheme of `ops.quant.SCHEMES` from a user's name; None for float32 (`none`)."""
    name = name.lower()
    if name in FLOAT_NAMES:
        return None
    scheme = SCHEME_ALIASES.get(name, name)
    if scheme not in SCHEMES:
        raise SLMError(f"unknown quantization scheme {name!r}; use one of {', '.join(SCHEME_CHOICES)}")
    return scheme


def quantize_in_place(model: nn.Module, scheme: str, group_size: int = 32, skip: Iterable[str] = ()) -> nn.Module:
    """Quantize an already loaded model (every float linear and embedding, see
    `layers.quantized.quantize_model`); a model that is quantized already is refused."""
    resolved = resolve_scheme(scheme)
    if resolved is None:
        raise SLMError(f"{scheme!r} means float32; pass a scheme to quantize to ({', '.join(SCHEME_CHOICES[:-3])})")
    if quantization_record(model):
        raise SLMError("this model is quantized already; quantize its float original instead (requantizing "
                       "loses accuracy twice)")
    return quantize_model(model, resolved, group_size, skip)


def dequantize_in_place(model: nn.Module) -> nn.Module:
    """Float32 `nn.Linear` / `nn.Embedding` in place of every quantized module (the packed
    values expanded, a tied pair tied again): a quantized model made trainable."""
    record = quantization_record(model)
    linears: dict[str, nn.Linear] = {}
    for name in record:
        module = model.get_submodule(name)
        if isinstance(module, QuantizedLinear):
            linears[name] = module.to_linear()
            replace_module(model, name, linears[name])
    for name, entry in record.items():
        module = model.get_submodule(name)
        if isinstance(module, QuantizedEmbedding):
            embedding = nn.Embedding(module.num_embeddings, module.embedding_dim, device=module.packed_codes.device)
            embedding.weight = (linears[entry["tied"]].weight if entry.get("tied") else
                                nn.Parameter(dequantize(module.packed((module.num_embeddings, module.embedding_dim)))))
            replace_module(model, name, embedding)
    return model


# --------------------------------------------------------------------------- plans
def uniform_plan(model: nn.Module, scheme: str, group_size: int = 32, skip: Iterable[str] = ()) -> Plan:
    """One scheme for every quantizable module not matched by a `skip` pattern (the same
    selection `quantize_model` makes), each checked before anything is read."""
    return {name: (scheme, 0 if scheme in FLOAT_SCHEMES else group_size)
            for name in quantizable_modules(model, scheme, group_size, skip)}


def _tie_groups(modules: dict[str, nn.Module]) -> list[list[str]]:
    """Module names grouped by shared weight (a tied embedding and head), linears first.
    Identity, not data pointers: on the meta device every tensor's pointer is 0."""
    groups: dict[int, list[str]] = {}
    for name, module in modules.items():
        groups.setdefault(id(module.weight), []).append(name)
    return [sorted(names, key=lambda n: not isinstance(modules[n], nn.Linear)) for names in groups.values()]


def quantization_record(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Scheme and group of every quantized module; an embedding sharing a head's packed
    tensors names it under `tied`. Empty for a float model."""
    heads = {id(m.packed_codes): name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    record: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            entry: dict[str, Any] = {"scheme": module.scheme, "group_size": module.group_size}
            if isinstance(module, QuantizedEmbedding) and id(module.packed_codes) in heads:
                entry["tied"] = heads[id(module.packed_codes)]
            record[name] = entry
    return record


def resident_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, a tensor shared by two modules (a
    tied embedding and head) once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.numel() and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def summary(record: dict[str, dict[str, Any]]) -> str:
    """`q4_1 (g32)`, or `q4_1 (g32) + q8_0 (g32)` for a mixed model such as a GGUF's."""
    kinds = dict.fromkeys(f"{e['scheme']}" + (f" (g{e['group_size']})" if e["group_size"] else "")
                          for e in record.values())
    return " + ".join(kinds) or "float32"


def meta_model(config: ModelConfig) -> nn.Module:
    """The family's model with every tensor on the meta device (nothing allocated). A
    family whose construction reads values or computes buffers outside its state dict
    (spiking's LIF constants) is built on the CPU instead: loading overwrites its floats."""
    from simplified_slm.models.registry import model_class

    try:
        with torch.device("meta"):
            model = model_class(config.family)(config)
    except (RuntimeError, NotImplementedError):  # e.g. .item() on a meta tensor
        return model_class(config.family)(config)
    saved = {id(t) for t in model.state_dict(keep_vars=True).values()}
    if any(id(b) not in saved for b in model.buffers()):
        model = model_class(config.family)(config)
    return model


# --------------------------------------------------------------------------- loading a saved folder
def build_skeleton(config: ModelConfig, record: dict[str, dict[str, Any]]) -> nn.Module:
    """The model of a saved quantized folder with empty (meta) tensors, quantized modules
    shaped as `record` says; `load_packed_state` then fills it."""
    model = meta_model(config)
    modules = quantizable_modules(model)
    unknown = [name for name in record if name not in modules]
    if unknown:
        raise SLMError(f"{QUANTIZATION_FILE} names {unknown[0]!r}, which this {config.family} model has no "
                       "float linear or embedding of; the folder's files disagree")
    with torch.device("meta"):
        for name, entry in record.items():
            module = modules[name]
            if isinstance(module, nn.Linear):
                replace_module(model, name, QuantizedLinear(module.in_features, module.out_features, entry["scheme"],
                                                      entry["group_size"] or 32, module.bias is not None))
        for name, entry in record.items():
            module = modules[name]
            if isinstance(module, nn.Embedding):
                tied = entry.get("tied")
                replace_module(model, name, QuantizedEmbedding.sharing(model.get_submodule(tied)) if tied else
                         QuantizedEmbedding(module.num_embeddings, module.embedding_dim, entry["scheme"],
                                            entry["group_size"] or 32))
    return model


def load_packed_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Put `state` (a saved quantized model's tensors) into a skeleton by assignment, so
    nothing is copied; names written once for tied modules are given to both."""
    own = model.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}
    for key, tensor in own.items():
        aliases.setdefault(id(tensor), []).append(key)
    full = dict(state)
    for keys in aliases.values():
        present = next((k for k in keys if k in state), None)
        for key in keys:
            if present is not None:
                full[key] = state[present]
    missing = [k for k in own if k not in full]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise SLMError(f"weights {where} do not fit the quantized model ({detail}); {QUANTIZATION_FILE} and "
                       "the weights disagree")
    for key, tensor in full.items():
        if own[key].shape != tensor.shape or own[key].dtype != tensor.dtype:
            raise SLMError(f"weights {where}: '{key}' is {tensor.dtype} {tuple(tensor.shape)} but the quantized "
                           f"model expects {own[key].dtype} {tuple(own[key].shape)}; the files disagree")
    model.load_state_dict(full, strict=False, assign=True)
    _check_materialised(model, where)


def _check_materialised(model: nn.Module, where: str) -> None:
    """Refuse a model with a tensor left on the meta device; empty ones (the unused `mins`
    of a q8_0 layer, kept out of the state dict) are simply made."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta and buffer.numel() == 0:
                module._buffers[name] = torch.empty(0, dtype=buffer.dtype)
    left = next((name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if left is not None:
        raise SLMError(f"{where} has no value for '{left}'; the model files are incomplete")


# --------------------------------------------------------------------------- building from a source
class WeightSource(Protocol):
    """Float (or already packed) tensors under our state-dict names."""

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def rows(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor: ...

    def packed(self, key: str) -> QuantizedWeight | None: ...


class SafetensorsWeights:
    """A float safetensors file, read a slice at a time (memory-mapped, never whole)."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="pt")
        except (SafetensorError, OSError) as err:
            raise SLMError(f"cannot read weights {self.path}: {str(err).splitlines()[0]}; the file is "
                           "truncated or corrupt") from None

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def rows(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        part = self._file.get_slice(key)
        tensor = part[start:stop] if len(part.get_shape()) > 1 else part[:]
        return tensor.float()

    def packed(self, key: str) -> QuantizedWeight | None:
        return None


class RandomWeights:
    """Seeded random values shaped as `config`'s model (normal(0, std) matrices, unit norm
    weights, zero biases), made a row chunk at a time: a preset's size without its file."""

    def __init__(self, config: ModelConfig, seed: int = 0, std: float = 0.02) -> None:
        self.seed, self.std = seed, getattr(config, "initializer_range", std)
        self._shapes = {k: tuple(t.shape) for k, t in meta_model(config).state_dict().items()}

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def rows(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        shape = self._shapes[key]
        if len(shape) == 1:
            return torch.zeros(shape) if key.endswith("bias") else torch.ones(shape)
        stop = shape[0] if stop is None else min(stop, shape[0])
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(f"{key}:{start}".encode()))
        return torch.randn(stop - start, *shape[1:], generator=generator) * self.std

    def packed(self, key: str) -> QuantizedWeight | None:
        return None


def quantize_rows(source: WeightSource, key: str, scheme: str, group_size: int) -> QuantizedWeight:
    """Quantize a source tensor `CHUNK_BYTES` of float rows at a time (groups run along a
    row, so chunks quantize exactly as the whole would), each chunk written straight into
    the packed result: no list of parts beside their concatenation."""
    rows, cols = source.shape(key)
    step = max(1, CHUNK_BYTES // (4 * cols))
    first = quantize(source.rows(key, 0, step), scheme, group_size)
    release_freed_memory()  # the chunk's float temporaries, whichever thread's arena holds them
    if step >= rows:
        return first
    packed = [t.new_empty(rows, *t.shape[1:]) if t.numel() else t for t in (first.codes, first.scales, first.mins)]
    for start in range(0, rows, step):
        part = first if start == 0 else quantize(source.rows(key, start, start + step), scheme, group_size)
        for whole, piece in zip(packed, (part.codes, part.scales, part.mins)):
            if piece.numel():
                whole[start:start + piece.shape[0]] = piece
        del part
        release_freed_memory()
    return QuantizedWeight(scheme, *packed, (rows, cols), first.group_size)


def _source_key(source_keys: set[str], names: list[str], leaf: str, where: str) -> str:
    key = next((f"{name}.{leaf}" for name in names if f"{name}.{leaf}" in source_keys), None)
    if key is None:
        raise SLMError(f"{where} has no tensor '{names[0]}.{leaf}'; the weights do not belong to this model")
    return key


def build_model(config: ModelConfig, source: WeightSource, plan: Plan, where: str) -> nn.Module:
    """The model of `config`, its planned modules quantized straight from `source` and every
    other tensor read from it as float32; no float copy of a planned weight ever exists
    beyond one chunk. An already packed source tensor (a GGUF block type) is taken as it
    is when it has the planned scheme and group."""
    model = meta_model(config)
    modules = quantizable_modules(model)
    keys = set(source.keys())
    for names in _tie_groups({n: m for n, m in modules.items()}):
        planned = [n for n in names if n in plan]
        if not planned:
            continue
        scheme, group = plan[planned[0]]
        key = _source_key(keys, names, "weight", where)
        qw = source.packed(key)
        if qw is None or (qw.scheme, qw.group_size) != (scheme, group or qw.group_size):
            qw = quantize_rows(source, key, scheme, group or 32)
        head = None
        for name in names:
            module = modules[name]
            if isinstance(module, nn.Linear):
                bias = source.rows(f"{name}.bias") if module.bias is not None else None
                head = QuantizedLinear.from_packed(qw, bias)
                replace_module(model, name, head)
            else:
                replace_module(model, name, QuantizedEmbedding.sharing(head) if head is not None
                         else QuantizedEmbedding.from_packed(qw))
    _read_float_tensors(model, source, keys, where)
    return model


def _read_float_tensors(model: nn.Module, source: WeightSource, keys: set[str], where: str) -> None:
    """Every tensor outside the quantized modules, read from `source` as float; tied names
    (a float embedding and head) get one Parameter again."""
    packed = {id(t) for m in model.modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))
              for t in m.buffers()}
    own = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for key, tensor in own.items():
        if id(tensor) not in packed:
            groups.setdefault(id(tensor), []).append(key)
    for names in groups.values():
        key = next((k for k in names if k in keys), None)
        if key is None:
            raise SLMError(f"{where} has no tensor '{names[0]}'; the weights do not belong to this model")
        value = source.rows(key).to(own[names[0]].dtype)
        if tuple(value.shape) != tuple(own[names[0]].shape):
            raise SLMError(f"{where}: '{key}' has shape {tuple(value.shape)} but the model expects "
                           f"{tuple(own[names[0]].shape)}; the config and weights disagree")
        model.load_state_dict({names[0]: value}, strict=False, assign=True)
        first = _owner(model, names[0])
        for alias in names[1:]:
            module, leaf = _owner(model, alias)
            setattr(module, leaf, getattr(*first))
    _check_materialised(model, where)


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, leaf = key.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf
