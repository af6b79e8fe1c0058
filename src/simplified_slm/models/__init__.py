"""Model families behind one interface (see `base.CausalLM`)."""

from simplified_slm.models.base import CausalLM, CausalLMOutput
from simplified_slm.models.config import ModelConfig
from simplified_slm.models.gpt import GPTConfig, GPTForCausalLM
from simplified_slm.models.hgrn_bit import SimplifiedSLMConfig, SimplifiedSLMForCausalLM
from simplified_slm.models.loading import LoadedModel, ModelSource, load
from simplified_slm.models.registry import build_model, config_from_dict, families, register_family
from simplified_slm.models.spiking import SpikingConfig, SpikingForCausalLM

__all__ = ["CausalLM", "CausalLMOutput", "ModelConfig", "GPTConfig", "GPTForCausalLM",
           "SimplifiedSLMConfig", "SimplifiedSLMForCausalLM", "SpikingConfig", "SpikingForCausalLM",
           "LoadedModel", "ModelSource", "build_model", "config_from_dict", "families", "load",
           "register_family"]
