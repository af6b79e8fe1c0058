"""Packed ternary checkpoints: every BitLinear weight as 2-bit codes (4 per byte) + one scale.

This is what makes the original reference's "~8x memory reduction vs FP16" real: a ternary weight needs
log2(3) bits; we store 2. Codes and scale are stored separately (never a dequantised float
tensor, whose re-quantisation would shrink the scale). Everything else (embeddings, norms,
lower bounds) stays float32. Loading gives a model whose BitLinears are frozen on int8 codes
and which reproduces the fake-quant logits to float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from simplified_slm.errors import SLMError
from simplified_slm.models.base import CONFIG_FILE, CausalLM
from simplified_slm.models.registry import config_from_dict, model_class
from simplified_slm.layers.bitlinear import BitLinear
from simplified_slm.ops.bitnet import ternary_codes
from simplified_slm.ops.packing import pack_ternary, unpack_ternary
from simplified_slm.tokenizers.identity import record_tokenizer
from simplified_slm.utils.io import atomic_write, atomic_write_json

PACKED_FILE = "model.ternary.safetensors"
FORMAT = "simplified-slm-ternary-v1"


def bitlinear_modules(model: torch.nn.Module) -> dict[str, BitLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}


@torch.no_grad()
def save_packed(model: CausalLM, directory: str | Path, tokenizer=None) -> dict[str, int]:
    """Write config.json + model.ternary.safetensors; return byte counts for reporting."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bitlinears = bitlinear_modules(model)
    if not bitlinears:
        raise SLMError(f"the {model.config.family} model has no BitLinear layers; use save_pretrained instead")
    tensors: dict[str, torch.Tensor] = {}
    packed_bytes = 0
    for name, module in bitlinears.items():
        if module.frozen:
            codes, scale = module.weight_codes, module.weight_scale
        else:
            codes, scale = ternary_codes(module.weight)
        tensors[f"{name}.weight_packed"] = pack_ternary(codes.cpu())
        tensors[f"{name}.weight_scale"] = scale.reshape(1).float().cpu()
        packed_bytes += tensors[f"{name}.weight_packed"].numel()
    skip = {f"{name}.{suffix}" for name in bitlinears for suffix in ("weight", "weight_codes", "weight_scale")}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        if key in skip or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[key] = tensor.detach().float().contiguous().cpu()
    atomic_write_json(directory / CONFIG_FILE, model.config.to_dict())
    atomic_write(directory / PACKED_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={
        "format": FORMAT, "family": model.config.family}))
    if tokenizer is not None:
        tokenizer.save(directory)
        record_tokenizer(directory, tokenizer)
    linear_params = sum(m.in_features * m.out_features for m in bitlinears.values())
    return {"linear_weights_packed_bytes": packed_bytes, "linear_weights_fp16_bytes": 2 * linear_params,
            "file_bytes": (directory / PACKED_FILE).stat().st_size}


def _tied_to(model: torch.nn.Module, loaded: set[str]) -> set[str]:
    """State-dict names that share storage with a loaded name (tied embeddings): save_packed
    writes such a tensor once, and loading it under its first name fills the others."""
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in loaded if k in own and own[k].numel()}
    return {k for k, t in own.items() if k not in loaded and t.numel() and t.data_ptr() in loaded_ptrs}


def load_packed(directory: str | Path, int8: bool = True) -> CausalLM:
    """Rebuild the model from a packed checkpoint, BitLinears frozen on their codes."""
    directory = Path(directory)
    path = directory / PACKED_FILE
    if not path.is_file():
        raise SLMError(f"{path} is missing; write one with `slm export --format ternary`")
    try:
        tensors = load_file(str(path))
        config = config_from_dict(json.loads((directory / CONFIG_FILE).read_text()), where=str(directory))
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise SLMError(f"cannot read packed checkpoint {directory}: {str(err).splitlines()[0]}") from None
    model = model_class(config.family)(config)
    for name, module in bitlinear_modules(model).items():
        key = f"{name}.weight_packed"
        if key not in tensors:
            raise SLMError(f"{path} has no packed weight for {name}; it was written for another architecture")
        codes = unpack_ternary(tensors.pop(key), module.weight.shape)
        module.weight_codes, module.weight_scale = codes, tensors.pop(f"{name}.weight_scale")[0]
        module.weight = None
        module.int8 = int8
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = _tied_to(model, set(tensors))
    missing = [k for k in missing if not k.endswith(("weight_codes", "weight_scale")) and k not in tied]
    if missing or unexpected:
        raise SLMError(f"{path} does not fit a {config.family} model (missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]})")
    return model.eval()
