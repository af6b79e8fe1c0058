"""LoRA adapters through `peft`, on our own model classes.

Measured before writing this: `peft.inject_adapter_in_model` wraps the `nn.Linear`
projections of our plain `nn.Module`s (BitLinear too, being a Linear subclass) in peft's
`lora.Linear`, and the model stays our `CausalLM` (same forward, generate, cache, trainer
code); `get_peft_model` also works but returns a `PeftModel` wrapper the trainer would have to
unwrap everywhere. So adapters are injected, peft marks everything else frozen, and the
optimizer only ever sees the adapter tensors.

On disk a LoRA run is peft's own format: `adapter_config.json` (its `LoraConfig`, with
`base_model_name_or_path` naming where the frozen base weights come from) and
`adapter_model.safetensors` (keys `base_model.model.<our module>.lora_A/B.weight`, what
`PeftModel.save_pretrained` writes for our model), so `peft.PeftModel.from_pretrained(our
model, folder)` loads it. The transformers-named copy for a `--format hf` export is written
by `export/lora.py` through export/hf.py's name mapping.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from simplified_slm.configbase import ConfigBase
from simplified_slm.errors import SLMError
from simplified_slm.ops.quant import GROUP_SIZES
from simplified_slm.utils.io import atomic_write

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's names
BASE_QUANTIZATION = "base_quantization.json"  # a QLoRA adapter's quantized base (`base_quantization`)
BASE_DIR = "base"  # <run>/base: the frozen weights of a LoRA run that did not start from a folder

# every projection of the attention and the MLP; the LM head and embeddings stay frozen
DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bitnet": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
}


@dataclasses.dataclass
class LoraSettings(ConfigBase):
    """`train.lora`: rank, scale (`alpha / r`), dropout on the adapter input, and the modules to
    adapt, by name or dotted suffix (`q_proj`, `attn.o_proj`); null: the family's default
    (`DEFAULT_TARGETS`, else every Linear but the LM head). `quantize_base` (QLoRA): the
    frozen base's linears and embeddings held packed in that scheme (`int4`, `int8`, `q4_0`,
    `bf16`, ... with `quantize_group_size`), the adapters trained in float32 over it."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    quantize_base: str | None = None
    quantize_group_size: int = 32

    def validate(self) -> None:
        if self.r < 1:
            self._fail("r", f"must be at least 1, got {self.r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            self._fail("alpha", f"must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            self._fail("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            self._fail("target_modules", "is an empty list; name modules or use null for the family's default")
        if self.quantize_base is not None:
            from simplified_slm.models.quantization import resolve_scheme

            try:
                scheme = resolve_scheme(self.quantize_base)
            except SLMError as err:
                self._fail("quantize_base", str(err))
            if scheme is None:
                self._fail("quantize_base", f"{self.quantize_base!r} means float32; use null for a float base")
        if self.quantize_group_size not in GROUP_SIZES:  # the group sizes the packed layouts take
            self._fail("quantize_group_size", f"must be one of {GROUP_SIZES}, got {self.quantize_group_size}")


def _peft():
    try:
        import peft
    except ImportError:
        raise SLMError("LoRA needs peft: pip install 'simplified-slm[finetune]'") from None
    return peft


def linear_names(model: nn.Module) -> list[str]:
    """Full names of the model's Linear modules, float or quantized (what LoRA can adapt)."""
    from simplified_slm.layers.quantized import QuantizedLinear

    return [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, QuantizedLinear))]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's own rule for a list of names


def resolve_targets(model: nn.Module, settings: LoraSettings) -> list[str]:
    """The target names to hand peft; each must match at least one Linear of the model."""
    names = linear_names(model)
    family = getattr(getattr(model, "config", None), "family", None)
    targets = settings.target_modules or DEFAULT_TARGETS.get(
        family, sorted({n.rsplit(".", 1)[-1] for n in names} - {"lm_head"}))
    for target in targets:
        if not any(_matches(name, target) for name in names):
            available = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise SLMError(f"train.lora.target_modules: {target!r} matches no Linear module of this "
                           f"{family} model; available: {', '.join(available)}")
    return list(targets)


def attach_lora(model: nn.Module, settings: LoraSettings, base: str | None = None) -> nn.Module:
    """Inject fresh adapters (B = 0, so the model's output is unchanged) in place; only they
    stay trainable. `base` is recorded as the adapter's `base_model_name_or_path`."""
    config = _peft().LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                target_modules=resolve_targets(model, settings), bias="none",
                                base_model_name_or_path=base)
    return _inject(model, config)


