"""Native transformers formats: `gpt` <-> GPT2LMHeadModel, `llama` <-> LlamaForCausalLM,
`bitnet` <-> BitNetForCausalLM (packed ternary weights).

The exported folder is loaded by stock `transformers` (`AutoModelForCausalLM`) with no
code of ours; the import side (`import_hf`, `import_gguf_llama`, behind `models.load`)
reads such a folder, ours or transformers' own, or a Llama GGUF file back into our
families. `transformers` is imported lazily: the core package does not depend on it.

BitNet: transformers' `quant_method: "bitnet"` (offline, `linear_class: "bitlinear"`)
stores each projection as uint8 `weight` (4 ternary codes per byte, packed along the
output dim, `ops/packing.pack_ternary_hf`) plus a one-element `weight_scale` that is our
`ternary_codes` scale. Its forward is `F.linear(int8 levels, codes) / (weight_scale *
input_scale)` with the same per-token absmax quantiser as ours (127 / max|x| clamped at
1e-5, round half to even, clamp to [-128, 127]), every RMSNorm with `rms_norm_eps`, SubLN
as `attn_sub_norm` (hidden_size wide, before o_proj) and `ffn_sub_norm` (before
down_proj), lm_head and embeddings unquantised. That is our BitLinear's formula in every
mode (training, frozen float, frozen int8: integer sums, exact in float32, then the same
division), so an exported model gives our logits bit for bit in float32. MLA has no
transformers counterpart, so such models are refused; so are models transformers' layout
cannot hold (attention width != hidden_size, output sizes not divisible by 4).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from simplified_slm.errors import SLMError
from simplified_slm.export.hf_tokenizer import save_hf_tokenizer
from simplified_slm.export.ternary import bitlinear_modules
from simplified_slm.layers.rope import rope_type
from simplified_slm.models.base import CausalLM
from simplified_slm.models.bitnet import BitNetConfig, BitNetForCausalLM
from simplified_slm.models.gpt import GPTConfig, GPTForCausalLM
from simplified_slm.models.llama import LlamaConfig, LlamaForCausalLM
from simplified_slm.ops.bitnet import ternary_codes
from simplified_slm.ops.packing import pack_ternary_hf, unpack_ternary_hf
from simplified_slm.tokenizers.identity import record_tokenizer
from simplified_slm.utils.io import atomic_write, follow_umask


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SLMError("exporting to transformers needs `pip install transformers`") from None
    return transformers


# our GPT projection -> (GPT-2 Conv1D module, part): c_attn holds q, k and v stacked along
# its outputs; the one name mapping for weights (both directions) and LoRA adapters
_GPT2_LINEARS = {"attn.q_proj": ("attn.c_attn", 0), "attn.k_proj": ("attn.c_attn", 1),
                 "attn.v_proj": ("attn.c_attn", 2), "attn.o_proj": ("attn.c_proj", 0),
                 "mlp.up_proj": ("mlp.c_fc", 0), "mlp.down_proj": ("mlp.c_proj", 0)}


def _gpt2_fused() -> dict[str, list[str]]:
    """GPT-2 module -> our projections stacked in it, in order."""
    fused: dict[str, list[str]] = {}
    for ours, (theirs, _) in sorted(_GPT2_LINEARS.items(), key=lambda item: item[1]):
        fused.setdefault(theirs, []).append(ours)
    return fused


def transformers_linear(model: CausalLM, name: str) -> tuple[str, int, int]:
    """Our Linear module `name` -> (the transformers module holding it, its part, the parts
    stacked there along the outputs): GPT-2's c_attn holds q, k, v as parts 0-2; every other
    projection is the whole module (part 0 of 1)."""
    if name == "lm_head":
        return name, 0, 1
    if isinstance(model, GPTForCausalLM):
        layer, _, local = name.partition(".")
        index, _, local = local.partition(".")
        theirs, part = _GPT2_LINEARS[local]
        return f"transformer.h.{index}.{theirs}", part, len(_gpt2_fused()[theirs])
    if isinstance(model, BitNetForCausalLM):
        return _bitnet_name(name), 0, 1
    if isinstance(model, LlamaForCausalLM):
        return f"model.{name}", 0, 1
    raise SLMError(f"no native transformers format for family '{model.config.family}'")


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
        for theirs, ours in _gpt2_fused().items():
            weights = [sd[f"{p}{name}.weight"] for name in ours]
            out[f"{h}{theirs}.weight"] = torch.cat(weights, 0).t()
            out[f"{h}{theirs}.bias"] = torch.cat([bias(f"{name}.bias", w.shape[0]) for name, w in zip(ours, weights)])
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


_BITNET_RENAMES = {".self_attn.output_norm.": ".self_attn.attn_sub_norm.", ".mlp.inner_norm.": ".mlp.ffn_sub_norm."}


def _bitnet_name(key: str) -> str:
    """Our state-dict key -> transformers' BitNetForCausalLM key."""
    if key == "lm_head.weight":
        return key
    for ours, theirs in _BITNET_RENAMES.items():
        key = key.replace(ours, theirs)
    return "model." + key


