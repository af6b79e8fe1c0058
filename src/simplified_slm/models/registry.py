"""Family name -> (config class, model class), so configs and checkpoints name a family.

Families register here explicitly (no import-time magic) so `config_from_dict` can give a
clear error listing the families that exist.
"""

from __future__ import annotations

from typing import Any

from simplified_slm.errors import SLMError
from simplified_slm.models.base import CausalLM
from simplified_slm.models.config import ModelConfig
from simplified_slm.models.bitnet import BitNetConfig, BitNetForCausalLM
from simplified_slm.models.gpt import GPTConfig, GPTForCausalLM
from simplified_slm.models.hgrn_bit import SimplifiedSLMConfig, SimplifiedSLMForCausalLM
from simplified_slm.models.hnet_bit import HNetBitConfig, HNetBitForCausalLM
from simplified_slm.models.llama import LlamaConfig, LlamaForCausalLM

_FAMILIES: dict[str, tuple[type[ModelConfig], type[CausalLM]]] = {
    "gpt": (GPTConfig, GPTForCausalLM),
    "hgrn_bit": (SimplifiedSLMConfig, SimplifiedSLMForCausalLM),
    "hnet_bit": (HNetBitConfig, HNetBitForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "bitnet": (BitNetConfig, BitNetForCausalLM),
}


def register_family(config_cls: type[ModelConfig], model_cls: type[CausalLM]) -> None:
    _FAMILIES[config_cls.family] = (config_cls, model_cls)


def families() -> list[str]:
    return sorted(_FAMILIES)


def _lookup(family: Any, where: str) -> tuple[type[ModelConfig], type[CausalLM]]:
    if not isinstance(family, str) or family not in _FAMILIES:
        raise SLMError(f"{where}: unknown model family {family!r}; choose one of {families()}")
    return _FAMILIES[family]


def config_class(family: str) -> type[ModelConfig]:
    return _lookup(family, "model")[0]


def model_class(family: str) -> type[CausalLM]:
    return _lookup(family, "model")[1]


def config_from_dict(data: dict[str, Any], where: str = "model") -> ModelConfig:
    """Build a family's config from `{"family": ..., "preset": ..., <fields>}`."""
    if not isinstance(data, dict):
        raise SLMError(f"{where}: expected a mapping with a 'family' key, got {type(data).__name__}")
    data = dict(data)
    family = data.pop("family", None)
    if family is None:
        raise SLMError(f"{where}: missing 'family'; choose one of {families()}")
    cls = _lookup(family, where)[0]
    preset = data.pop("preset", None)
    if preset is not None:
        if not isinstance(preset, str) or preset not in cls.presets:
            raise SLMError(f"{where}: unknown {family} preset {preset!r}; choose one of {sorted(cls.presets)}")
        data = {**cls.presets[preset], **data}
    return cls.from_dict(data, where=where)


def build_model(config: ModelConfig | dict[str, Any]) -> CausalLM:
    if isinstance(config, dict):
        config = config_from_dict(config)
    return model_class(config.family)(config)
