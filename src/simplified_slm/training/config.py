"""The experiment config: one file names the model, tokenizer, data, training and hooks.

Model fields stay a plain mapping here and are parsed by the model registry, so each family
validates its own fields; the vocab size is taken from the tokenizer unless the file sets it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import yaml

from simplified_slm.configbase import ConfigBase, parse_error_where, read_config_file
from simplified_slm.data.prepare import DataConfig
from simplified_slm.data.sampler import SAMPLER_MODES
from simplified_slm.errors import SLMError
from simplified_slm.models.config import ModelConfig
from simplified_slm.models.registry import config_from_dict
from simplified_slm.tokenizers import TokenizerConfig
from simplified_slm.training.distributed import STRATEGIES
from simplified_slm.training.loggers import LOGGERS
from simplified_slm.training.optim import OPTIMIZERS, SCHEDULES
from simplified_slm.training.precision import PRECISIONS


@dataclasses.dataclass
class PhaseConfig(ConfigBase):
    """One curriculum phase: its steps, and whatever it changes from the train section
    (unset fields inherit it). The lr schedule (warmup included) restarts in each phase."""

    steps: int = 0
    name: str = ""
    block_size: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None
    lr_schedule: str | None = None
    dataset: str | None = None  # built-in name or path; null: the data section's training text
    # RoPE scaling from this phase on (a HF `rope_scaling` mapping, e.g. {"rope_type": "linear",
    # "factor": 4}): "train short, extend long" (training/curriculum.py::apply_rope_scaling)
    rope_scaling: dict[str, Any] | None = None

    def validate(self) -> None:
        if self.rope_scaling is not None:
            from simplified_slm.layers.rope import validate_rope_scaling

            problem = validate_rope_scaling(self.rope_scaling)
            if problem:
                self._fail("rope_scaling", problem)
        if self.steps < 1:
            self._fail("steps", f"must be at least 1, got {self.steps}")
        if self.dataset == "":
            self._fail("dataset", "is an empty string; use null for the data section's text")

    def overrides(self) -> dict[str, Any]:
        """The train fields this phase sets."""
        fields = ("block_size", "batch_size", "lr", "min_lr", "warmup_steps", "lr_schedule")
        return {k: getattr(self, k) for k in fields if getattr(self, k) is not None}


@dataclasses.dataclass
class TrainConfig(ConfigBase):
    max_steps: int = 2000
    batch_size: int = 12
    block_size: int = 64
    grad_accum_steps: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # cosine | linear | constant | cosine_restarts
    restart_period: int = 1000  # cosine_restarts: steps of the first cycle after warmup
    restart_mult: float = 1.0  # cosine_restarts: each cycle this many times longer than the last
    muon_lr: float = 0.02  # optimizer muon: lr of the hidden weight matrices (AdamW keeps `lr`)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float | None = 1.0
    sampler: str = "random"  # random | sequential
    eval_every: int = 250
    eval_batches: int | None = 20  # None: the whole validation split
    sample_every: int = 500
    sample_tokens: int = 200
    sample_prompt: str = "\n"
    sample_temperature: float = 0.8
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    precision: str = "fp32"  # fp32 | bf16 | auto (bf16 where the device does it fast)
    # torch.compile the training forward + loss as one graph: a few % more tokens/s on CPU at
    # nanoGPT's size, after ~5 s (cached) to ~25 s (cold) of compiling; pays off only on long runs
    compile: bool = False
    distributed: str = "ddp"  # under torchrun / accelerate launch: ddp (replicas) | fsdp (sharded)
    gradient_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    device: str = "auto"
    time_limit_s: float | None = None  # stop (with a checkpoint) after this much training time
    # seconds of training (evaluation excluded) the lr schedule spans: warmup and decay follow the
    # clock (warmup_steps / max_steps is the warmup's share), max_steps becomes a cap
    time_budget: float | None = None
    max_nonfinite_steps: int = 5  # NaN/inf steps in a row before stopping with a checkpoint
    loggers: list[str] = dataclasses.field(default_factory=lambda: ["csv", "console"])
    progress: bool = True
    # knowledge distillation (training/distill.py): loss = alpha * T² * KD + (1 - alpha) * CE
    use_distillation: bool = False
    distillation_teacher: str | None = None  # anything models.load reads (our folders, transformers, .gguf)
    distillation_alpha: float = 0.5  # weight of the teacher term
    distillation_temperature: float = 3.0
    distillation_top_k: int | None = None  # keep the teacher's top-k logits per position; None: full vocab
    distillation_cache_dir: str | None = None  # store the teacher's top-k logits here and reuse them
    # start from these weights (training/init_from.py): a checkpoint or model folder, a transformers
    # folder or a .gguf file; the step and optimizer start fresh
    init_from: str | None = None
    # data.format chat: greedy exact-match accuracy on this many held-out examples at each eval (0: off)
    eval_exact_match: int = 0
    # curriculum: phases run one after another; max_steps must equal the sum of their steps
    phases: list[PhaseConfig] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["phases"] = [p.to_dict() for p in self.phases]
        return out

    def phase_configs(self) -> list[tuple[int, "TrainConfig", PhaseConfig | None]]:
        """(first step, the train config in force, the phase) for each phase in order; a run
        without phases is one phase. Each phase's config has `max_steps` = its own length, so
        `learning_rate(step - first step, config)` lays its schedule over the phase."""
        if not self.phases:
            return [(0, self, None)]
        out, start = [], 0
        for phase in self.phases:
            changes = {**phase.overrides(), "max_steps": phase.steps, "phases": []}
            out.append((start, self.replace(**changes), phase))
            start += phase.steps
        return out

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "block_size", "grad_accum_steps", "eval_every",
                     "sample_every", "log_every", "checkpoint_every", "keep_checkpoints",
                     "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                self._fail(name, f"must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            self._fail("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        for name in ("lr", "min_lr", "weight_decay"):
            if not math.isfinite(getattr(self, name)):
                self._fail(name, f"must be a finite number, got {getattr(self, name)}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            self._fail("grad_clip", f"must be a positive number or null, got {self.grad_clip}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            self._fail("lr", f"need 0 <= min_lr ({self.min_lr}) <= lr ({self.lr}) and lr > 0")
        if self.time_budget is not None and not (math.isfinite(self.time_budget) and self.time_budget > 0):
            self._fail("time_budget", f"must be a positive number of seconds, got {self.time_budget}")
        if self.time_budget is not None and self.phases:
            self._fail("time_budget", "curriculum phases are laid out in steps; use max_steps with phases, "
                       "or drop the phases")
        if self.phases and sum(p.steps for p in self.phases) != self.max_steps:
            total = sum(p.steps for p in self.phases)
            self._fail("max_steps", f"is {self.max_steps} but the phases add up to {total} steps; "
                       f"set max_steps to {total}")
        if self.distributed == "fsdp" and self.optimizer == "muon":
            self._fail("distributed", "fsdp shards every matrix, but Muon orthogonalises whole matrices; "
                       "use optimizer adamw with fsdp, or distributed ddp with muon")
        if self.restart_period < 1 or not (math.isfinite(self.restart_mult) and self.restart_mult >= 1.0):
            self._fail("restart_period", f"need restart_period >= 1 (got {self.restart_period}) and "
                       f"restart_mult >= 1 (got {self.restart_mult})")
        if not (self.muon_lr > 0 and 0 <= self.muon_momentum < 1 and self.muon_weight_decay >= 0):
            self._fail("muon_lr", f"need muon_lr > 0 ({self.muon_lr}), 0 <= muon_momentum < 1 "
                       f"({self.muon_momentum}) and muon_weight_decay >= 0 ({self.muon_weight_decay})")
        choices = {"optimizer": OPTIMIZERS, "lr_schedule": SCHEDULES, "sampler": SAMPLER_MODES,
                   "distributed": STRATEGIES, "precision": PRECISIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                self._fail(name, f"{getattr(self, name)!r} is not one of {list(allowed)}")
        if not self.device == "auto" and not self.device.split(":")[0] in ("cpu", "cuda", "mps"):
            self._fail("device", f"{self.device!r} is not auto, cpu, cuda[:N] or mps")
        for logger in self.loggers:
            if logger not in LOGGERS:
                self._fail("loggers", f"unknown logger {logger!r}; use {', '.join(LOGGERS)}")
        if not (math.isfinite(self.distillation_alpha) and 0 <= self.distillation_alpha <= 1):
            self._fail("distillation_alpha", f"must be in [0, 1], got {self.distillation_alpha}")
        if not (math.isfinite(self.distillation_temperature) and self.distillation_temperature > 0):
            self._fail("distillation_temperature", f"must be a positive number, got {self.distillation_temperature}")
        if self.distillation_top_k is not None and self.distillation_top_k < 1:
            self._fail("distillation_top_k", f"must be at least 1 or null (full vocab), got {self.distillation_top_k}")
        if self.use_distillation and not self.distillation_teacher:
            self._fail("distillation_teacher", "use_distillation needs a teacher: a checkpoint or model folder, "
                       "a transformers folder or a .gguf file")
        if self.init_from == "":
            self._fail("init_from", "is an empty string; use null to start from random weights")
        if self.eval_exact_match < 0:
            self._fail("eval_exact_match", f"must be >= 0 (0: off), got {self.eval_exact_match}")
        if self.distillation_cache_dir is not None and self.distillation_top_k is None:
            self._fail("distillation_cache_dir", "the cache stores top-k logits; set distillation_top_k (e.g. 64)")


@dataclasses.dataclass
class HookConfig(ConfigBase):
    name: str = ""
    enabled: bool = True
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ExperimentConfig(ConfigBase):
    model: dict[str, Any] = dataclasses.field(default_factory=lambda: {"family": "gpt"})
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    hooks: list[HookConfig] = dataclasses.field(default_factory=list)
    seed: int = 1337
    output_dir: str = "runs/default"
    run_name: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | None = None) -> "ExperimentConfig":
        """With `train.init_from`, an absent model section means the source's config and an
        absent tokenizer section the source's tokenizer (training/init_from.py)."""
        train = data.get("train") if isinstance(data, dict) else None
        if isinstance(train, dict) and train.get("init_from"):
            data = {"model": {}, "tokenizer": {"kind": "file", "path": train["init_from"]}, **data}
        return super().from_dict(data, where)

    def validate(self) -> None:
        # parse once now so a bad model section fails at load time, not after data prep; with
        # init_from the section only adjusts the source's config, checked when it is loaded
        if not self.train.init_from:
            self.model_config(vocab_size=self.model.get("vocab_size", 256))

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The model's config with the tokenizer's vocab size filled in (or checked)."""
        fields = dict(self.model)
        given = fields.get("vocab_size")
        if given is not None and (isinstance(given, bool) or not isinstance(given, int)):
            raise SLMError(f"model.vocab_size: expected an integer, got {given!r}")
        if given is not None and given < vocab_size:
            raise SLMError(f"model.vocab_size is {given} but the tokenizer has {vocab_size} ids; "
                           "remove model.vocab_size to take the tokenizer's, or use a matching tokenizer")
        fields.setdefault("vocab_size", vocab_size)
        return config_from_dict(fields, where="model")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["hooks"] = [h.to_dict() for h in self.hooks]
        return out

    def hash(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (value parsed as YAML, so 3, 1e-3, true, [1,2] work)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise SLMError(f"override {item!r} must look like section.key=value (e.g. train.max_steps=100)")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            if raw.lstrip().startswith(("[", "{")):  # meant as a list or mapping: say what is wrong
                raise SLMError(f"override {item!r}: the value is not valid YAML ({parse_error_where(err)}); "
                               "fix the brackets, or quote the whole value to pass it as text") from None
            value = raw  # plain text that YAML cannot read, e.g. a prompt with a ': '
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 as a string; users mean the number
            try:
                value = float(value)
            except ValueError:
                pass
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SLMError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return data


def load_experiment_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    data = read_config_file(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return ExperimentConfig.from_dict(data, where=str(path) if path else "config")