def _check_bitnet_exportable(model: BitNetForCausalLM) -> None:
    cfg = model.config
    if cfg.attention == "mla":
        raise SLMError("multi-head latent attention has no transformers counterpart (its BitNetForCausalLM "
                       "is MHA/GQA only); export this model with --format safetensors or ternary")
    if cfg.sliding_window is not None:
        raise SLMError("transformers' BitNet has no sliding-window attention; export this model as safetensors")
    if cfg.num_attention_heads * cfg.dim_per_head != cfg.hidden_size:
        raise SLMError(f"transformers' BitNet sizes its attention SubLN by hidden_size ({cfg.hidden_size}), "
                       f"but heads x head_dim is {cfg.num_attention_heads * cfg.dim_per_head}; "
                       "export this model as safetensors")
    for name, module in bitlinear_modules(model).items():
        if module.out_features % 4:
            raise SLMError(f"transformers' packed BitLinear needs output sizes divisible by 4; {name} has "
                           f"{module.out_features}; export this model as safetensors or ternary")


def _bitnet_config(model: BitNetForCausalLM):
    tf = _transformers()
    cfg = model.config
    scaling = {k: v for k, v in (cfg.rope_scaling or {}).items() if k not in ("type", "rope_type")}
    hf_cfg = tf.BitNetConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_heads, hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings, initializer_range=cfg.initializer_range,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False,
        attention_dropout=cfg.attention_dropout,
        rope_parameters={"rope_type": rope_type(cfg.rope_scaling), "rope_theta": cfg.rope_theta, **scaling},
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    # offline packed BitLinear; our lm_head (and the embedding) stay float
    hf_cfg.quantization_config = {"quant_method": "bitnet", "linear_class": "bitlinear",
                                  "quantization_mode": "offline", "use_rms_norm": False,
                                  "rms_norm_eps": cfg.rms_norm_eps, "modules_to_not_convert": ["lm_head"]}
    hf_cfg.architectures = ["BitNetForCausalLM"]
    return hf_cfg


@torch.no_grad()
def _bitnet_state(model: BitNetForCausalLM) -> dict[str, torch.Tensor]:
    """Packed codes + scales for every BitLinear (frozen or not), float32 for the rest."""
    state: dict[str, torch.Tensor] = {}
    bitlinears = bitlinear_modules(model)
    for name, module in bitlinears.items():
        if module.frozen:
            codes, scale = module.weight_codes, module.weight_scale
        else:
            codes, scale = ternary_codes(module.weight)
        state[_bitnet_name(f"{name}.weight")] = pack_ternary_hf(codes.cpu())
        state[_bitnet_name(f"{name}.weight_scale")] = scale.reshape(1).float().cpu()
    skip = {f"{name}.{suffix}" for name in bitlinears for suffix in ("weight", "weight_codes", "weight_scale")}
    if model.config.tie_word_embeddings:
        skip.add("lm_head.weight")
    for key, tensor in model.state_dict().items():
        if key not in skip:
            state[_bitnet_name(key)] = tensor.float().cpu()
    return {k: v.contiguous() for k, v in state.items()}


