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

from simplified_slm.data import DataConfig, iter_eval_batches, prepare_dataset, read_documents
from simplified_slm.errors import SLMError
from simplified_slm.evaluation.metrics import evaluate_lm
from simplified_slm.models.base import CausalLM, next_token_loss
from simplified_slm.models.checkpointing import checkpointed_blocks, enable_gradient_checkpointing
from simplified_slm.models.registry import build_model
from simplified_slm.tokenizers import Tokenizer, build_tokenizer, load_tokenizer
from simplified_slm.training.checkpoint import (
    CheckpointManager,
    load_optimizer_state,
    load_training_files,
    save_training_files,
)
from simplified_slm.training.config import ExperimentConfig
from simplified_slm.training.curriculum import build_phases, phase_at
from simplified_slm.training.distill import Distiller
from simplified_slm.training.distributed import (
    gather_full_state,
    init_distributed,
    load_full_optimizer_state,
    shard_model,
)
from simplified_slm.training.hooks import ActivationStats, build_hooks
from simplified_slm.training.loggers import MultiLogger, build_loggers
from simplified_slm.training.monitoring import firing_rates, grad_norms_by_group, ternary_stats
from simplified_slm.training.optim import build_optimizer, clip_grad_norm, set_learning_rate
from simplified_slm.training.precision import autocast_dtype
from simplified_slm.training.run_info import RunLock, new_run_id, write_run_info


SIGNAL_STOPS = ("SIGINT", "SIGTERM")  # stop reasons set by the signal handler (no final eval)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SLMError(f"device {name!r} was asked for but CUDA is not available; use --device cpu or auto")
    return device


def training_texts(cfg: ExperimentConfig) -> Callable[[], Any]:
    """Zero-argument callable over the training texts (for char-vocab and BPE training)."""
    source = cfg.data.train_file or cfg.data.dataset

    def texts() -> Any:
        return (doc.text for doc in read_documents(source))
    return texts


