"""Model families behind one interface (see `base.CausalLM`): every family's config and model.

`SimplifiedSLMConfig` / `SimplifiedSLMForCausalLM` are the hgrn_bit family under the names
of the original MatMul-free reference API.
"""

from simplified_slm.models.base import CausalLM, CausalLMOutput
from simplified_slm.models.bitnet import BitNetConfig, BitNetForCausalLM
from simplified_slm.models.config import ModelConfig
from simplified_slm.models.gpt import GPTConfig, GPTForCausalLM
from simplified_slm.models.hgrn_bit import SimplifiedSLMConfig, SimplifiedSLMForCausalLM
from simplified_slm.models.hnet_bit import HNetBitConfig, HNetBitForCausalLM
from simplified_slm.models.llama import LlamaConfig, LlamaForCausalLM
from simplified_slm.models.loading import LoadedModel, ModelSource, load
from simplified_slm.models.registry import build_model, config_from_dict, families, register_family
from simplified_slm.models.spiking import SpikingConfig, SpikingForCausalLM

__all__ = ["CausalLM", "CausalLMOutput", "ModelConfig",
           "BitNetConfig", "BitNetForCausalLM", "GPTConfig", "GPTForCausalLM",
           "HNetBitConfig", "HNetBitForCausalLM", "LlamaConfig", "LlamaForCausalLM",
           "SimplifiedSLMConfig", "SimplifiedSLMForCausalLM", "SpikingConfig", "SpikingForCausalLM",
           "LoadedModel", "ModelSource", "build_model", "config_from_dict", "families", "load",
           "register_family"]