@functools.cache
def _quantized_lora_linear() -> type:
    """peft's LoRA Linear over our `QuantizedLinear` (QLoRA), registered with peft as a
    custom module: its forward (base(x) + B A x * scale) serves as is, but peft cannot read
    the sizes of a layer it does not know, and would cast the adapter to a bf16 base's
    storage dtype, where our quantized matmul computes in float32."""
    from peft.tuners.lora import Linear

    class QuantizedLoraLinear(Linear):
        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
            return base_layer.packed_codes.device, torch.float32

    return QuantizedLoraLinear


def _inject(model: nn.Module, config: Any) -> nn.Module:
    from simplified_slm.layers.quantized import QuantizedLinear

    if any(isinstance(module, QuantizedLinear) for module in model.modules()):
        config._register_custom_module({QuantizedLinear: _quantized_lora_linear()})
    model = _peft().inject_adapter_in_model(config, model)
    model.lora_config = config  # what save_adapter writes
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def has_lora(model: nn.Module) -> bool:
    return getattr(model, "lora_config", None) is not None


def lora_layers(model: nn.Module) -> dict[str, Any]:
    """{our module name: peft LoraLayer} for every adapted module."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def adapter_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{our module name: (lora_A weight (r, in), lora_B weight (out, r))}."""
    return {name: (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
            for name, layer in lora_layers(model).items()}


def named_adapter(model: nn.Module) -> tuple[dict[str, torch.Tensor], Any]:
    """The model's adapter as {`<our module>.lora_A/B.weight`: tensor} and its peft config."""
    tensors = {}
    for name, (a, b) in adapter_tensors(model).items():
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
    return tensors, model.lora_config


def save_adapter(directory: str | Path, tensors: dict[str, torch.Tensor], config: Any, tokenizer: Any = None,
                 base: str | None = None) -> None:
    """`adapter_config.json` + `adapter_model.safetensors` in peft's format (+ the tokenizer
    files, as `save_pretrained` writes them); `tensors` are keyed by module name (ours from
    `named_adapter`, or transformers' from `export/lora.py`); `base` overrides the config's
    `base_model_name_or_path`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config)
    if base is not None:
        config.base_model_name_or_path = base
    state = {PEFT_PREFIX + key: value.detach().float().cpu().contiguous() for key, value in tensors.items()}
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    config.save_pretrained(str(directory))
    if tokenizer is not None:
        from simplified_slm.tokenizers.identity import record_tokenizer

        tokenizer.save(directory)
        record_tokenizer(directory, tokenizer)


def read_adapter_config(directory: str | Path) -> Any:
    """peft's LoraConfig from `adapter_config.json`; SLMError if it is not one."""
    path = Path(directory) / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SLMError(f"cannot read {path} ({type(err).__name__}); the adapter folder is damaged") from None
    kind = raw.get("peft_type") if isinstance(raw, dict) else None
    if kind != "LORA":
        raise SLMError(f"{path} is not a LoRA adapter config (peft_type {kind!r}); pass a LoRA adapter folder")
    return _peft().LoraConfig.from_pretrained(str(path.parent))


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject the adapter saved in `directory` into `model` (ours, base weights already in
    place) and load its tensors; SLMError if they do not fit the model."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    if not has_lora(model):
        model = _inject(model, config)
    load_adapter_weights(model, directory)
    return model


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    path = Path(directory) / ADAPTER_WEIGHTS
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise SLMError(f"cannot read adapter {path}: {str(err).splitlines()[0]}; the file is missing or "
                       "corrupt") from None
    own = adapter_tensors(model)
    expected = {f"{PEFT_PREFIX}{name}.lora_{x}.weight": t for name, pair in own.items() for x, t in zip("AB", pair)}
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise SLMError(f"adapter {path} does not fit this model (missing {missing[:2]}, unexpected "
                       f"{unexpected[:2]}); it was trained on another model or with other target_modules")
    with torch.no_grad():
        for key, tensor in saved.items():
            if expected[key].shape != tensor.shape:
                raise SLMError(f"adapter {path}: '{key}' has shape {tuple(tensor.shape)}, the model expects "
                               f"{tuple(expected[key].shape)}; the adapter's rank or the base model differ")
            expected[key].copy_(tensor)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (peft's `merge`) and put the plain layers back,
    so the model saves, exports and runs like one that was never adapted."""
    from simplified_slm.layers.bitlinear import BitLinear

    if any(isinstance(layer.get_base_layer(), BitLinear) for layer in lora_layers(model).values()):
        raise SLMError("LoRA on ternary BitLinear layers cannot be merged: the float update would be "
                       "re-quantised to {-1, 0, 1} and change the model; keep the adapter separate")
    return unload_lora(model, merge=True)


def unload_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put each adapted layer's base layer back in its place (folding the adapter in first
    with `merge`); without it the result is the frozen base model. A quantized (QLoRA) base
    comes back dequantized to float32: the weights the adapter was trained with."""
    from simplified_slm.layers.quantized import QuantizedLinear
    from simplified_slm.models.quantization import dequantize_in_place

    for name, layer in lora_layers(model).items():
        base = layer.get_base_layer()
        if isinstance(base, QuantizedLinear):  # QLoRA: the float weights the adapter was trained against
            layer.base_layer = base = base.to_linear().requires_grad_(False)
        if merge:
            layer.merge(safe_merge=True)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, base)
    model.lora_config = None
    return dequantize_in_place(model)  # the rest of a quantized base (untargeted linears, embeddings)


def load_base_weights(model: nn.Module, base: str | Path) -> None:
    """Copy the frozen base weights from `base` (anything `models.load` reads) into `model`,
    before adapters are injected (a LoRA checkpoint holds only the adapter)."""
    from simplified_slm.models.loading import load

    source = load(base, "cpu", quantize="none").model
    try:  # the run may lay shape-neutral fields (dropout, rope_scaling) over the base's config
        model.load_state_dict(source.state_dict())
    except RuntimeError as err:
        raise SLMError(f"the LoRA base model {base} does not fit this run's model "
                       f"({str(err).splitlines()[-1].strip()[:120]}); restore it, or start a new run") from None


def prepare_lora_run(model: nn.Module, settings: LoraSettings, run_dir: Path, start: Path | None,
                     tokenizer: Any, base: str | None = None, is_main: bool = True) -> nn.Module:
    """The trainer's hook: the run's base weights, then fresh adapters on them.

    A fresh run records where its frozen weights come from: `base` (the folder or file the
    run started from), else they are saved once to `<run>/base`. A resumed run reloads them
    from there (its checkpoints hold only the adapter); the trainer then loads the adapter.
    """
    if start is not None:
        recorded = read_adapter_config(start).base_model_name_or_path
        if not recorded:
            raise SLMError(f"checkpoint {start} holds a LoRA adapter without base_model_name_or_path; "
                           "it cannot be resumed")
        load_base_weights(model, recorded)
        base = recorded
    elif base is None:
        base_dir = Path(run_dir) / BASE_DIR
        if is_main:
            model.save_pretrained(base_dir, tokenizer=tokenizer)
        base = str(base_dir)
    if settings.quantize_base is not None:  # QLoRA: the frozen weights packed, after any float copy is saved
        from simplified_slm.models.quantization import quantize_in_place

        quantize_in_place(model, settings.quantize_base, settings.quantize_group_size)
    return attach_lora(model, settings, base=str(Path(base).resolve()))


def base_quantization(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The quantized base of a QLoRA model as `models.quantization.quantization_record` gives
    it, under the module names of the unadapted model; empty for a float base."""
    from simplified_slm.models.quantization import quantization_record

    return {name.replace(".base_layer", ""): {**entry, **({"tied": entry["tied"].replace(".base_layer", "")}
                                                          if "tied" in entry else {})}
            for name, entry in quantization_record(model).items()}


def quantize_base_as_recorded(model: nn.Module, record: dict[str, dict[str, Any]], where: str) -> None:
    """Quantize a float base the way a QLoRA run did (`base_quantization` of its model)."""
    from simplified_slm.models.quantization import quantization_record, quantize_in_place

    kinds = {(entry["scheme"], entry["group_size"]) for entry in record.values()}
    if len(kinds) == 1:
        [(scheme, group_size)] = kinds
        quantize_in_place(model, scheme, group_size or 32)
    if len(kinds) != 1 or quantization_record(model) != record:
        raise SLMError(f"{where} records a quantized LoRA base this model cannot be quantized to again; "
                       "it was written by another version, restore the checkpoint's own file")


def load_adapted(directory: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Base model + adapter from a LoRA checkpoint or adapter folder (what `models.load` calls
    for one): the base comes from the adapter's `base_model_name_or_path`."""
    from simplified_slm.models.base import CONFIG_FILE
    from simplified_slm.models.loading import load
    from simplified_slm.models.registry import build_model, config_from_dict

    directory = Path(directory)
    base = read_adapter_config(directory).base_model_name_or_path
    if not base or not Path(base).exists():
        raise SLMError(f"the LoRA adapter in {directory} names base model {base!r}, which is not there; "
                       "restore the base model (the run's base/ folder or the model it started from)")
    if (directory / CONFIG_FILE).is_file():  # a checkpoint: the run's own config over the base's weights
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        model = build_model(config_from_dict(config, where=str(directory / CONFIG_FILE)))
        load_base_weights(model, base)
    else:
        model = load(base, device, quantize="none").model
    record_path = directory / BASE_QUANTIZATION
    if record_path.is_file():  # QLoRA: the base quantized as it was in training
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))["modules"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SLMError(f"cannot read {record_path} ({type(err).__name__}); the adapter folder is damaged") from None
        quantize_base_as_recorded(model, record, str(record_path))
    return load_adapter(model, directory).to(device)
