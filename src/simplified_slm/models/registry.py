"""Family name -> (config class, model class), so configs and checkpoints name a family.

Families register here explicitly (no import-time magic) so `config_from_dict` can give a
clear error listing the families that exist.

The edge framework's "hybrid engine" is the `architecture` key of a model mapping: "transformer"
(default) builds the named family, "snn" builds the `spiking` family with the sizes the
two share, so a config switches between them by that one field.
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
from simplified_slm.models.spiking import SpikingConfig, SpikingForCausalLM

_FAMILIES: dict[str, tuple[type[ModelConfig], type[CausalLM]]] = {
    "gpt": (GPTConfig, GPTForCausalLM),
    "hgrn_bit": (SimplifiedSLMConfig, SimplifiedSLMForCausalLM),
    "hnet_bit": (HNetBitConfig, HNetBitForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "bitnet": (BitNetConfig, BitNetForCausalLM),
    "spiking": (SpikingConfig, SpikingForCausalLM),
}

ARCHITECTURES = ("transformer", "snn")

# spiking field <- attribute of the named family's config. Attention settings (heads, RoPE,
# windows, attention dropout, biases) have no SNN counterpart and are dropped; the SNN has
# no context limit, so the transformer's maximum length is dropped too.
_LLAMA_TO_SNN = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_hidden_layers",
                 "intermediate_size": "intermediate_size", "tie_word_embeddings": "tie_word_embeddings",
                 "norm_eps": "rms_norm_eps", "initializer_range": "initializer_range"}
_SNN_FIELDS: dict[str, dict[str, str]] = {
    "gpt": {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
            "intermediate_size": "intermediate_size", "dropout": "dropout", "tie_word_embeddings": "tie_embeddings",
            "norm_eps": "norm_eps", "initializer_range": "init_std"},
    "llama": _LLAMA_TO_SNN,
    "bitnet": _LLAMA_TO_SNN,
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
    """Build a family's config from `{"family": ..., "preset": ..., "architecture": ..., <fields>}`."""
    if not isinstance(data, dict):
        raise SLMError(f"{where}: expected a mapping with a 'family' key, got {type(data).__name__}")
    data = dict(data)
    family = data.pop("family", None)
    if family is None:
        raise SLMError(f"{where}: missing 'family'; choose one of {families()}")
    cls = _lookup(family, where)[0]
    architecture = data.pop("architecture", "transformer")
    if not isinstance(architecture, str) or architecture not in ARCHITECTURES:
        raise SLMError(f"{where}.architecture: unknown value {architecture!r}; choose 'transformer' or 'snn'")
    preset = data.pop("preset", None)
    if preset is not None:
        if not isinstance(preset, str) or preset not in cls.presets:
            raise SLMError(f"{where}: unknown {family} preset {preset!r}; choose one of {sorted(cls.presets)}")
        data = {**cls.presets[preset], **data}
    if architecture == "snn" and cls is not SpikingConfig:
        return _snn_config(family, cls, data, where)
    return cls.from_dict(data, where=where)


def _snn_config(family: str, cls: type[ModelConfig], data: dict[str, Any], where: str) -> SpikingConfig:
    """The spiking config sharing the sizes of the `family` config that `data` describes.

    The family's own fields are validated as usual (a typo still fails); keys only the
    spiking family knows (e.g. `lif_beta`) are passed on to it.
    """
    fields = _SNN_FIELDS.get(family)
    if fields is None:
        raise SLMError(f"{where}.architecture: 'snn' replaces a transformer; family '{family}' is not one "
                       f"(use {sorted(_SNN_FIELDS)} or family 'spiking')")
    own = set(cls.field_names())
    snn_only = {key: data.pop(key) for key in list(data)
                if key not in own and key in SpikingConfig.field_names()}
    source = cls.from_dict(data, where=where)
    carried = {snn: getattr(source, name) for snn, name in fields.items()}
    return SpikingConfig.from_dict({**carried, **snn_only}, where=where)


def build_model(config: ModelConfig | dict[str, Any]) -> CausalLM:
    if isinstance(config, dict):
        config = config_from_dict(config)
    return model_class(config.family)(config)
