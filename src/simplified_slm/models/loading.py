"""The one way to load a model for inference: `load(path, device)` -> model + tokenizer.

Every consumer (`slm eval/generate/export/boundaries`, distillation teachers,
`scripts/evaluate_model.py`) goes through here, so each kind of model on disk is
recognised, verified and paired with its tokenizer the same way:

- a training checkpoint folder (`manifest.json`): every file is verified first; a LoRA
  run's (`adapter_config.json`) is its config + the base weights it names + the adapter;
- our model folder (`config.json` with `family`, from `save_pretrained` or an export);
- a packed ternary folder (`model.ternary.safetensors`);
- a transformers folder (`config.json` with `model_type` llama / gpt2 / bitnet, safetensors
  weights only): a `--format hf` export of ours or a plain transformers model;
- a `.gguf` file (Llama), its tokenizer read from the file by transformers;
- a file inside a model folder (e.g. its model.safetensors) stands for the folder.

Quantization (`quantize=`, the CLI's `--quantize`): by default a model loads as stored: a
GGUF keeps its Q8_0 / Q4_0 / Q4_1 tensors packed (read by `export/gguf.py`), a quantized
folder (`quantization.json`) stays quantized, everything else is float32. `"none"` asks
for float32 (what training and float parity checks need: a GGUF is then dequantized by
gguf, a quantized folder's packed weights are expanded). A scheme (`int8`, `int4`, `q4_1`,
`bf16`, ...) quantizes on load: our folders and GGUF files tensor by tensor from the file
(`models/quantization.build_model`, never holding the float model), other formats after
loading them in float. A quantized folder is not requantized to another scheme.

The tokenizer is checked before any weight is read: against the identity the folder
recorded when it was saved (`tokenizers/identity.py`; folders from before that record
still load) and, after loading, against the model's vocab size. The result is in eval mode
with gradients off. Sideways imports: the formats are read by `export/` (transformers,
GGUF, packed ternary) and checkpoints verified by `training/checkpoint.py`; both import
lazily, inside the functions, as distillation already does, so importing `models` does
not load transformers or the trainer.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from simplified_slm.errors import SLMError
from simplified_slm.models.base import CONFIG_FILE, WEIGHTS_FILE, CausalLM
from simplified_slm.models.quantization import (QUANTIZATION_FILE, SafetensorsWeights, build_model,
                                                dequantize_in_place, meta_model, quantization_record,
                                                resolve_scheme, summary, uniform_plan)
from simplified_slm.ops.quant import FLOAT_SCHEMES
from simplified_slm.tokenizers import Tokenizer, load_tokenizer
from simplified_slm.tokenizers.base import SLM_TOKENIZER_CONFIG, TOKENIZER_CONFIG
from simplified_slm.tokenizers.bpe import TOKENIZER_FILE
from simplified_slm.tokenizers.identity import check_tokenizer_record

SourceKind = Literal["checkpoint", "folder", "packed", "transformers", "gguf"]
_ACCEPTED = "pass a checkpoint or model folder, a transformers model folder or a .gguf file"


@dataclass(frozen=True)
class ModelSource:
    """Where a model is and in which format; `open` recognises (and verifies) it."""

    path: Path  # the model folder, or the .gguf file
    kind: SourceKind

    @classmethod
    def open(cls, path: str | Path) -> "ModelSource":
        """Recognise the format at `path`; a training checkpoint's manifest is verified here."""
        path = Path(path)
        if not path.exists():
            raise SLMError(f"{path} does not exist; {_ACCEPTED}")
        if path.is_file():
            if path.suffix == ".gguf":
                return cls(path, "gguf")
            path = path.parent  # a file inside a model folder, e.g. .../model.safetensors
        from simplified_slm.export.ternary import PACKED_FILE
        from simplified_slm.training.checkpoint import MANIFEST, verify_checkpoint

        if (path / MANIFEST).is_file():
            verify_checkpoint(path)
            return cls(path, "checkpoint")
        if (path / PACKED_FILE).is_file():
            return cls(path, "packed")
        config = path / CONFIG_FILE
        if not config.is_file():
            raise SLMError(f"{path} holds no model ({CONFIG_FILE} is missing); {_ACCEPTED}")
        try:
            raw = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise SLMError(f"cannot read {config} ({type(err).__name__}); the model folder is damaged") from None
        if isinstance(raw, dict) and "family" in raw:
            return cls(path, "folder")
        if isinstance(raw, dict) and "model_type" in raw:
            return cls(path, "transformers")
        raise SLMError(f"{config} names neither a family of ours nor a transformers model_type; {_ACCEPTED}")

    def tokenizer(self) -> Tokenizer:
        """The tokenizer stored with the model, refused if it is not the one the folder recorded."""
        if self.kind == "gguf":
            return _gguf_tokenizer(self.path)
        if not any((self.path / name).is_file() for name in (TOKENIZER_CONFIG, SLM_TOKENIZER_CONFIG, TOKENIZER_FILE)):
            raise SLMError(f"{self.path} has no tokenizer files, so its ids cannot be read as text; save the "
                           "model with its tokenizer (save_pretrained(dir, tokenizer=...))")
        tokenizer = load_tokenizer(self.path)
        check_tokenizer_record(self.path, tokenizer)
        return tokenizer

    def model(self, tokenizer: Tokenizer, device: torch.device | str = "cpu", quantize: str | None = None,
              group_size: int = 32) -> CausalLM:
        """The weights on `device`, in eval mode with gradients off; refuses a tokenizer with
        more ids than the model's vocab. `quantize`: see the module docstring."""
        scheme = None if quantize is None else resolve_scheme(quantize)
        if self.kind == "gguf":
            from simplified_slm.export.gguf import load_gguf

            model: CausalLM = load_gguf(self.path, quantize, group_size)
        elif self.kind == "transformers":
            from simplified_slm.export.hf import import_hf

            model = _quantized(import_hf(self.path), scheme, group_size)
        elif self.kind == "packed":
            from simplified_slm.export.ternary import load_packed

            model = _quantized(load_packed(self.path), scheme, group_size)
        elif (self.path / "adapter_config.json").is_file():  # a LoRA run: its base + the adapter
            from simplified_slm.training.lora import load_adapted

            model = _quantized(load_adapted(self.path), scheme, group_size)
        else:
            model = self._folder_model(quantize, scheme, group_size)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise SLMError(f"the tokenizer of {self.path} has {tokenizer.vocab_size} ids but the model only "
                           f"{model.config.vocab_size}; they do not belong together")
        model.to(device).eval()
        for param in model.parameters():  # inference only; no process-wide autograd switch
            param.requires_grad_(False)
        return model

    def _folder_model(self, quantize: str | None, scheme: str | None, group_size: int) -> CausalLM:
        """Our folder (or checkpoint), as stored or quantized tensor by tensor from its file."""
        stored = self.path / QUANTIZATION_FILE
        if stored.is_file():
            model = CausalLM.from_pretrained(self.path)
            if quantize is None:
                return model
            if scheme is None:
                return dequantize_in_place(model)
            have = summary(quantization_record(model))
            if have != summary({"": {"scheme": scheme, "group_size": 0 if scheme in FLOAT_SCHEMES else group_size}}):
                raise SLMError(f"{self.path} is stored quantized as {have}; it is not requantized to {quantize} "
                               f"(that loses accuracy twice): load it without --quantize, or quantize its float "
                               "original")
            return model
        if scheme is None:
            return CausalLM.from_pretrained(self.path)
        config = _folder_config(self.path)
        source = SafetensorsWeights(self.path / WEIGHTS_FILE)
        plan = uniform_plan(meta_model(config), scheme, group_size)
        return build_model(config, source, plan, str(self.path / WEIGHTS_FILE))

    def weight_files(self) -> list[Path]:
        """The files the weights come from (what a cache of the model's outputs is keyed by)."""
        if self.kind == "gguf":
            return [self.path]
        if self.kind == "transformers":
            return [self.path / CONFIG_FILE, *sorted(self.path.glob("*.safetensors"))]
        from simplified_slm.export.ternary import PACKED_FILE

        return [self.path / CONFIG_FILE, self.path / (PACKED_FILE if self.kind == "packed" else WEIGHTS_FILE)]


