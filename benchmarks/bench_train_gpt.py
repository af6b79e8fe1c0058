"""Training speed of the nanoGPT CPU recipe: our GPT + Trainer step vs a copy of nanoGPT.

Shape: char-level tiny shakespeare (vocab 65), 4 layers x 4 heads x 128 wide, block 64,
batch 12 (768 tokens per step), dropout 0, AdamW (betas 0.9/0.99, wd 0.1), clip 1.0,
cosine lr 1e-3 -> 1e-4 with 100 warmup steps.

Variants, all built in this one process and timed interleaved (rounds of `--steps` steps
each, the order rotating every round) so that load from other processes hits all alike:

    ours-eager      GPTForCausalLM + build_optimizer (fused AdamW) + BatchSampler, one step
                    through the Trainer's own `train_step` (model_loss, backward, loss.item(),
                    clip_grad_norm folded into the fused AdamW's update, step, zero_grad)
                    after the schedule's lr is set: the default train.compile=false path
    ours-compile    the same with train.compile=true: model_loss compiles forward + loss as
                    one torch.compile graph (the token embedding stays eager, see gpt.py)
    ours-bf16       ours-eager with train.precision=auto, which on a CPU with native bf16
                    (AVX512-BF16 or AMX) is bf16 autocast: matmuls in bf16, weights, gradients
                    and AdamW in float32; attention then trains through the eager kernel
                    (SDPA's CPU bf16 backward is 2-3x slower at this length). Left out where
                    auto means float32. ours-bf16-compile: the same with train.compile=true.
    nanogpt-eager   a faithful compact copy of karpathy/nanoGPT model.py (GPT, one c_attn,
                    SDPA is_causal, exact GELU, LayerNorm(bias=False), tied lm_head,
                    configure_optimizers: fused AdamW only on CUDA, so on CPU torch's default
                    single-tensor for-loop AdamW) and
                    the train.py loop (np.memmap get_batch each step, batch prefetched
                    after forward, GradScaler disabled, loss.item() every 10 iters)
    nanogpt-compile the reference under torch.compile (optional, --ref-compile)

With --ablate, earlier code paths and a prototype are timed too: the previous
train.compile (model only, loss eager), the previous unfolded clip_grad_norm_, fused q/k/v,
and nanogpt-bf16 (nanoGPT under the bf16 autocast its train.py uses on GPUs; on CPU it
never autocasts), which shows what bf16 alone does to nanoGPT's step here.

The floor: the same step's matmuls (every linear's forward, input-gradient and
weight-gradient GEMM, lm_head included) and its four SDPA forward+backward calls, timed
alone on hot buffers. nanoGPT and we run exactly this arithmetic, so the best possible
speed-up is (nanoGPT's ms/iter) / (floor + whatever else a step must do). Where the bf16
variants run, the same floor in bf16 is reported too.

Compile warm-up (the first `--warmup` steps of every variant) is excluded from the timings
and reported separately. Then, unless --no-trainer, the real Trainer loop runs
(`Trainer.run()` for --trainer-steps steps, several rounds, interleaved with blocks of the
nanoGPT reference of the same length) and its own `train/tokens_per_s` metric (one value per
`log_every`=10 steps) is compared with the reference timed over the same 10-step windows.
Last, a per-phase breakdown (batch, forward+loss, backward, clip, optimizer; perf_counter
marks, medians) of ours-eager, ours-compile and nanogpt-eager shows where the difference lies; torch.profiler
(--profile) is available but inflates small-op timings badly on these machines.

    python benchmarks/bench_train_gpt.py                 # ~1-2 minutes on 2 cores (quiet)
    python benchmarks/bench_train_gpt.py --quick         # smoke run, ~1 minute
    python benchmarks/bench_train_gpt.py --ablate        # + earlier code paths, fused qkv prototype
    python benchmarks/bench_train_gpt.py --profile       # + torch.profiler tables
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gzip
import inspect
import json
import math
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import simplified_slm
from simplified_slm.data import BatchSampler
from simplified_slm.layers.attention import AttentionBias, attend
from simplified_slm.models.gpt import GPTConfig
from simplified_slm.models.registry import build_model
from simplified_slm.training.config import TrainConfig
from simplified_slm.training.optim import build_optimizer, learning_rate, set_learning_rate
from simplified_slm.training.precision import autocast_dtype
from simplified_slm.training.step import StepSetup, TrainState, model_loss, train_step

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "train_gpt.json"
CORPUS = Path(simplified_slm.__file__).resolve().parent / "corpora" / "tinyshakespeare.txt.gz"

# the recipe (nanoGPT config/train_shakespeare_char.py with the README's CPU overrides)
VOCAB, N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 65, 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP, MAX_ITERS, WEIGHT_DECAY, BETAS, GRAD_CLIP = 1e-3, 1e-4, 100, 2000, 0.1, (0.9, 0.99), 1.0
TOKENS_PER_STEP = BATCH * BLOCK
# /work/shared/ANCHORS.md: nanoGPT @3adf61e itself, same machine type, quiet machine
ANCHOR = {"ms_per_iter": 57.7, "tokens_per_s": 13.3e3, "val_loss": 1.8857,
          "source": "ANCHORS.md: karpathy/nanoGPT @3adf61e CPU recipe, 2 vCPU EPYC, torch 2.13 CPU, quiet machine"}
GOAL_SPEEDUP = 1.5


# ---------------------------------------------------------------------------------------
# Reference: compact copy of karpathy/nanoGPT model.py (architecture and optimizer set-up
# unchanged; generate / from_pretrained / crop_block_size / estimate_mfu left out).
# ---------------------------------------------------------------------------------------
@dataclass
class NanoGPTConfig:
    block_size: int = BLOCK
    vocab_size: int = VOCAB
    n_layer: int = N_LAYER
    n_head: int = N_HEAD
    n_embd: int = N_EMBD
    dropout: float = 0.0
    bias: bool = False  # train.py's default; train_shakespeare_char.py does not change it


class LayerNorm(nn.Module):
    """LayerNorm but with an optional bias. PyTorch doesn't support simply bias=False"""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoCausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.flash = hasattr(torch.nn.functional, "scaled_dot_product_attention")
        assert self.flash  # torch >= 2.0: the slow masked path is never taken

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class NanoMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class NanoBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = NanoCausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = NanoMLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class NanoGPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([NanoBlock(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        device = idx.device
        b, t = idx.size()
        assert t <= self.config.block_size
        pos = torch.arange(0, t, dtype=torch.long, device=device)
        tok_emb = self.transformer.wte(idx)
        pos_emb = self.transformer.wpe(pos)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        param_dict = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
        optim_groups = [{"params": decay_params, "weight_decay": weight_decay},
                        {"params": nodecay_params, "weight_decay": 0.0}]
        fused_available = "fused" in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_available and device_type == "cuda"
        extra_args = dict(fused=True) if use_fused else dict()
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)


def nanogpt_get_lr(it: int) -> float:
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    if it > MAX_ITERS:
        return MIN_LR
    decay_ratio = (it - WARMUP) / (MAX_ITERS - WARMUP)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return MIN_LR + coeff * (LR - MIN_LR)


# ---------------------------------------------------------------------------------------
# Runners: one training step per call, state carried across calls (the run continues).
# ---------------------------------------------------------------------------------------
class NanoGPTRunner:
    """nanoGPT train.py's loop body (device cpu, gradient_accumulation_steps 1)."""

    def __init__(self, data_dir: Path, compile: bool = False, bf16: bool = False) -> None:
        torch.manual_seed(1337)
        self.data_dir = data_dir
        self.model = NanoGPT(NanoGPTConfig())
        self.optimizer = self.model.configure_optimizers(WEIGHT_DECAY, LR, BETAS, "cpu")
        # train.py: GradScaler(enabled=(dtype == 'float16')); without CUDA it disables itself
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        # device_type == 'cpu': nullcontext. `bf16` (ablation, not what nanoGPT does on CPU) uses
        # the autocast train.py sets up for GPUs, to show what bf16 alone does to its step here
        self.amp = torch.bfloat16 if bf16 else None
        self.ctx = torch.autocast("cpu", dtype=self.amp) if bf16 else nullcontext()
        self.fwd = torch.compile(self.model) if compile else self.model
        self.iter_num = 0
        self.X, self.Y = self.get_batch()

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        # recreated every batch to avoid a memory leak, as train.py does
        data = np.memmap(self.data_dir / "train.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - BLOCK, (BATCH,))
        x = torch.stack([torch.from_numpy((data[i:i + BLOCK]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + BLOCK]).astype(np.int64)) for i in ix])
        return x.to("cpu"), y.to("cpu")

    def step(self, mark=None) -> None:
        mark = mark or _no_mark
        lr = nanogpt_get_lr(self.iter_num)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        mark("start")
        with self.ctx:
            logits, loss = self.fwd(self.X, self.Y)
        mark("forward+loss")
        self.X, self.Y = self.get_batch()
        mark("batch")
        self.scaler.scale(loss).backward()
        mark("backward")
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        mark("clip")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.iter_num % 10 == 0:
            self.lossf = loss.item()
        self.iter_num += 1
        mark("optimizer")


def _no_mark(name: str) -> None:
    pass


# --- ablations (--ablate): earlier code paths and a prototype, not the shipped code ------------
def _fused_qkv_forward(self, x, bias, position_ids=None, rotary=None, cache=None, layer=0):
    b, t, c = x.shape
    q, k, v = self.qkv_proj(x).split(c, dim=2)
    q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
    k = k.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
    v = v.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.mask, is_causal=bias.is_causal)
    return self.o_proj(y.transpose(1, 2).reshape(b, t, c))


def apply_patches(model: nn.Module, patches: tuple[str, ...]) -> nn.Module:
    """'fused-qkv': one (d, 3d) projection instead of q/k/v (prototype)."""
    import types

    for block in model.layers:
        if "fused-qkv" in patches:
            attn = block.attn
            d = attn.q_proj.in_features
            attn.qkv_proj = nn.Linear(d, 3 * d, bias=attn.q_proj.bias is not None)
            with torch.no_grad():
                attn.qkv_proj.weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
                if attn.qkv_proj.bias is not None:
                    attn.qkv_proj.bias.zero_()
            del attn.q_proj, attn.k_proj, attn.v_proj
            attn.forward = types.MethodType(_fused_qkv_forward, attn)
    return model


class OursRunner:
    """One Trainer step per call: `training.step.train_step` on the model, optimizer and
    sampler the Trainer builds (fp32 unless `precision`, no hooks, grad_accum 1), after the
    Trainer's schedule sets the lr. `compile` is train.compile (forward + loss as one graph).

    `precision` is train.precision ("auto": bf16 autocast on a CPU with native bf16, see
    training/precision.py, and then attention trains through the eager kernel, see
    layers/attention.py `sdpa_is_slower`).

    Ablations: `legacy_compile` compiles the model alone with the loss eager (the Trainer's
    earlier train.compile), `unfolded_clip` clips with torch's clip_grad_norm_ (a separate
    pass rewriting the gradients, what FSDP runs), `patches` see above.
    """

    def __init__(self, tokens: np.ndarray, compile: bool = False, legacy_compile: bool = False,
                 unfolded_clip: bool = False, model_overrides: dict | None = None,
                 patches: tuple[str, ...] = (), precision: str = "fp32") -> None:
        torch.manual_seed(1337)
        self.tcfg = TrainConfig(max_steps=MAX_ITERS, batch_size=BATCH, block_size=BLOCK, lr=LR, min_lr=MIN_LR,
                                warmup_steps=WARMUP, betas=BETAS, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP,
                                precision=precision)
        model = build_model(GPTConfig.from_dict({**GPTConfig.presets["nanogpt-cpu"], "vocab_size": VOCAB,
                                                 **(model_overrides or {})}))
        apply_patches(model, patches)
        self.state = TrainState(model, build_optimizer(model, self.tcfg), run_id="bench")
        self.setup = StepSetup(loss_fn=model_loss(torch.compile(model) if legacy_compile else model, compile=compile),
                               forward=model, params=list(model.parameters()), device=torch.device("cpu"),
                               amp=autocast_dtype(precision, torch.device("cpu")), grad_clip=GRAD_CLIP,
                               fold_clip=not unfolded_clip)
        self.sampler = BatchSampler(tokens, BLOCK, BATCH, 1337)
        self.model = model
        model.train()

    def step(self, mark=None) -> None:
        mark, state = mark or _no_mark, self.state
        set_learning_rate(state.optimizer, learning_rate(state.step, self.tcfg), self.tcfg)
        mark("start")
        self.stats = train_step(state, [self.sampler.batch(state.step)], self.setup, mark=mark)


# ---------------------------------------------------------------------------------------
def load_tokens() -> np.ndarray:
    """Tiny shakespeare as char ids (sorted vocab, as nanoGPT's prepare.py); first 90%."""
    text = gzip.open(CORPUS, "rt", encoding="utf-8").read()
    chars = sorted(set(text))
    assert len(chars) == VOCAB, len(chars)
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    return ids[:int(0.9 * len(ids))]


def summarize(times_s: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in times_s)
    med = statistics.median(ms)
    q = statistics.quantiles(ms, n=10) if len(ms) >= 10 else [ms[0]] * 9
    return {"ms_per_iter_median": med, "ms_per_iter_mean": statistics.fmean(ms), "ms_p10": q[0], "ms_p90": q[-1],
            "tokens_per_s": TOKENS_PER_STEP / (med / 1e3), "timed_steps": len(ms)}


def time_block(runner, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        runner.step()
        out.append(time.perf_counter() - t0)
    return out


def run_interleaved(runners: dict, rounds: int, steps: int, warmup: int, say) -> dict:
    warm_s = {}
    for name, runner in runners.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            runner.step()
        warm_s[name] = time.perf_counter() - t0
        say(f"  warm-up {name}: {warmup} steps in {warm_s[name]:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name] += time_block(runners[name], steps)
        say(f"  round {r + 1}/{rounds}: " + "  ".join(
            f"{n} {statistics.median(times[n][-steps:]) * 1e3:.1f}" for n in names) + " ms/iter")
    return {name: {**summarize(times[name]), "warmup_steps": warmup, "warmup_s": warm_s[name]}
            for name in names}


def run_trainer_interleaved(tokens_dir: Path, ref: NanoGPTRunner, rounds: int, steps: int, compile: bool,
                            precision: str, say) -> dict:
    """Real Trainer.run() blocks vs reference blocks; both as 10-step window means."""
    from simplified_slm.training.config import ExperimentConfig
    from simplified_slm.training.trainer import Trainer

    trainer_windows, ref_windows, wall = [], [], []
    for r in range(rounds):
        with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
            cfg = ExperimentConfig.from_dict({
                "seed": 1337, "output_dir": tmp,
                "model": {"family": "gpt", "preset": "nanogpt-cpu", "dropout": 0.0},
                "tokenizer": {"kind": "char", "char_policy": "corpus"},
                "data": {"dataset": "tinyshakespeare", "val_fraction": 0.1},
                "train": {"max_steps": steps, "batch_size": BATCH, "block_size": BLOCK, "lr": LR, "min_lr": MIN_LR,
                          "warmup_steps": WARMUP, "betas": list(BETAS), "weight_decay": WEIGHT_DECAY,
                          "grad_clip": GRAD_CLIP, "eval_every": 10**6, "eval_batches": 1, "sample_every": 10**6,
                          "sample_tokens": 1, "checkpoint_every": 10**6, "log_every": 10, "loggers": [],
                          "progress": False, "device": "cpu", "compile": compile,
                          "precision": precision},
            })
            t0 = time.perf_counter()
            Trainer(cfg, say=lambda s: None).run()
            wall.append(time.perf_counter() - t0)
            with open(Path(tmp) / "metrics.csv", newline="") as fh:
                tok_s = [float(row["value"]) for row in csv.DictReader(fh) if row["name"] == "train/tokens_per_s"]
        # the first window holds the first steps (allocator warm-up, compilation)
        trainer_windows += [TOKENS_PER_STEP / t * 1e3 for t in tok_s[1:]]
        ref_times = time_block(ref, steps)
        ref_windows += [sum(ref_times[i:i + 10]) / 10 * 1e3 for i in range(10, len(ref_times) - 9, 10)]
        say(f"  trainer round {r + 1}/{rounds}: Trainer {statistics.median(trainer_windows):.1f}  "
            f"nanogpt-eager {statistics.median(ref_windows):.1f} ms/iter (10-step windows)")

    def stats(w):
        med = statistics.median(w)
        return {"ms_per_iter_median": med, "tokens_per_s": TOKENS_PER_STEP / (med / 1e3), "windows": len(w)}
    return {"trainer": {**stats(trainer_windows), "compile": compile, "precision": precision, "run_wall_s": wall,
                        "note": "Trainer.run() itself; its train/tokens_per_s per 10-step window, first window dropped"},
            "nanogpt-eager": stats(ref_windows), "steps_per_run": steps, "rounds": rounds}


def matmul_attention_floor(reps: int, say, bf16: bool = False) -> dict:
    """ms of one step's GEMMs and SDPA calls alone (medians over `reps` repetitions each).

    Per layer: q, k, v, o (128 -> 128), up (128 -> 512), down (512 -> 128), each as forward,
    input gradient and weight gradient; plus the lm_head's three; plus SDPA forward+backward
    (B 12, 4 heads, T 64, head 32, causal) per layer. The exact GELU's forward+backward
    (ATen, the faster of eager and inductor here) is reported beside it: nanoGPT computes
    it too, though it is not a matmul.

    `bf16`: the same arithmetic in bfloat16, as bf16 autocast runs it (the attention through
    `attend`, i.e. the eager kernel where SDPA is slower): the floor of the bf16 variants.
    """
    dt = torch.bfloat16 if bf16 else torch.float32
    n, c = TOKENS_PER_STEP, N_EMBD
    linears = [(c, c)] * 4 + [(c, 4 * c), (4 * c, c)]
    gemms = []
    for k_in, k_out in linears * N_LAYER + [(c, VOCAB)]:
        x, w, dy = (torch.randn(shape, dtype=dt) for shape in ((n, k_in), (k_out, k_in), (n, k_out)))
        gemms += [lambda x=x, w=w: F.linear(x, w), lambda dy=dy, w=w: dy @ w, lambda dy=dy, x=x: dy.t() @ x]
    q, k, v = (torch.randn(BATCH, N_HEAD, BLOCK, c // N_HEAD, dtype=dt, requires_grad=True) for _ in range(3))
    dout = torch.randn(BATCH, N_HEAD, BLOCK, c // N_HEAD, dtype=dt)
    h = torch.randn(n, 4 * c, dtype=dt, requires_grad=True)
    dh = torch.randn(n, 4 * c, dtype=dt)
    causal = AttentionBias(None, True)

    def all_gemms():
        for g in gemms:
            g()

    def attention():
        for _ in range(N_LAYER):
            attend(q, k, v, causal).backward(dout)

    def gelu():
        for _ in range(N_LAYER):
            F.gelu(h).backward(dh)

    out = {}
    for name, fn in (("gemm", all_gemms), ("attention", attention), ("gelu", gelu)):
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        out[f"{name}_ms"] = statistics.median(times)
    flops = sum(2 * n * a * b for a, b in linears * N_LAYER + [(c, VOCAB)]) * 3
    out["gemm_gflop"] = flops / 1e9
    out["gemm_gflops_per_s"] = flops / (out["gemm_ms"] / 1e3) / 1e9
    out["floor_ms"] = out["gemm_ms"] + out["attention_ms"]
    say(f"floor ({str(dt).removeprefix('torch.')}): {len(gemms)} GEMMs ({out['gemm_gflop']:.2f} GFLOP) "
        f"{out['gemm_ms']:.1f} ms ({out['gemm_gflops_per_s']:.0f} GFLOP/s), attention fwd+bwd x{N_LAYER} "
        f"{out['attention_ms']:.1f} ms: "
        f"{out['floor_ms']:.1f} ms; exact GELU fwd+bwd x{N_LAYER} {out['gelu_ms']:.1f} ms")
    return out


def phase_breakdown(runners: dict, rounds: int, steps: int, say) -> dict:
    """Median ms of each phase of a step (perf_counter marks; interleaved like the main timing)."""
    acc: dict[str, dict[str, list[float]]] = {name: {} for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            for _ in range(steps):
                marks: list[tuple[str, float]] = []
                runner.step(lambda label: marks.append((label, time.perf_counter())))
                for (_, t0), (label, t1) in zip(marks, marks[1:]):
                    acc[name].setdefault(label, []).append((t1 - t0) * 1e3)
    out = {name: {label: statistics.median(v) for label, v in phases.items()} for name, phases in acc.items()}
    labels = ["batch", "forward+loss", "backward", "clip", "optimizer"]
    say(f"{'phase (ms, median)':<25}" + "".join(f"{label:>14}" for label in labels) + f"{'sum':>8}")
    for name, phases in out.items():
        say(f"{name:<25}" + "".join(f"{phases.get(label, 0.0):>14.2f}" for label in labels)
            + f"{sum(phases.values()):>8.2f}")
    return out


def profile(runners: dict, steps: int, out_path: Path, say) -> dict:
    from torch.profiler import ProfilerActivity, profile as tprofile

    tables = {}
    for name, runner in runners.items():
        for _ in range(5):
            runner.step()
        with tprofile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for _ in range(steps):
                runner.step()
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    text = "\n\n".join(f"=== {name}: {steps} steps, sorted by self CPU time ===\n{t}" for name, t in tables.items())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text + "\n")
    say(text)
    say(f"wrote {out_path}")
    return {"file": str(out_path), "steps": steps}


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    parser.add_argument("--rounds", type=int, default=8, help="interleaving rounds")
    parser.add_argument("--steps", type=int, default=25, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps (compilation included)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants of ours")
    parser.add_argument("--no-bf16", action="store_true",
                        help="skip ours-bf16 / ours-bf16-compile (train.precision=auto; skipped anyway where "
                             "auto means float32, i.e. a CPU without AVX512-BF16 or AMX)")
    parser.add_argument("--ref-compile", action="store_true", help="also time nanoGPT under torch.compile")
    parser.add_argument("--no-trainer", action="store_true", help="skip the real Trainer.run() comparison")
    parser.add_argument("--trainer-rounds", type=int, default=3)
    parser.add_argument("--trainer-steps", type=int, default=150)
    parser.add_argument("--trainer-eager", action="store_true",
                        help="Trainer.run() with train.compile=false (default: true, the faster path)")
    parser.add_argument("--trainer-precision", default="auto", choices=("fp32", "bf16", "auto"),
                        help="Trainer.run()'s train.precision (default auto, as the shipped recipe config)")
    parser.add_argument("--ablate", action="store_true",
                        help="also time the earlier compile and clip code paths, a fused-qkv prototype and nanoGPT under "
             "bf16 autocast")
    parser.add_argument("--no-floor", action="store_true", help="skip the matmul + attention floor")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-phase breakdown")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler tables for the eager variants (the profiler itself distorts timings)")
    parser.add_argument("--quick", action="store_true", help="2 rounds x 10 steps, 1 short Trainer round")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup, args.trainer_rounds, args.trainer_steps = 2, 10, 5, 1, 50
    if args.threads:
        torch.set_num_threads(args.threads)
    say = lambda s: print(s, flush=True)  # noqa: E731

    tokens = load_tokens()
    with tempfile.TemporaryDirectory(prefix="bench_nanogpt_data_") as data_dir:
        data_dir = Path(data_dir)
        tokens.tofile(data_dir / "train.bin")  # nanoGPT's prepare.py format: raw uint16
        runners = {"ours-eager": OursRunner(tokens)}
        if not args.no_compile:
            runners["ours-compile"] = OursRunner(tokens, compile=True)
        native_bf16 = autocast_dtype("auto", torch.device("cpu")) is not None
        if not args.no_bf16 and native_bf16:
            runners["ours-bf16"] = OursRunner(tokens, precision="auto")
            if not args.no_compile:
                runners["ours-bf16-compile"] = OursRunner(tokens, compile=True, precision="auto")
        elif not args.no_bf16:
            say("train.precision=auto is float32 on this CPU (no AVX512-BF16 / AMX): bf16 variants skipped")
        if args.ablate:
            runners["ours-eager-unfolded-clip"] = OursRunner(tokens, unfolded_clip=True)
            runners["ours-compile-model-only"] = OursRunner(tokens, legacy_compile=True, unfolded_clip=True)
            if not args.no_compile:
                runners["ours-compile-fused-qkv"] = OursRunner(tokens, compile=True, patches=("fused-qkv",))
        runners["nanogpt-eager"] = NanoGPTRunner(data_dir)
        if args.ablate and native_bf16:
            runners["nanogpt-bf16"] = NanoGPTRunner(data_dir, bf16=True)
        if args.ref_compile:
            runners["nanogpt-compile"] = NanoGPTRunner(data_dir, compile=True)
        params = {n: sum(p.numel() for p in {id(p): p for p in r.model.parameters()}.values())
                  for n, r in runners.items()}
        say(f"nanoGPT CPU recipe shape: vocab {VOCAB}, {N_LAYER}x{N_EMBD} ({N_HEAD} heads), block {BLOCK}, "
            f"batch {BATCH} = {TOKENS_PER_STEP} tokens/step; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({cpu_model()})")
        say("parameters: " + ", ".join(f"{n} {p:,}" for n, p in params.items()))
        results = run_interleaved(runners, args.rounds, args.steps, args.warmup, say)
        for name, r in results.items():
            r["compute_dtype"] = str(runners[name].amp or torch.float32).removeprefix("torch.")
        trainer = None
        if not args.no_trainer:
            trainer = run_trainer_interleaved(data_dir, runners["nanogpt-eager"], args.trainer_rounds,
                                              args.trainer_steps, not args.trainer_eager,
                                              args.trainer_precision, say)
        floor = None if args.no_floor else matmul_attention_floor(20 if args.quick else 60, say)
        floor_bf16 = (matmul_attention_floor(20 if args.quick else 60, say, bf16=True)
                      if not args.no_floor and "ours-bf16" in runners else None)
        breakdown = None
        if not args.no_breakdown:
            breakdown = phase_breakdown({n: runners[n] for n in ("ours-eager", "ours-compile", "ours-bf16",
                                                                 "ours-bf16-compile", "nanogpt-eager")
                                         if n in runners},
                                        max(2, args.rounds // 2), args.steps, say)
        prof = None
        if args.profile:
            eager = {n: r for n, r in runners.items() if n.endswith("eager")}
            prof = profile(eager, 20, args.json.with_name(args.json.stem + "_profile.txt"), say)

    ref_ms = results["nanogpt-eager"]["ms_per_iter_median"]
    for r in results.values():
        r["speedup_vs_nanogpt_eager"] = ref_ms / r["ms_per_iter_median"]
        # p10 ratio: less sensitive when the machine is loaded for more than half the time
        r["speedup_vs_nanogpt_eager_p10"] = results["nanogpt-eager"]["ms_p10"] / r["ms_p10"]
        r["speedup_vs_anchor"] = ANCHOR["ms_per_iter"] / r["ms_per_iter_median"]
    say("")
    say(f"{'variant':<25} {'ms/iter med':>11} {'p10':>7} {'p90':>7} {'tokens/s':>9} {'vs nanoGPT':>10} "
        f"{'(p10)':>7} {'warm-up s':>9}")
    for name, r in results.items():
        say(f"{name:<25} {r['ms_per_iter_median']:>11.1f} {r['ms_p10']:>7.1f} {r['ms_p90']:>7.1f} "
            f"{r['tokens_per_s']:>9,.0f} {r['speedup_vs_nanogpt_eager']:>9.2f}x "
            f"{r['speedup_vs_nanogpt_eager_p10']:>6.2f}x {r['warmup_s']:>9.1f}")
    if trainer:
        t, rr = trainer["trainer"], trainer["nanogpt-eager"]
        say(f"{'Trainer.run()':<25} {t['ms_per_iter_median']:>11.1f} {'':>7} {'':>7} {t['tokens_per_s']:>9,.0f} "
            f"{rr['ms_per_iter_median'] / t['ms_per_iter_median']:>9.2f}x {'':>7}   (10-step windows; nanoGPT in the same "
            f"windows {rr['ms_per_iter_median']:.1f} ms/iter; Trainer {'compiled' if t['compile'] else 'eager'}, "
            f"precision {t['precision']})")
        trainer["speedup_vs_nanogpt_eager"] = rr["ms_per_iter_median"] / t["ms_per_iter_median"]
    say(f"{'ANCHORS.md nanoGPT':<25} {ANCHOR['ms_per_iter']:>11.1f} {'':>7} {'':>7} {ANCHOR['tokens_per_s']:>9,.0f} "
        f"{'':>10}   (nanoGPT itself on a quiet 2 vCPU AMD EPYC; context only, not this run; this CPU: "
        f"{cpu_model()})")
    shipped = ("ours-eager", "ours-compile", "ours-bf16", "ours-bf16-compile")  # --ablate ones are not
    best = max((n for n in results if n in shipped), key=lambda n: results[n]["speedup_vs_nanogpt_eager"])
    speedup = results[best]["speedup_vs_nanogpt_eager"]
    say(f"best ours: {best} at {speedup:.2f}x nanoGPT-eager measured here (goal >= {GOAL_SPEEDUP}x): "
        f"{'met' if speedup >= GOAL_SPEEDUP else 'NOT met'}")
    if floor:
        floor["max_speedup_at_floor"] = ref_ms / floor["floor_ms"]
        floor["max_speedup_at_floor_plus_gelu"] = ref_ms / (floor["floor_ms"] + floor["gelu_ms"])
        say(f"ceiling: nanoGPT {ref_ms:.1f} ms / floor {floor['floor_ms']:.1f} ms (matmuls + attention alone) = "
            f"{floor['max_speedup_at_floor']:.2f}x; with the exact GELU {floor['max_speedup_at_floor_plus_gelu']:.2f}x "
            f"(everything else at zero cost)")
    if floor_bf16:
        floor_bf16["max_speedup_at_floor"] = ref_ms / floor_bf16["floor_ms"]
        say(f"bf16 ceiling: nanoGPT {ref_ms:.1f} ms / bf16 floor {floor_bf16['floor_ms']:.1f} ms = "
            f"{floor_bf16['max_speedup_at_floor']:.2f}x")

    out = {
        "config": {"vocab": VOCAB, "n_layer": N_LAYER, "n_head": N_HEAD, "n_embd": N_EMBD, "block_size": BLOCK,
                   "batch_size": BATCH, "tokens_per_step": TOKENS_PER_STEP,
                   "native_bf16": native_bf16,
                   "rounds": args.rounds, "steps_per_round": args.steps, "warmup_steps": args.warmup,
                   "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                   "python": platform.python_version(), "cpu": cpu_model(),
                   "date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick},
        "parameters": params,
        "variants": results,
        "trainer_run": trainer,
        "anchor_nanogpt": ANCHOR,
        "goal_speedup": GOAL_SPEEDUP,
        "best_ours": best,
        "best_speedup_vs_nanogpt_eager": speedup,
        "goal_met": speedup >= GOAL_SPEEDUP,
        "floor": floor,
        "floor_bf16": floor_bf16,
        "phase_breakdown_ms": breakdown,
        "profile": prof,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    say(f"wrote {args.json}")


if __name__ == "__main__":
    main()
