"""Native transformers formats: `gpt` <-> GPT2LMHeadModel, `llama` <-> LlamaForCausalLM.

The exported folder is loaded by stock `transformers` (`AutoModelForCausalLM`) with no
code of ours; the import side reads a transformers Llama (a folder, or a model object,
e.g. one transformers loaded from a GGUF file) into our `llama` family. `transformers`
is imported lazily: the core package does not depend on it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from simplified_slm.errors import SLMError
from simplified_slm.models.base import CausalLM
from simplified_slm.models.gpt import GPTForCausalLM
from simplified_slm.models.llama import LlamaConfig, LlamaForCausalLM


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SLMError("exporting to transformers needs `pip install transformers`") from None
    return transformers


def _gpt2_state(model: GPTForCausalLM) -> dict[str, torch.Tensor]:
    """Our GPT weights in GPT-2's layout (Conv1D stores weights as (in, out); fused qkv)."""
    cfg = model.config
    sd = model.state_dict()
    zeros = lambda n: torch.zeros(n)  # noqa: E731  GPT-2 always has biases; ours may not
    out = {"transformer.wte.weight": sd["embed_tokens.weight"], "transformer.wpe.weight": sd["embed_positions.weight"],
           "transformer.ln_f.weight": sd["norm.weight"],
           "transformer.ln_f.bias": sd.get("norm.bias", zeros(cfg.d_model)), "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layers):
        p, h = f"layers.{i}.", f"transformer.h.{i}."
        bias = lambda name, n: sd.get(p + name, zeros(n))  # noqa: E731
        out[h + "ln_1.weight"], out[h + "ln_1.bias"] = sd[p + "ln_1.weight"], bias("ln_1.bias", cfg.d_model)
        out[h + "ln_2.weight"], out[h + "ln_2.bias"] = sd[p + "ln_2.weight"], bias("ln_2.bias", cfg.d_model)
        qkv = [sd[p + f"attn.{x}_proj.weight"] for x in "qkv"]
        out[h + "attn.c_attn.weight"] = torch.cat(qkv, 0).t()
        out[h + "attn.c_attn.bias"] = torch.cat([bias(f"attn.{x}_proj.bias", cfg.d_model) for x in "qkv"])
        out[h + "attn.c_proj.weight"] = sd[p + "attn.o_proj.weight"].t()
        out[h + "attn.c_proj.bias"] = bias("attn.o_proj.bias", cfg.d_model)
        out[h + "mlp.c_fc.weight"] = sd[p + "mlp.up_proj.weight"].t()
        out[h + "mlp.c_fc.bias"] = bias("mlp.up_proj.bias", cfg.intermediate_size)
        out[h + "mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"].t()
        out[h + "mlp.c_proj.bias"] = bias("mlp.down_proj.bias", cfg.d_model)
    return {k: v.contiguous() for k, v in out.items()}


def _gpt2_model(model: GPTForCausalLM):
    tf = _transformers()
    cfg = model.config
    hf_cfg = tf.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model,
                           n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.intermediate_size,
                           activation_function="gelu_new" if cfg.activation == "gelu_tanh" else "gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                           bos_token_id=None, eos_token_id=None)
    hf = tf.GPT2LMHeadModel(hf_cfg)
    hf.load_state_dict(_gpt2_state(model), strict=False)
    return hf


def _llama_model(model: LlamaForCausalLM):
    tf = _transformers()
    cfg = model.config
    hf_cfg = tf.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                            intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                            num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.kv_heads,
                            head_dim=cfg.dim_per_head, max_position_embeddings=cfg.max_position_embeddings,
                            rope_theta=cfg.rope_theta, rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
                            rms_norm_eps=cfg.rms_norm_eps,
                            tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.attention_bias,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if cfg.sliding_window is not None:
        raise SLMError("transformers' Llama has no sliding-window attention; export this model as safetensors")
    hf = tf.LlamaForCausalLM(hf_cfg)
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SLMError(f"llama export mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf


def to_transformers(model: CausalLM):
    """A transformers model object holding our weights (float32, eval mode)."""
    if isinstance(model, GPTForCausalLM):
        hf = _gpt2_model(model)
    elif isinstance(model, LlamaForCausalLM):
        hf = _llama_model(model)
    else:
        raise SLMError(f"no native transformers format for family '{model.config.family}' yet; "
                       "use --format safetensors")
    return hf.float().eval()


def export_hf(model: CausalLM, directory: str | Path, tokenizer: Any = None) -> None:
    """Write a folder `transformers.AutoModelForCausalLM.from_pretrained` loads as is."""
    hf = to_transformers(model)
    hf.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save(directory)


def llama_from_transformers(hf_model) -> LlamaForCausalLM:
    """Our `llama` model from a transformers LlamaForCausalLM (from a folder or a GGUF file)."""
    hf_cfg = hf_model.config
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    raw = {k: v for k, v in hf_cfg.to_dict().items() if k in fields}
    rope = getattr(hf_cfg, "rope_parameters", None) or raw.get("rope_scaling")
    if isinstance(rope, dict):
        raw["rope_theta"] = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
        kind = rope.get("rope_type", rope.get("type", "default"))
        raw["rope_scaling"] = None if kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    raw = {k: v for k, v in raw.items() if v is not None or k in ("rope_scaling", "head_dim", "sliding_window")}
    raw.pop("sliding_window", None)
    config = LlamaConfig.from_dict(raw, where="transformers config")
    model = LlamaForCausalLM(config)
    state = {k.removeprefix("model."): v.float() for k, v in hf_model.state_dict().items()
             if "rotary_emb" not in k}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SLMError(f"cannot map the transformers Llama onto ours: missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}")
    return model.eval()


def import_gguf_llama(path: str | Path) -> LlamaForCausalLM:
    """Our `llama` model from a Llama GGUF file (dequantised to float32 by transformers + gguf)."""
    path = Path(path)
    if not path.is_file():
        raise SLMError(f"GGUF file {path} does not exist")
    tf = _transformers()
    try:
        hf = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    except ImportError as err:
        raise SLMError(f"reading GGUF needs `pip install gguf accelerate` ({str(err).splitlines()[0]})") from None
    return llama_from_transformers(hf)


def import_hf_llama(directory: str | Path) -> LlamaForCausalLM:
    """Load a transformers Llama checkpoint folder (config.json + safetensors) into our family."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise SLMError(f"{directory} has no config.json; pass a transformers model folder")
    arch = json.loads((directory / "config.json").read_text()).get("model_type")
    if arch != "llama":
        raise SLMError(f"{directory} holds a '{arch}' model; only Llama checkpoints import into the llama family")
    tf = _transformers()
    return llama_from_transformers(tf.AutoModelForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32))
