"""The one interface every model family implements.

`CausalLM.forward(input_ids, attention_mask, labels, cache, use_cache)` returns a
`CausalLMOutput`; `generate` is shared; `save_pretrained`/`from_pretrained` write and read
`config.json` + `model.safetensors` so a saved model reloads bit-exactly as the right family.
`quantize` swaps in weight-only quantized linears; a quantized model saves its packed
buffers plus `quantization.json` and reloads quantized (models/quantization.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from simplified_slm.errors import SLMError
from simplified_slm.models.config import ModelConfig
from simplified_slm.utils.io import atomic_write, atomic_write_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # already weighted; the trainer adds it to the loss
    cache: Any = None


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `logits[b, t]` against `targets[b, t]` (-100 = ignored)."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=-100)


def shifted_labels_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Transformers' convention: `labels` align with `input_ids`; position t predicts t+1."""
    return next_token_loss(logits[:, :-1], labels[:, 1:])


def normal_init(model: nn.Module, std: float) -> None:
    """Normal(0, std) for every Linear/Embedding weight (BitLinear's latent weights included),
    zero Linear biases: the GPT-2/Llama init every family starts from. Norm weights keep
    their construction values (ones, zero biases)."""
    def init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight is not None:
            nn.init.normal_(module.weight, 0.0, std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    model.apply(init)


def positions_from_mask(attention_mask: torch.Tensor | None, past_len: int, q_len: int,
                        device: torch.device) -> torch.Tensor:
    """Position of each new token: its index among the real (unpadded) tokens so far.

    With left padding this gives a prompt the same positions as when it runs alone, which
    is what makes batched generation equal to one-by-one generation.
    """
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device).unsqueeze(0)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions[:, past_len:past_len + q_len].clamp(min=0)