def _write_bitnet(model: BitNetForCausalLM, directory: Path) -> None:
    _check_bitnet_exportable(model)
    directory.mkdir(parents=True, exist_ok=True)
    _bitnet_config(model).save_pretrained(str(directory))
    state = _bitnet_state(model)
    atomic_write(directory / "model.safetensors",
                 lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def to_transformers(model: CausalLM):
    """A transformers model object holding our weights (float32, eval mode).

    A bitnet model goes through a temporary export folder: transformers builds its packed
    BitLinear layers only when it loads a checkpoint with a quantization_config.
    """
    if isinstance(model, BitNetForCausalLM):
        with tempfile.TemporaryDirectory() as tmp:
            _write_bitnet(model, Path(tmp))
            return _transformers().AutoModelForCausalLM.from_pretrained(tmp).eval()
    if isinstance(model, GPTForCausalLM):
        hf = _gpt2_model(model)
    elif isinstance(model, LlamaForCausalLM):
        hf = _llama_model(model)
    else:
        raise SLMError(f"no native transformers format for family '{model.config.family}' yet; "
                       "use --format safetensors")
    return hf.float().eval()


def export_hf(model: CausalLM, directory: str | Path, tokenizer: Any = None) -> None:
    """Write a folder `transformers.AutoModelForCausalLM.from_pretrained` loads as is, and
    `AutoTokenizer.from_pretrained` too for byte and BPE tokenizers (`export/hf_tokenizer.py`)."""
    if isinstance(model, BitNetForCausalLM):
        _write_bitnet(model, Path(directory))
    else:
        to_transformers(model).save_pretrained(str(directory))
        for weights in Path(directory).glob("*.safetensors"):
            follow_umask(weights)  # transformers writes them through safetensors: 0600
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, directory, model.max_context)
        record_tokenizer(directory, tokenizer)


def _llama_config(hf_cfg, cls: type[LlamaConfig]) -> LlamaConfig:
    """Our Llama-style config (`llama` or `bitnet`) from a transformers config."""
    fields = {f.name for f in dataclasses.fields(cls)}
    raw = {k: v for k, v in hf_cfg.to_dict().items() if k in fields}
    rope = getattr(hf_cfg, "rope_parameters", None) or raw.get("rope_scaling")
    if isinstance(rope, dict):
        raw["rope_theta"] = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
        kind = rope.get("rope_type", rope.get("type", "default"))
        raw["rope_scaling"] = None if kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    raw = {k: v for k, v in raw.items() if v is not None or k in ("rope_scaling", "head_dim", "sliding_window")}
    raw.pop("sliding_window", None)
    return cls.from_dict(raw, where="transformers config")


