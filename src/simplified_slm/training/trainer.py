"""The one trainer: every family, tokenizer and dataset goes through this loop.

Reproducibility is the design constraint: batches are a pure function of (seed, step), the
learning rate a pure function of the step, and a checkpoint holds the model, optimizer and
every RNG, so a resumed run repeats the uninterrupted run's losses bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from simplified_slm import metric_names as M
from simplified_slm.data import BatchSampler, DataConfig, iter_eval_batches, prepare_dataset, tokenizer_texts
from simplified_slm.data.chat import ChatBatchSampler, prepare_chat
from simplified_slm.errors import SLMError
from simplified_slm.evaluation.exact_match import chat_validation
from simplified_slm.evaluation.metrics import evaluate_lm
from simplified_slm.models.base import CausalLM
from simplified_slm.models.checkpointing import checkpointed_blocks, enable_gradient_checkpointing
from simplified_slm.models.loading import resolve_device
from simplified_slm.models.registry import build_model
from simplified_slm.tokenizers import Tokenizer, load_tokenizer
from simplified_slm.tokenizers.chat_template import ChatTemplate
from simplified_slm.training.checkpoint import (
    CheckpointManager,
    load_optimizer_state,
    load_training_files,
    read_model_vocab_size,
    read_trainer_state,
    save_training_files,
)
from simplified_slm.training.config import ExperimentConfig
from simplified_slm.training.curriculum import apply_rope_scaling, build_phases, phase_at
from simplified_slm.training.distill import Distiller
from simplified_slm.training.distributed import (
    gather_full_state,
    init_distributed,
    load_full_optimizer_state,
    shard_model,
)
from simplified_slm.training.hooks import ActivationStats, build_hooks
from simplified_slm.training.init_from import checkpoint_model_config, pretrained_model, run_tokenizer
from simplified_slm.training.loggers import MultiLogger, build_loggers
from simplified_slm.training.memory import check_fits_in_memory
from simplified_slm.training.monitoring import firing_rates, ternary_stats
from simplified_slm.training.optim import build_optimizer, clock_learning_rate, set_learning_rate
from simplified_slm.training.precision import autocast_dtype
from simplified_slm.training.run_info import RunLock, new_run_id, write_run_info
from simplified_slm.training.step import StepSetup, StepStats, TrainState, model_loss, train_step
from simplified_slm.utils.progress import progress


SIGNAL_STOPS = ("SIGINT", "SIGTERM")  # stop reasons set by the signal handler (no final eval)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    interrupted: bool
    val_metrics: dict[str, float]
    losses: list[float] = field(default_factory=list)  # train loss of each step run in this call
    checkpoint: Path | None = None
    is_main: bool = True  # False on the other ranks of a multi-process run, which print nothing
    train_seconds: float = 0.0  # in training steps over the whole run (evaluation excluded)


class Trainer:
    def __init__(self, cfg: ExperimentConfig, resume: str | None = None,
                 say: Callable[[str], None] | None = None, until: int | None = None,
                 allow_data_change: bool = False) -> None:
        """`until` pauses the run at that step (with a checkpoint) without changing the
        schedule, which is laid out over `train.max_steps`; resume later to continue.
        `allow_data_change` resumes even where the training data changed since the checkpoint
        (otherwise refused: the run would no longer repeat an uninterrupted one)."""
        self.cfg = cfg
        self.resume = resume
        self.until = until
        self.allow_data_change = allow_data_change
        self.say = say or (lambda message: tqdm.write(message, file=sys.stderr))
        self.run_dir = Path(cfg.output_dir)
        self.dist, device_name = init_distributed(cfg.train.device)
        self.device = resolve_device(device_name)
        if not self.dist.is_main:  # rank 0 reports for the run; errors still raise everywhere
            self.say = lambda message: None
        self._stop_reason: str | None = None

    # ----------------------------------------------------------------- set-up
    def _tokenizer(self, start: Path | None) -> Tokenizer:
        """The run's tokenizer; a resumed checkpoint's own when the run folder has none."""
        tok_dir = self.run_dir / "tokenizer"
        if not self.dist.is_main:
            self.dist.barrier()  # rank 0 builds and saves it first
            return load_tokenizer(tok_dir)
        if (tok_dir / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(tok_dir)
        elif start is not None:
            tokenizer = load_tokenizer(start)
            tokenizer.save(tok_dir)
        else:
            tokenizer = run_tokenizer(self.cfg, tokenizer_texts(self.cfg.data))
            tokenizer.save(tok_dir)
        self.dist.barrier()
        return tokenizer

    def _prepare(self, data_cfg: DataConfig, tokenizer: Tokenizer, directory: Path) -> Any:
        """Rank 0 tokenizes; the other ranks then find its files and reuse them."""
        prepare = prepare_chat if data_cfg.format == "chat" else prepare_dataset
        if self.dist.is_main:
            data = prepare(data_cfg, tokenizer, directory)
        self.dist.barrier()
        return data if self.dist.is_main else prepare(data_cfg, tokenizer, directory)

    def _find_resume(self, ckpts: CheckpointManager) -> Path | None:
        if self.resume is None:
            if ckpts.step_dirs():
                raise SLMError(f"{self.run_dir} already holds checkpoints; pass --resume auto to continue "
                               "that run, or choose another output_dir")
            return None
        newest = ckpts.repair_links()
        if self.resume == "auto":
            found = newest
            if found is None:
                self.say(f"no intact checkpoint in {ckpts.root}; starting a fresh run")
            return found
        path = Path(self.resume)
        if path.is_file():
            raise SLMError(f"--resume {path} is a file; pass a checkpoint folder (e.g. "
                           f"{ckpts.root / 'latest'}) or --resume auto")
        if not path.is_dir():
            raise SLMError(f"checkpoint {path} does not exist; pass a checkpoint folder or --resume auto")
        return path.resolve()

    def _check_resumable(self, start: Path, model_cfg: Any) -> None:
        """Refuses a checkpoint whose vocabulary or training data differ from this run's.

        The data check is what keeps resume honest: a resumed run repeats the uninterrupted
        one only on the same tokens (`--allow-data-change` accepts new ones knowingly).
        """
        saved = read_trainer_state(start)
        vocab = read_model_vocab_size(start)
        if vocab is not None and vocab != model_cfg.vocab_size:
            raise SLMError(f"checkpoint {start} was trained with {vocab} token ids but this run's tokenizer has "
                           f"{model_cfg.vocab_size}: the tokenizer was rebuilt (from changed data or tokenizer "
                           "settings); resume with the original data and settings, or start a new run")
        old = saved.get("data_fingerprint")
        if old is not None and old != self.data.meta["fingerprint"] and not self.allow_data_change:
            source = self.cfg.data.train_file or self.cfg.data.dataset
            raise SLMError(f"the training data ({source}) changed since checkpoint {start.name} was written (its "
                           "text, tokenization or data settings differ), so the resumed run would not continue the "
                           "same one; restore the data, or pass --allow-data-change to continue on the new data")

    def _signal_handler(self, signum: int, frame: Any) -> None:
        self._stop_reason = signal.Signals(signum).name

    # ------------------------------------------------------------------ train
    def run(self) -> TrainResult:
        if self.device.type == "cpu" and not self.cfg.train.init_from:  # before anything is allocated or written
            given = self.cfg.model.get("vocab_size")
            vocab = given if isinstance(given, int) else self.cfg.tokenizer.vocab_size or 256
            check_fits_in_memory(self.cfg.model_config(vocab), self.cfg.train.batch_size, self.cfg.train.block_size)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SLMError(f"cannot create {self.run_dir}: {err.strerror}; choose a writable output_dir") from None
        lock = RunLock(self.run_dir, resume=self.resume is not None) if self.dist.is_main else contextlib.nullcontext()
        with lock:
            handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                for sig in handlers:
                    signal.signal(sig, self._signal_handler)
            except ValueError:  # not the main thread: signals stay with the caller
                handlers = {}
            try:
                return self.fit(self.setup())
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
                self.dist.close()

    # ------------------------------------------------------------------ set-up
    def setup(self) -> TrainState:
        """Tokenizer, data, model, optimizer and loggers; restores a checkpoint when resuming."""
        cfg, tcfg = self.cfg, self.cfg.train
        torch.manual_seed(cfg.seed)
        self.ckpts = CheckpointManager(self.run_dir / "checkpoints", tcfg.keep_checkpoints, self.say)
        start = self.dist.from_main(self._find_resume(self.ckpts) if self.dist.is_main else None)
        self.tokenizer = tokenizer = self._tokenizer(start)
        self.data = self._prepare(cfg.data, tokenizer, self.run_dir / "data")
        self.token_bytes = tokenizer.token_byte_lengths()
        model = None
        if tcfg.init_from and start is None:  # a resumed init_from run continues from its own checkpoint
            model = pretrained_model(cfg, tokenizer, self.device)
        model_cfg = (model.config if model is not None else checkpoint_model_config(start) if tcfg.init_from
                     else cfg.model_config(tokenizer.vocab_size))
        if start is not None:
            self._check_resumable(start, model_cfg)
        model = model if model is not None else build_model(model_cfg).to(self.device)
        self.amp = autocast_dtype(tcfg.precision, self.device)
        distiller = Distiller.from_config(tcfg, tokenizer, self.device, self.amp) if tcfg.use_distillation else None

        def phase_tokens(index: int, dataset: str) -> Any:
            data_cfg = dataclasses.replace(cfg.data, dataset=dataset, train_file=None, val_file=None)
            return self._prepare(data_cfg, tokenizer, self.run_dir / "data" / f"phase{index + 1}").train

        self.phases = build_phases(cfg, self.data.train, phase_tokens, model.max_context, self.dist.world_size,
                                   ChatBatchSampler if cfg.data.format == "chat" else BatchSampler)
        if tcfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.forward_hooks, update_hooks, hook_names = build_hooks(cfg.hooks)
        for hook in self.forward_hooks:
            hook.attach(model)
        self.stats_hooks = [h for h in self.forward_hooks if isinstance(h, ActivationStats)]

        resumed = load_training_files(start, model, None) if start is not None else {}  # the optimizer below
        self.fsdp = self.dist.enabled and tcfg.distributed == "fsdp"
        if self.dist.enabled:
            self.say(f"distributed: {self.dist.world_size} processes, {tcfg.distributed} over "
                     f"{torch.distributed.get_backend()}")
        if self.fsdp:
            shard_model(model, checkpointed_blocks(model))
        optimizer = build_optimizer(model, tcfg)
        state = TrainState(model, optimizer, resumed.get("run_id", new_run_id()), step=resumed.get("step", 0),
                           best_val=resumed.get("best_val_loss", math.inf),
                           skipped_total=int(resumed.get("skipped_nonfinite", 0)),
                           train_seconds=float(resumed.get("train_seconds", 0.0)))
        if start is not None:
            self._restore_optimizer(start, state, resumed)
        self._warn_about_schedule()
        self.last_ckpt = start  # a resumed run's checkpoint already holds its step
        if self.dist.is_main:
            write_run_info(self.run_dir, state.run_id, cfg, hook_names, model, resumed_from=start,
                           compute_dtype=self.amp or torch.float32)
            self.loggers = build_loggers(tcfg.loggers, self.run_dir, state.run_id, cfg.to_dict(), self.say)
        else:
            self.loggers = MultiLogger([])
        self.step_setup = self._step_setup(model, distiller, update_hooks)
        return state

    def _restore_optimizer(self, start: Path, state: TrainState, resumed: dict[str, Any]) -> None:
        """The checkpoint's optimizer state, and what the user should know about the resume."""
        tcfg = self.cfg.train
        load_optimizer_state(start, (lambda sd: load_full_optimizer_state(state.model, state.optimizer, sd))
                             if self.fsdp else state.optimizer.load_state_dict)
        if resumed.get("config_hash") != self.cfg.hash():
            self.say(f"note: resuming {start.name} with a changed config")
        self.say(f"resumed from {start} at step {state.step}")
        if self._finished(state):
            knob = "max_steps" if state.step >= tcfg.max_steps else "time_budget"
            self.say(f"the run already finished at step {state.step} (train.{knob} = {getattr(tcfg, knob):g}); "
                     f"raise train.{knob} (--set train.{knob}=...) to train further")

    def _warn_about_schedule(self) -> None:
        for phase in self.phases:
            if phase.cfg.warmup_steps >= phase.cfg.max_steps:
                where = f"phase {phase.name!r}" if len(self.phases) > 1 else "the run"
                self.say(f"warning: warmup_steps ({phase.cfg.warmup_steps}) is not shorter than {where} "
                         f"({phase.cfg.max_steps} steps): the learning rate never reaches train.lr")

    def _step_setup(self, model: CausalLM, distiller: Distiller | None, update_hooks: list[Any]) -> StepSetup:
        tcfg = self.cfg.train
        forward: torch.nn.Module = model
        if self.dist.enabled and not self.fsdp:
            forward = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # train.compile: forward and loss compile as one graph; distillation needs the logits
        # and DDP its no_sync context, so there the model alone is compiled
        whole = tcfg.compile and distiller is None and not self.dist.enabled
        forward = torch.compile(forward) if tcfg.compile and not whole else forward
        return StepSetup(loss_fn=model_loss(forward, compile=whole), forward=forward, params=list(model.parameters()),
                         device=self.device, amp=self.amp, grad_clip=tcfg.grad_clip or None,
                         fold_clip=not self.fsdp, distiller=distiller, dist=self.dist, update_hooks=update_hooks)

    # ------------------------------------------------------------------ the loop
    def fit(self, state: TrainState) -> TrainResult:
        """Steps until `train.max_steps`, a pause, a time limit or a signal; then a checkpoint."""
        tcfg = self.cfg.train
        losses: list[float] = []
        self.val: dict[str, float] = {}
        # a budgeted run ends on the clock, so max_steps would give a false time left
        bar = progress(total=None if tcfg.time_budget else tcfg.max_steps, initial=state.step,
                       disable=not tcfg.progress, desc="train", unit="step")
        self.started = self.window_start = self.step_ended = time.perf_counter()
        self.window_steps, self.overhead_seconds = 0, 0.0
        state.model.train()
        try:
            while not self._finished(state):
                stats, lr = self._one_step(state)
                bar.update(1)
                if stats.skipped:
                    self._on_skipped(state)
                    continue
                losses.append(stats.loss)
                self.window_steps += 1
                ending = self._check_stop(state)
                if self.maybe_log(state, stats, lr, ending):
                    bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{self.last_tok_s:,.0f}", lr=f"{lr:.2e}")
                self.maybe_eval(state, ending)
                self.maybe_sample(state, ending)
                self.maybe_checkpoint(state)
                if self._stop_reason:
                    break
        finally:
            bar.close()
            self.loggers.close()
        if not self._holds_step(self.last_ckpt, state.step):
            self.last_ckpt = self.save_checkpoint(state)
        if self._stop_reason:
            self.say(f"stopped at step {state.step} ({self._stop_reason}); checkpoint {self.last_ckpt}; "
                     "continue with --resume auto")
        elif tcfg.time_budget is not None:
            self.say(f"trained {state.train_seconds:.1f} s of the {tcfg.time_budget:g} s budget in {state.step} "
                     f"steps (+{self.overhead_seconds:.1f} s of evaluation, samples and checkpoints)")
        interrupted = self._stop_reason in SIGNAL_STOPS
        return TrainResult(self.run_dir, state.step, interrupted, self.val, losses, self.last_ckpt, self.dist.is_main,
                           state.train_seconds)

    def _finished(self, state: TrainState) -> bool:
        budget = self.cfg.train.time_budget
        return state.step >= self.cfg.train.max_steps or (budget is not None and state.train_seconds >= budget)

    def _learning_rate(self, state: TrainState, phase: Any) -> float:
        """The phase's schedule at this step, or on the clock under `train.time_budget`."""
        if self.cfg.train.time_budget is None:
            return phase.learning_rate(state.step)
        return clock_learning_rate(state.train_seconds, state.step, self.cfg.train)

    def _one_step(self, state: TrainState) -> tuple[StepStats, float]:
        """The step's phase, learning rate and micro-batches, then `train_step` (timed)."""
        tcfg = self.cfg.train
        phase = phase_at(self.phases, state.step)
        if state.step == phase.start and len(self.phases) > 1:
            self.say(f"curriculum: {phase.describe()}")
        if phase is not state.phase and phase.rope_scaling is not None:  # its start, or a resume inside it
            apply_rope_scaling(state.model, phase.rope_scaling)
        state.phase = phase
        lr = self._learning_rate(state, phase)
        set_learning_rate(state.optimizer, lr, tcfg)
        for hook in self.stats_hooks:
            hook.active = (state.step + 1) % hook.every == 0
        started = time.perf_counter()
        self.overhead_seconds += started - self.step_ended  # evaluation, samples, checkpoints, logging
        batches = [phase.batch(state.step, micro) for micro in range(tcfg.grad_accum_steps)]
        log_now = (state.step + 1) % tcfg.log_every == 0
        stats = train_step(state, batches, self.step_setup, group_norms=log_now)
        self.step_ended = time.perf_counter()
        state.train_seconds += self.step_ended - started
        return stats, lr

    def _on_skipped(self, state: TrainState) -> None:
        """A non-finite step: warn, log, and stop with the last good weights after too many."""
        self.say(f"warning: step {state.step} has a non-finite loss or gradient; skipped "
                 f"({state.bad_in_row} in a row, {state.skipped_total} in this run)")
        self.loggers.log(state.step, {M.TRAIN_SKIPPED_NONFINITE: float(state.bad_in_row),
                                      M.TRAIN_SKIPPED_NONFINITE_TOTAL: float(state.skipped_total)})
        if state.bad_in_row >= self.cfg.train.max_nonfinite_steps:
            path = self.save_checkpoint(state)
            raise SLMError(f"training diverged: {state.bad_in_row} non-finite steps in a row ending at "
                           f"step {state.step}; the last good weights are in {path}. Lower train.lr "
                           "or check the data")

    def _check_stop(self, state: TrainState) -> bool:
        """Sets the stop reason (time limit, pause, another rank's stop); True at a planned end.

        A planned end (last step, time limit, pause) gets a final eval and sample; a signal
        only gets its checkpoint, as fast as possible.
        """
        tcfg = self.cfg.train
        if tcfg.time_limit_s is not None and time.perf_counter() - self.started > tcfg.time_limit_s:
            self._stop_reason = self._stop_reason or "time limit"
        if self.until is not None and state.step >= self.until:
            self._stop_reason = self._stop_reason or f"paused at --until {self.until}"
        if self.dist.enabled and self.dist.any(self._stop_reason is not None):
            # every rank stops at the same step, for the reason rank 0 gives
            self._stop_reason = self.dist.from_main(self._stop_reason or "stopped by another rank")
        return self._finished(state) or (self._stop_reason is not None and self._stop_reason not in SIGNAL_STOPS)

    def maybe_log(self, state: TrainState, stats: StepStats, lr: float, ending: bool) -> bool:
        """Every `log_every` steps (and at a planned end): the step's metrics to every logger."""
        if not (state.step % self.cfg.train.log_every == 0 or ending):
            return False
        pcfg = state.phase.cfg
        tokens_per_step = pcfg.batch_size * pcfg.block_size * pcfg.grad_accum_steps
        now = time.perf_counter()
        self.last_tok_s = self.window_steps * tokens_per_step / max(now - self.window_start, 1e-9)
        metrics = {M.TRAIN_LOSS: stats.loss, M.TRAIN_LR: lr, M.TRAIN_GRAD_NORM: stats.grad_norm,
                   M.TRAIN_TOKENS_PER_S: self.last_tok_s, M.TRAIN_TOKENS: float(state.step * tokens_per_step),
                   M.TRAIN_SECONDS: state.train_seconds}
        if stats.aux_loss:
            metrics[M.TRAIN_AUX_LOSS] = stats.aux_loss
        if stats.ce_loss is not None:  # every rank logs at the same steps, so the means line up
            metrics[M.TRAIN_CE_LOSS] = self.dist.mean(stats.ce_loss)
            metrics[M.TRAIN_KD_LOSS] = self.dist.mean(stats.kd_loss)
        metrics.update(stats.group_norms)
        metrics.update(ternary_stats(state.model))
        metrics.update(firing_rates(state.model))
        metrics.update(getattr(state.model, "last_compression", {}))
        for hook in self.forward_hooks:
            metrics.update(hook.metrics())
        self.loggers.log(state.step, metrics)
        self.window_start, self.window_steps = now, 0
        return True

    def maybe_eval(self, state: TrainState, ending: bool) -> None:
        """Every `eval_every` steps: validation metrics; a new best is checkpointed as best."""
        if not (state.step % self.cfg.train.eval_every == 0 or ending):
            return
        self.val = self.validate(state)
        self.loggers.log(state.step, {f"{M.VAL_PREFIX}{k}": v for k, v in self.val.items()
                                      if k not in ("tokens", "bytes")})
        if self.val["loss"] < state.best_val:
            state.best_val = self.val["loss"]
            self.last_ckpt = self.save_checkpoint(state, best=True)

    def validate(self, state: TrainState) -> dict[str, float]:
        """At the current phase's context length, on the data section's validation text."""
        pcfg = state.phase.cfg
        if self.cfg.data.format == "chat":  # per-example answer loss (+ exact match)
            return chat_validation(state.model, self.tokenizer, ChatTemplate.for_tokenizer(
                self.tokenizer, self.cfg.data.chat_template), self.data.val, pcfg.block_size,
                self.cfg.train.eval_exact_match, self.device, self.amp)
        batches = iter_eval_batches(self.data.val, pcfg.block_size, pcfg.batch_size, self.cfg.train.eval_batches)
        return evaluate_lm(state.model, batches, self.token_bytes, self.device, self.amp)

    def maybe_sample(self, state: TrainState, ending: bool) -> None:
        if (state.step % self.cfg.train.sample_every == 0 or ending) and (self.dist.is_main or self.fsdp):
            sample = self._sample(state.model, self.tokenizer, state.step)  # FSDP: a collective, all ranks sample
            self.loggers.log_text(state.step, "sample", sample)

    def maybe_checkpoint(self, state: TrainState) -> None:
        if state.step % self.cfg.train.checkpoint_every == 0 and not self._holds_step(self.last_ckpt, state.step):
            self.last_ckpt = self.save_checkpoint(state)

    @staticmethod
    def _holds_step(checkpoint: Path | None, step: int) -> bool:
        return checkpoint is not None and checkpoint.name.endswith(f"{step:08d}")

    def save_checkpoint(self, state: TrainState, best: bool = False) -> Path:
        """Model, optimizer, RNGs and trainer state as one atomic checkpoint folder (rank 0 writes)."""
        saved_model, optimizer_state = state.model, None
        if self.fsdp:  # every rank takes part in gathering the shards; rank 0 writes them
            model_state, optimizer_state = gather_full_state(state.model, state.optimizer)
            if self.dist.is_main:
                saved_model = build_model(state.model.config)
                saved_model.load_state_dict(model_state)
        if not self.dist.is_main:  # rank 0 writes; the others only track the name
            return self.ckpts.root / f"step_{state.step:08d}"
        if optimizer_state is None:
            optimizer_state = state.optimizer.state_dict()
        info = {"step": state.step, "best_val_loss": state.best_val, "run_id": state.run_id,
                "config_hash": self.cfg.hash(), "config": self.cfg.to_dict(),
                "skipped_nonfinite": state.skipped_total, "data_fingerprint": self.data.meta["fingerprint"],
                "train_seconds": state.train_seconds}
        return self.ckpts.save(state.step, lambda d: save_training_files(d, saved_model, self.tokenizer,
                                                                         optimizer_state, info), best)

    def _sample(self, model: CausalLM, tokenizer: Tokenizer, step: int) -> str:
        tcfg = self.cfg.train
        prompt = tokenizer.encode_ids(tcfg.sample_prompt) or [0]
        ids = torch.tensor([prompt], device=self.device)
        out = model.generate(ids, tcfg.sample_tokens, temperature=tcfg.sample_temperature, top_k=50,
                             seed=self.cfg.seed + step, eos_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, len(prompt):])
