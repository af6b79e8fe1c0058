"""`train.init_from`: start a run from pretrained weights instead of random ones.

The source is anything the one loader (`models.load`) reads: a checkpoint or model folder
of ours, a transformers folder (safetensors) or a GGUF file, loaded as float weights. Only
the weights carry over; the step, optimizer and schedule start fresh. The run's model is
the source's config with the experiment's `model` fields laid over it where they leave
every weight's shape alone (dropout, rope_scaling, the attention kernel, ...); a field that
changes a shape (family, sizes, vocab) is a one-line error naming both values. The
tokenizer is the source's unless the config names another, which must then be the same
tokenizer. A resumed run rebuilds its model from its own checkpoint and never re-reads the
source; under DDP every rank loads the same source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from simplified_slm.errors import SLMError
from simplified_slm.models.base import CONFIG_FILE, CausalLM
from simplified_slm.models.config import ModelConfig
from simplified_slm.models.loading import ModelSource, load
from simplified_slm.models.registry import build_model, config_from_dict
from simplified_slm.tokenizers import Tokenizer, build_tokenizer, tokenizer_digest
from simplified_slm.training.config import ExperimentConfig


def is_model_source(path: str | Path | None) -> bool:
    """A .gguf file or a folder holding a model config (what `models.load` opens)."""
    if not path:
        return False
    path = Path(path)
    return (path.is_file() and path.suffix == ".gguf") or (path.is_dir() and (path / CONFIG_FILE).is_file())


def run_tokenizer(cfg: ExperimentConfig, texts: Callable[[], Iterable[str]]) -> Tokenizer:
    """The tokenizer a fresh run builds: a model source's own when `tokenizer.path` names one
    (an init_from run without a tokenizer section points it at the source), else the config's."""
    if cfg.tokenizer.kind == "file" and is_model_source(cfg.tokenizer.path):
        return ModelSource.open(cfg.tokenizer.path).tokenizer()
    return build_tokenizer(cfg.tokenizer, texts)


def pretrained_model(cfg: ExperimentConfig, tokenizer: Tokenizer, device: torch.device) -> CausalLM:
    """The source's weights (float, trainable, on `device`) under the run's model config."""
    path = cfg.train.init_from
    loaded = load(path, device)
    if tokenizer_digest(tokenizer) != tokenizer_digest(loaded.tokenizer):
        raise SLMError(f"the configured tokenizer ({tokenizer.kind}, {tokenizer.vocab_size} ids) is not the "
                       f"tokenizer of train.init_from {path} ({loaded.tokenizer.kind}, "
                       f"{loaded.tokenizer.vocab_size} ids); remove the tokenizer section to use the source's")
    model = _with_config_fields(loaded.model, cfg.model, path).to(device)
    for param in model.parameters():
        param.requires_grad_(True)
    return model.train()


def checkpoint_model_config(start: Path) -> ModelConfig:
    """A resumed init_from run's model config: its own checkpoint's (the source is not read)."""
    return config_from_dict(json.loads((Path(start) / CONFIG_FILE).read_text(encoding="utf-8")),
                            where=str(Path(start) / CONFIG_FILE))


def _with_config_fields(model: CausalLM, fields: dict[str, Any], path: str) -> CausalLM:
    """`model` with the experiment's model fields applied; refused where a weight's shape changes."""
    source = model.config.to_dict()
    if fields.get("family", source["family"]) != source["family"]:
        raise SLMError(f"model.family is {fields['family']!r} but train.init_from {path} holds a "
                       f"{source['family']!r} model; remove model.family or init from a {fields['family']} model")
    changed = {k: v for k, v in fields.items() if k not in ("family", "preset") and source.get(k) != v}
    if "preset" in fields:
        raise SLMError(f"model.preset does not apply with train.init_from ({path} fixes the sizes); remove it")
    if not changed:
        return model
    new = build_model(config_from_dict({**source, **changed}, where="model"))
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in new.state_dict().items()}
    if theirs != ours:
        described = ", ".join(f"model.{k} = {v!r} (source: {source.get(k)!r})" for k, v in changed.items())
        raise SLMError(f"{described} would change the shapes of train.init_from {path}'s weights; "
                       "remove those fields from the model section")
    new.load_state_dict(model.state_dict())
    return new