def _load_mapped(model: CausalLM, state: dict[str, torch.Tensor], source: str) -> CausalLM:
    """Load a renamed transformers state dict, refusing any missing or extra tensor."""
    tied = {"lm_head.weight"} if model.lm_head.weight is model.embed_tokens.weight else set()
    state = {k: v for k, v in state.items() if k not in tied}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise SLMError(f"cannot map the transformers {source} onto our {model.config.family} family: "
                       f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def llama_from_transformers(hf_model) -> LlamaForCausalLM:
    """Our `llama` model from a transformers LlamaForCausalLM (from a folder or a GGUF file)."""
    model = LlamaForCausalLM(_llama_config(hf_model.config, LlamaConfig))
    state = {k.removeprefix("model."): v.float() for k, v in hf_model.state_dict().items()
             if "rotary_emb" not in k}
    return _load_mapped(model, state, "Llama")


_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def gpt_from_transformers(hf_model) -> GPTForCausalLM:
    """Our `gpt` model from a transformers GPT2LMHeadModel (the inverse of `_gpt2_state`)."""
    c = hf_model.config
    if c.activation_function not in _GPT2_ACTIVATIONS or not c.scale_attn_weights \
            or c.scale_attn_by_inverse_layer_idx or c.reorder_and_upcast_attn:
        raise SLMError(f"this GPT-2 uses settings our gpt family lacks (activation {c.activation_function!r}, "
                       "or non-default attention scaling); it cannot be imported")
    config = GPTConfig(vocab_size=c.vocab_size, n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head,
                       d_ff=c.n_inner, context_length=c.n_positions, dropout=0.0, bias=True,
                       activation=_GPT2_ACTIVATIONS[c.activation_function],
                       tie_embeddings=c.tie_word_embeddings, norm_eps=c.layer_norm_epsilon)
    sd = {k: v.float() for k, v in hf_model.state_dict().items()}
    state = {"embed_tokens.weight": sd["transformer.wte.weight"], "embed_positions.weight": sd["transformer.wpe.weight"],
             "norm.weight": sd["transformer.ln_f.weight"], "norm.bias": sd["transformer.ln_f.bias"],
             "lm_head.weight": sd["lm_head.weight"]}
    for i in range(c.n_layer):
        p, h = f"layers.{i}.", f"transformer.h.{i}."
        for norm in ("ln_1", "ln_2"):
            state[f"{p}{norm}.weight"], state[f"{p}{norm}.bias"] = sd[f"{h}{norm}.weight"], sd[f"{h}{norm}.bias"]
        for theirs, ours in _gpt2_fused().items():
            parts = zip(ours, sd[f"{h}{theirs}.weight"].t().chunk(len(ours)), sd[f"{h}{theirs}.bias"].chunk(len(ours)))
            for name, w, b in parts:
                state[f"{p}{name}.weight"], state[f"{p}{name}.bias"] = w, b
    return _load_mapped(GPTForCausalLM(config), {k: v.contiguous() for k, v in state.items()}, "GPT-2")


def bitnet_from_transformers(hf_model) -> BitNetForCausalLM:
    """Our `bitnet` model, frozen on the packed ternary codes, from a transformers BitNetForCausalLM."""
    model = BitNetForCausalLM(_llama_config(hf_model.config, BitNetConfig)).freeze_ternary()
    theirs = {v: k for k, v in _BITNET_RENAMES.items()}
    bitlinears = bitlinear_modules(model)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in hf_model.state_dict().items():
        if "rotary_emb" in key:
            continue
        name = key.removeprefix("model.")
        for hf_name, ours in theirs.items():
            name = name.replace(hf_name, ours)
        layer, _, leaf = name.rpartition(".")
        if layer in bitlinears and leaf == "weight":
            state[f"{layer}.weight_codes"] = unpack_ternary_hf(tensor, bitlinears[layer].out_features)
        elif layer in bitlinears and leaf == "weight_scale":
            state[name] = tensor.float().reshape(())
        else:
            state[name] = tensor.float()
    return _load_mapped(model, state, "BitNet")


_IMPORTERS = {"llama": llama_from_transformers, "gpt2": gpt_from_transformers, "bitnet": bitnet_from_transformers}


def importable(model_type: str | None) -> bool:
    """Whether a transformers folder of this `model_type` imports into one of our families."""
    return model_type in _IMPORTERS


def import_gguf_llama(path: str | Path) -> LlamaForCausalLM:
    """Our `llama` model from a Llama GGUF file (dequantised to float32 by transformers + gguf)."""
    path = Path(path)
    if not path.is_file():
        raise SLMError(f"GGUF file {path} does not exist")
    tf = _transformers()
    try:
        hf = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except ImportError as err:
        raise SLMError(f"reading GGUF needs `pip install gguf accelerate` ({str(err).splitlines()[0]})") from None
    if hf.config.model_type != "llama":
        raise SLMError(f"{path} holds a '{hf.config.model_type}' model; only Llama GGUF files can be imported")
    return llama_from_transformers(hf)


def import_hf(directory: str | Path) -> CausalLM:
    """Load a transformers checkpoint folder (config.json + safetensors) into our family:
    Llama -> `llama`, GPT-2 -> `gpt`, BitNet -> `bitnet` (what `export_hf` writes, and
    plain transformers folders of those types).

    Only safetensors weights are read (`use_safetensors=True`): a `pytorch_model.bin` is a
    pickle, which can run code when loaded, so a folder holding only that is refused.
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise SLMError(f"{directory} has no config.json; pass a transformers model folder")
    try:
        arch = json.loads((directory / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise SLMError(f"cannot read {directory / 'config.json'} ({type(err).__name__}); the folder is damaged") from None
    if arch not in _IMPORTERS:
        raise SLMError(f"{directory} holds a '{arch}' transformers model; only {sorted(_IMPORTERS)} folders "
                       "import into our families")
    if not any(directory.glob("*.safetensors")):
        pickles = sorted(p.name for p in directory.glob("*.bin"))
        found = f"only {', '.join(pickles)} (pickle, which can run code and is never loaded)" if pickles else "none"
        raise SLMError(f"{directory} has no safetensors weights ({found}); convert them to model.safetensors "
                       "in an environment you trust (transformers: save_pretrained(..., safe_serialization=True))")
    tf = _transformers()
    try:
        hf = tf.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                     use_safetensors=True)
    except OSError as err:  # e.g. stray .safetensors files but no model.safetensors
        raise SLMError(f"cannot load {directory}: {(str(err).splitlines() or ['?'])[0]}; it needs "
                       "model.safetensors (or a sharded model.safetensors.index.json)") from None
    return _IMPORTERS[arch](hf)
