"""Exporting a LoRA run: the adapter folded into the weights (`--merge-lora`), or the frozen
base in the chosen format with the adapter beside it in `adapter/`, in peft's format and
under the module names of that format's model (ours for `safetensors`, transformers' for
`hf`, mapped by export/hf.py's `transformers_linear`), so `peft.PeftModel.from_pretrained`
puts it onto the exported model as is.

GPT-2 stacks q, k and v in one Conv1D (`c_attn`), so their three adapters become one of rank
3r there: lora_A stacked, lora_B block-diagonal, and `alpha` scaled alike through peft's
`rank_pattern` / `alpha_pattern`, which keeps `alpha / r` and gives exactly the same update.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Callable

import torch

from simplified_slm.errors import SLMError
from simplified_slm.models.base import CausalLM
from simplified_slm.models.gpt import GPTForCausalLM
from simplified_slm.training.lora import (adapter_tensors, has_lora, merge_lora, named_adapter, save_adapter,
                                          unload_lora)

ADAPTER_SUBDIR = "adapter"
ADAPTER_FORMATS = ("safetensors", "hf")  # the formats a separate adapter can be put onto


def _module_suffix(name: str) -> str:
    """`transformer.h.3.attn.c_attn` -> `attn.c_attn`: the name within a block (peft's
    target_modules match it in every layer)."""
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return name if index is None else ".".join(parts[index + 1:])


def transformers_adapter(model: CausalLM) -> tuple[dict[str, torch.Tensor], Any]:
    """The model's adapter under transformers' module names, and its peft LoraConfig."""
    from simplified_slm.export.hf import transformers_linear

    if model.config.family == "bitnet":
        raise SLMError("peft cannot attach LoRA to transformers' packed BitLinear layers; export the adapter "
                       "with --format safetensors (it loads onto our bitnet model)")
    config = copy.deepcopy(model.lora_config)
    r, alpha = config.r, config.lora_alpha
    groups: dict[str, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}
    for name, (a, b) in adapter_tensors(model).items():
        theirs, part, parts = transformers_linear(model, name)
        groups.setdefault(theirs, []).append((part, parts, a.detach(), b.detach()))
    tensors: dict[str, torch.Tensor] = {}
    config.rank_pattern, config.alpha_pattern = {}, {}
    for theirs, pieces in groups.items():
        pieces.sort(key=lambda piece: piece[0])
        a = torch.cat([piece[2] for piece in pieces])
        b = pieces[0][3]
        if pieces[0][1] > 1:  # a fused module: block-diagonal B over the parts that are adapted
            width = b.shape[0]  # every part of GPT-2's c_attn is d_model wide
            b = torch.zeros(width * pieces[0][1], r * len(pieces))
            for j, (part, _, _, piece_b) in enumerate(pieces):
                b[part * width:(part + 1) * width, j * r:(j + 1) * r] = piece_b
            key = re.escape(_module_suffix(theirs))
            config.rank_pattern[key], config.alpha_pattern[key] = r * len(pieces), alpha * len(pieces)
        tensors[f"{theirs}.lora_A.weight"], tensors[f"{theirs}.lora_B.weight"] = a, b
    config.target_modules = sorted({_module_suffix(name) for name in groups})
    config.fan_in_fan_out = isinstance(model, GPTForCausalLM)  # GPT-2's Conv1D stores (in, out)
    return tensors, config


def prepare_export(model: CausalLM, fmt: str, merge: bool) -> tuple[CausalLM, Callable[[Path, Path], dict] | None]:
    """The model to export and, for a LoRA model kept apart from its base, the function that
    writes `adapter/` into the export folder (`write(folder, final_folder)`)."""
    if not has_lora(model):
        if merge:
            raise SLMError("--merge-lora: this model holds no LoRA adapter; drop the flag")
        return model, None
    if merge:
        return merge_lora(model), None
    if fmt not in ADAPTER_FORMATS:
        raise SLMError(f"a LoRA checkpoint exports as --format {fmt} only with --merge-lora (the adapter "
                       f"folded into the weights); without it use {' or '.join(ADAPTER_FORMATS)}")
    tensors, config = transformers_adapter(model) if fmt == "hf" else named_adapter(model)

    def write(folder: Path, final: Path) -> dict:
        save_adapter(folder / ADAPTER_SUBDIR, tensors, config, base=str(final.resolve()))
        return {"adapter": str(final / ADAPTER_SUBDIR)}

    return unload_lora(model), write