class CausalLM(nn.Module):
    """Base class: families implement `forward`, `make_cache` and `max_context`."""

    config_class: ClassVar[type[ModelConfig]] = ModelConfig

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def max_context(self) -> int | None:
        """Longest sequence the model can attend over (None: unbounded, e.g. recurrent)."""
        return None

    def make_cache(self, batch_size: int, max_length: int) -> Any:
        """A fresh generation cache for `batch_size` sequences of up to `max_length` tokens."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations (and so KV caches) run in: that of the float parameters,
        which quantized models keep for their norms."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def quantize(self, scheme: str, group_size: int = 32, skip: Sequence[str] = ()) -> "CausalLM":
        """Weight-only quantization in place (inference only): every float linear and embedding
        (a tied pair keeps one packed copy; BitLinear keeps its ternary codes) becomes
        `scheme`: `int8` (= q8_0), `int4` (= q4_1), q8_0, q4_0, q4_1 with `group_size` 32 / 64
        / 128 weights per scale, or bf16 / fp16. `skip`: fnmatch patterns of module names to
        keep float (e.g. "lm_head"). Returns the model."""
        from simplified_slm.models.quantization import quantize_in_place

        quantize_in_place(self, scheme, group_size, skip)
        return self

    def init_weights(self) -> None:
        """Give every parameter its initial value; each family's docstring has its table.

        Called once at the end of `__init__` (before tying embeddings), so the same seed
        gives the same initial weights.
        """
        raise NotImplementedError

    @torch.no_grad()
    def freeze_ternary(self, int8: bool = False) -> "CausalLM":
        """Replace every BitLinear's float weight by int8 ternary codes + scale (inference only).

        `int8=True` runs the frozen layers as integer matmuls; families without BitLinear
        layers are returned unchanged.
        """
        from simplified_slm.layers.bitlinear import BitLinear

        for module in self.modules():
            if isinstance(module, BitLinear):
                module.freeze(int8=int8)
        return self

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen: set[int] = set()
        total = 0
        for name, param in self.named_parameters():
            if id(param) in seen or (exclude_embeddings and "embed" in name):
                continue
            seen.add(id(param))
            total += param.numel()
        return total

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """Refuse ids the embedding cannot hold with a message instead of an index error."""
        if input_ids.dim() != 2:
            raise SLMError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if input_ids.numel() and (int(input_ids.max()) >= self.config.vocab_size or int(input_ids.min()) < 0):
            raise SLMError(f"token id {int(input_ids.max())} is outside the model's vocab of "
                           f"{self.config.vocab_size}; the tokenizer and model do not match")

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int | None = None, **kwargs: Any) -> torch.Tensor:
        """Prompt + continuation ids; see `simplified_slm.generation.generate` for options
        (ours and transformers' spellings: `max_length`, `do_sample`, `pad_token_id`,
        `eos_token_id`)."""
        from simplified_slm.generation.generate import generate  # generation sits above models

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def save_pretrained(self, directory: str | Path, tokenizer: Any = None) -> None:
        from simplified_slm.models.quantization import QUANTIZATION_FILE, quantization_record, summary

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(directory / CONFIG_FILE, self.config.to_dict())
        record = quantization_record(self)
        if record:  # written before the weights: packed weights never sit beside a float record
            atomic_write_json(directory / QUANTIZATION_FILE, {"summary": summary(record), "modules": record})
        else:
            (directory / QUANTIZATION_FILE).unlink(missing_ok=True)
        state = _unique_state(self)
        atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={
            "format": "pt", "family": self.config.family}))
        if tokenizer is not None:
            from simplified_slm.tokenizers.identity import record_tokenizer  # tokenizers sit below models

            tokenizer.save(directory)
            record_tokenizer(directory, tokenizer)  # `models.load` refuses other tokenizer files

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "CausalLM":
        """Load a model saved by `save_pretrained` (any family when called on CausalLM)."""
        from simplified_slm.models.registry import config_from_dict, model_class

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise SLMError(f"{path} is missing; pass a directory written by save_pretrained or `slm train`")
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise SLMError(f"{config_path} is not valid JSON ({err.msg}); the checkpoint is corrupt") from None
        config = config_from_dict(raw, where=str(config_path))
        klass = model_class(config.family)
        if cls is not CausalLM and not issubclass(klass, cls):
            raise SLMError(f"{directory} holds a '{config.family}' model, not a {cls.__name__}; "
                           f"load it with CausalLM.from_pretrained or the matching class")
        from simplified_slm.models.quantization import QUANTIZATION_FILE

        if (directory / QUANTIZATION_FILE).is_file():
            return _load_quantized(directory, config, weights_path, map_location)
        model = klass(config)
        model.load_weights(weights_path, map_location)
        return model

    def load_weights(self, weights_path: str | Path, map_location: str | torch.device = "cpu") -> None:
        """Load safetensors weights, refusing files of another shape or architecture."""
        try:
            state = load_file(str(weights_path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as err:
            raise SLMError(f"cannot read weights {weights_path}: {str(err).splitlines()[0]}; "
                           "the file is truncated or corrupt") from None
        own = self.state_dict()
        missing = [k for k in _unique_state(self) if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise SLMError(f"weights {weights_path} do not fit this {self.config.family} model ({detail}); "
                           "the checkpoint is from another architecture or config")
        for key, tensor in state.items():
            if own[key].shape != tensor.shape:
                raise SLMError(f"weights {weights_path}: '{key}' has shape {tuple(tensor.shape)} but the model "
                               f"expects {tuple(own[key].shape)}; config.json and weights disagree")
        self.load_state_dict(state, strict=False)


def _load_quantized(directory: Path, config: ModelConfig, weights_path: Path,
                    map_location: str | torch.device) -> "CausalLM":
    """A saved quantized model: its modules rebuilt empty on the meta device as
    quantization.json says, then the packed tensors put in place (no float copy exists)."""
    from simplified_slm.models.quantization import QUANTIZATION_FILE, build_skeleton, load_packed_state

    path = directory / QUANTIZATION_FILE
    try:
        record = json.loads(path.read_text())["modules"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SLMError(f"{path} is unreadable ({type(err).__name__}); the quantized model folder is damaged") from None
    model = build_skeleton(config, record)
    try:
        state = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise SLMError(f"cannot read weights {weights_path}: {str(err).splitlines()[0]}; "
                       "the file is truncated or corrupt") from None
    load_packed_state(model, state, str(weights_path))
    return model


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the second name of tied tensors (safetensors refuses shared memory)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        if ptr in seen and tensor.numel():
            continue
        seen.add(ptr)
        out[key] = tensor.detach().contiguous()
    return out