class LoadedModel(NamedTuple):
    model: CausalLM
    tokenizer: Tokenizer
    source: ModelSource


def load(path: str | Path, device: torch.device | str = "cpu", quantize: str | None = None,
         group_size: int = 32) -> LoadedModel:
    """Model + tokenizer from any format in the module docstring, ready for inference on
    `device` (`auto`: CUDA where there is a GPU). `quantize`: None loads as stored (a GGUF
    stays quantized), "none" in float32, a scheme quantizes on load (`int8`, `int4`, ...)."""
    device = resolve_device(device)
    if quantize is not None:
        resolve_scheme(quantize)  # a bad name fails before anything is read
    source = ModelSource.open(path)
    tokenizer = source.tokenizer()
    return LoadedModel(source.model(tokenizer, device, quantize, group_size), tokenizer, source)


def _quantized(model: CausalLM, scheme: str | None, group_size: int) -> CausalLM:
    """A model loaded in float, quantized when a scheme was asked for."""
    return model if scheme is None else model.quantize(scheme, group_size)


def _folder_config(path: Path):
    """The config of our model folder (read again by `from_pretrained` on the plain path)."""
    from simplified_slm.models.registry import config_from_dict

    config_path = path / CONFIG_FILE
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise SLMError(f"cannot read {config_path} ({type(err).__name__}); the model folder is damaged") from None
    return config_from_dict(raw, where=str(config_path))


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` is CUDA where there is a GPU, else the CPU; a CUDA device without CUDA is an error."""
    if str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SLMError(f"device {name!r} was asked for but CUDA is not available; use --device cpu or auto")
    return device


def _gguf_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer inside a GGUF file, through transformers and a tokenizer.json on disk."""
    try:
        import transformers

        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as err:
        raise SLMError(f"reading a GGUF file needs `pip install transformers gguf` "
                       f"({str(err).splitlines()[0]})") from None
    with tempfile.TemporaryDirectory() as tmp:  # through the files, as any HF tokenizer folder
        hf_tokenizer.save_pretrained(tmp)
        return load_tokenizer(tmp)