def model_loss(forward: Callable[[torch.Tensor], Any], compile: bool = False) -> Callable[..., Any]:
    """`(x, y) -> (next-token loss, the model's aux loss or None)`: one training forward.

    With `compile` the model's forward and the loss become one torch.compile graph (and its
    backward one more), so the cross-entropy fuses with the LM head instead of running as
    separate eager ops.
    """
    def loss_of(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = forward(x)
        return next_token_loss(out.logits, y), out.aux_loss
    return torch.compile(loss_of) if compile else loss_of


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    interrupted: bool
    val_metrics: dict[str, float]
    losses: list[float] = field(default_factory=list)  # train loss of each step run in this call
    checkpoint: Path | None = None
    is_main: bool = True  # False on the other ranks of a multi-process run, which print nothing


class Trainer:
    def __init__(self, cfg: ExperimentConfig, resume: str | None = None,
                 say: Callable[[str], None] | None = None, until: int | None = None) -> None:
        """`until` pauses the run at that step (with a checkpoint) without changing the
        schedule, which is laid out over `train.max_steps`; resume later to continue."""
        self.cfg = cfg
        self.resume = resume
        self.until = until
        self.say = say or (lambda message: tqdm.write(message, file=sys.stderr))
        self.run_dir = Path(cfg.output_dir)
        self.dist, device_name = init_distributed(cfg.train.device)
        self.device = resolve_device(device_name)
        if not self.dist.is_main:  # rank 0 reports for the run; errors still raise everywhere
            self.say = lambda message: None
        self._stop_reason: str | None = None

    # ----------------------------------------------------------------- set-up
    def _tokenizer(self) -> Tokenizer:
        tok_dir = self.run_dir / "tokenizer"
        if not self.dist.is_main:
            self.dist.barrier()  # rank 0 builds and saves it first
            return load_tokenizer(tok_dir)
        if (tok_dir / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(tok_dir)
        else:
            tokenizer = build_tokenizer(self.cfg.tokenizer, training_texts(self.cfg))
            tokenizer.save(tok_dir)
        self.dist.barrier()
        return tokenizer

    def _prepare(self, data_cfg: DataConfig, tokenizer: Tokenizer, directory: Path) -> Any:
        """Rank 0 tokenizes; the other ranks then find its files and reuse them."""
        if self.dist.is_main:
            data = prepare_dataset(data_cfg, tokenizer, directory)
        self.dist.barrier()
        return data if self.dist.is_main else prepare_dataset(data_cfg, tokenizer, directory)

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
        if not path.is_dir():
            raise SLMError(f"checkpoint {path} does not exist; pass a checkpoint folder or --resume auto")
        return path.resolve()

    def _signal_handler(self, signum: int, frame: Any) -> None:
        self._stop_reason = signal.Signals(signum).name

    # ------------------------------------------------------------------ train
    def run(self) -> TrainResult:
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
                return self._run()
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
                self.dist.close()

    def _run(self) -> TrainResult:
        cfg, tcfg = self.cfg, self.cfg.train
        torch.manual_seed(cfg.seed)
        tokenizer = self._tokenizer()
        data = self._prepare(cfg.data, tokenizer, self.run_dir / "data")
        token_bytes = tokenizer.token_byte_lengths()
        model = build_model(cfg.model_config(tokenizer.vocab_size)).to(self.device)
        distiller = (Distiller.from_config(tcfg, tokenizer, self.device, autocast_dtype(tcfg.precision, self.device))
                     if tcfg.use_distillation else None)

        def phase_tokens(index: int, dataset: str) -> Any:
            data_cfg = dataclasses.replace(cfg.data, dataset=dataset, train_file=None, val_file=None)
            return self._prepare(data_cfg, tokenizer, self.run_dir / "data" / f"phase{index + 1}").train

        phases = build_phases(cfg, data.train, phase_tokens, model.max_context, self.dist.world_size)
        if tcfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        forward_hooks, update_hooks, hook_names = build_hooks(cfg.hooks)
        for hook in forward_hooks:
            hook.attach(model)

        ckpts = CheckpointManager(self.run_dir / "checkpoints", tcfg.keep_checkpoints, self.say)
        start = self.dist.from_main(self._find_resume(ckpts) if self.dist.is_main else None)
        step, best_val, run_id = 0, math.inf, new_run_id()
        skipped_total = 0  # non-finite steps skipped over the whole run, resumes included
        if start is not None:  # weights and RNG now, into the plain model; the optimizer below
            state = load_training_files(start, model, None)
            step, best_val, run_id = state["step"], state["best_val_loss"], state["run_id"]
            skipped_total = int(state.get("skipped_nonfinite", 0))
        fsdp = self.dist.enabled and tcfg.distributed == "fsdp"
        if self.dist.enabled:
            self.say(f"distributed: {self.dist.world_size} processes, {tcfg.distributed} over "
                     f"{torch.distributed.get_backend()}")
        if fsdp:
            shard_model(model, checkpointed_blocks(model))
        optimizer = build_optimizer(model, tcfg)
        if start is not None:
            load_optimizer_state(start, (lambda sd: load_full_optimizer_state(model, optimizer, sd)) if fsdp
                                 else optimizer.load_state_dict)
            if state.get("config_hash") != cfg.hash():
                self.say(f"note: resuming {start.name} with a changed config")
            self.say(f"resumed from {start} at step {step}")
        amp = autocast_dtype(tcfg.precision, self.device)
        if self.dist.is_main:
            write_run_info(self.run_dir, run_id, cfg, hook_names, model, resumed_from=start,
                           compute_dtype=amp or torch.float32)
            loggers = build_loggers(tcfg.loggers, self.run_dir, run_id, cfg.to_dict(), self.say)
        else:
            loggers = MultiLogger([])
        forward: torch.nn.Module = model
        if self.dist.enabled and not fsdp:
            forward = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # train.compile: forward and loss compile as one graph; distillation needs the logits
        # and DDP its no_sync context, so there the model alone is compiled
        whole = tcfg.compile and distiller is None and not self.dist.enabled
        forward = torch.compile(forward) if tcfg.compile and not whole else forward
        train_loss = model_loss(forward, compile=whole)
        params = list(model.parameters())
        stats_hooks = [h for h in forward_hooks if isinstance(h, ActivationStats)]

        def eval_metrics(pcfg: Any) -> dict[str, float]:
            """At the current phase's context length, on the data section's validation text."""
            batches = iter_eval_batches(data.val, pcfg.block_size, pcfg.batch_size, tcfg.eval_batches)
            return evaluate_lm(model, batches, token_bytes, self.device, amp)

        def save(at_step: int, best: bool = False) -> Path:
            saved_model, optimizer_state = model, None
            if fsdp:  # every rank takes part in gathering the shards; rank 0 writes them
                model_state, optimizer_state = gather_full_state(model, optimizer)
                if self.dist.is_main:
                    saved_model = build_model(model.config)
                    saved_model.load_state_dict(model_state)
            if not self.dist.is_main:  # rank 0 writes; the others only track the name
                return ckpts.root / f"step_{at_step:08d}"
            if optimizer_state is None:
                optimizer_state = optimizer.state_dict()
            state = {"step": at_step, "best_val_loss": best_val, "run_id": run_id, "config_hash": cfg.hash(),
                     "config": cfg.to_dict(), "skipped_nonfinite": skipped_total}
            return ckpts.save(at_step, lambda d: save_training_files(d, saved_model, tokenizer, optimizer_state, state), best)

        losses: list[float] = []
        val: dict[str, float] = {}
        last_ckpt: Path | None = start  # a resumed run's checkpoint already holds its step
        bad_in_row = 0
        bar = tqdm(total=tcfg.max_steps, initial=step, disable=not tcfg.progress, dynamic_ncols=True,
                   desc="train", unit="step")
        started = time.perf_counter()
        window_start, window_steps = started, 0
        model.train()
        try:
            while step < tcfg.max_steps:
                phase = phase_at(phases, step)
                pcfg = phase.cfg
                if step == phase.start and len(phases) > 1:
                    self.say(f"curriculum: {phase.describe()}")
                tokens_per_step = pcfg.batch_size * pcfg.block_size * pcfg.grad_accum_steps
                lr = phase.learning_rate(step)
                set_learning_rate(optimizer, lr, tcfg)
                for hook in stats_hooks:
                    hook.active = (step + 1) % hook.every == 0
                step_loss = 0.0
                aux_total = 0.0
                ce_total = kd_total = 0.0  # the two parts of a distillation loss
                for micro in range(tcfg.grad_accum_steps):
                    x, y = phase.batch(step, micro)
                    x, y = self.dist.shard(x).to(self.device), self.dist.shard(y).to(self.device)
                    # DDP averages gradients once per step, on the last micro-batch
                    sync = micro == tcfg.grad_accum_steps - 1 or not self.dist.enabled
                    with contextlib.nullcontext() if sync else forward.no_sync():
                        with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                            if distiller is None:
                                loss, aux_loss = train_loss(x, y)
                            else:
                                out = forward(x)
                                loss, ce, kd = distiller.loss(out.logits, x, y)
                                aux_loss = out.aux_loss
                                ce_total += ce.item() / tcfg.grad_accum_steps
                                kd_total += kd.item() / tcfg.grad_accum_steps
                            total = loss + aux_loss if aux_loss is not None else loss
                        (total / tcfg.grad_accum_steps).backward()
                    step_loss += loss.item() / tcfg.grad_accum_steps
                    if aux_loss is not None:
                        aux_total += aux_loss.item() / tcfg.grad_accum_steps
                step_loss, aux_total = self.dist.mean(step_loss), self.dist.mean(aux_total)
                for hook in update_hooks:
                    hook.apply(model, step)
                log_now = (step + 1) % tcfg.log_every == 0
                group_norms = grad_norms_by_group(model) if log_now else {}  # raw, before clipping
                # clipping is folded into the fused AdamW's update (see clip_grad_norm)
                grad_norm = clip_grad_norm(optimizer, params, tcfg.grad_clip or None, fold_into_optimizer=not fsdp)
                step += 1
                if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                    optimizer.zero_grad(set_to_none=True)
                    bad_in_row += 1
                    skipped_total += 1
                    self.say(f"warning: step {step} has a non-finite loss or gradient; skipped "
                             f"({bad_in_row} in a row, {skipped_total} in this run)")
                    loggers.log(step, {"train/skipped_nonfinite": float(bad_in_row),
                                       "train/skipped_nonfinite_total": float(skipped_total)})
                    if bad_in_row >= tcfg.max_nonfinite_steps:
                        path = save(step)
                        raise SLMError(f"training diverged: {bad_in_row} non-finite steps in a row ending at "
                                       f"step {step}; the last good weights are in {path}. Lower train.lr "
                                       "or check the data")
                    bar.update(1)
                    continue
                bad_in_row = 0
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(step_loss)
                window_steps += 1
                bar.update(1)
                if tcfg.time_limit_s is not None and time.perf_counter() - started > tcfg.time_limit_s:
                    self._stop_reason = self._stop_reason or "time limit"
                if self.until is not None and step >= self.until:
                    self._stop_reason = self._stop_reason or f"paused at --until {self.until}"
                if self.dist.enabled and self.dist.any(self._stop_reason is not None):
                    # every rank stops at the same step, for the reason rank 0 gives
                    self._stop_reason = self.dist.from_main(self._stop_reason or "stopped by another rank")
                # a planned end (last step, time limit, pause) gets a final eval and sample; a
                # signal only gets its checkpoint, as fast as possible
                ending = step == tcfg.max_steps or (self._stop_reason is not None
                                                    and self._stop_reason not in SIGNAL_STOPS)
                if step % tcfg.log_every == 0 or ending:
                    now = time.perf_counter()
                    tok_s = window_steps * tokens_per_step / max(now - window_start, 1e-9)
                    metrics = {"train/loss": step_loss, "train/lr": lr, "train/grad_norm": grad_norm,
                               "train/tokens_per_s": tok_s, "train/tokens": float(step * tokens_per_step)}
                    if aux_total:
                        metrics["train/aux_loss"] = aux_total
                    if distiller is not None:  # every rank logs at the same steps, so the means line up
                        metrics["train/ce_loss"] = self.dist.mean(ce_total)
                        metrics["train/kd_loss"] = self.dist.mean(kd_total)
                    metrics.update(group_norms)
                    metrics.update(ternary_stats(model))
                    metrics.update(firing_rates(model))
                    metrics.update(getattr(model, "last_compression", {}))
                    for hook in forward_hooks:
                        metrics.update(hook.metrics())
                    loggers.log(step, metrics)
                    bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}")
                    window_start, window_steps = now, 0
                if step % tcfg.eval_every == 0 or ending:
                    val = eval_metrics(pcfg)
                    loggers.log(step, {f"val/{k}": v for k, v in val.items() if k not in ("tokens", "bytes")})
                    if val["loss"] < best_val:
                        best_val = val["loss"]
                        last_ckpt = save(step, best=True)
                if (step % tcfg.sample_every == 0 or ending) and (self.dist.is_main or fsdp):
                    sample = self._sample(model, tokenizer, step)  # FSDP: a collective, all ranks sample
                    loggers.log_text(step, "sample", sample)
                if step % tcfg.checkpoint_every == 0 and (last_ckpt is None or not last_ckpt.name.endswith(f"{step:08d}")):
                    last_ckpt = save(step)
                if self._stop_reason:
                    break
        finally:
            bar.close()
            loggers.close()
        if last_ckpt is None or not last_ckpt.name.endswith(f"{step:08d}"):
            last_ckpt = save(step)
        if self._stop_reason:
            self.say(f"stopped at step {step} ({self._stop_reason}); checkpoint {last_ckpt}; "
                     "continue with --resume auto")
        interrupted = self._stop_reason in SIGNAL_STOPS
        return TrainResult(self.run_dir, step, interrupted, val, losses, last_ckpt, self.dist.is_main)

    def _sample(self, model: CausalLM, tokenizer: Tokenizer, step: int) -> str:
        tcfg = self.cfg.train
        prompt = tokenizer.encode_ids(tcfg.sample_prompt) or [0]
        ids = torch.tensor([prompt], device=self.device)
        out = model.generate(ids, tcfg.sample_tokens, temperature=tcfg.sample_temperature, top_k=50,
                             seed=self.cfg.seed + step, eos_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0, len(prompt):])
