"""The names of logged metrics: one place for the code that writes them and the code that reads them.

Writers (the trainer, `training/monitoring.py`, LIF layers, H-Net's compression report)
build names with these constants and functions; `evaluation/analysis.py` reads metrics.csv
through the same names and patterns, so a renamed metric cannot silently vanish from the
plots. It sits at the package root because writers live in every layer (layers, models,
training).
"""

from __future__ import annotations

import re

TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_GRAD_NORM = "train/grad_norm"  # total, before clipping
TRAIN_TOKENS_PER_S = "train/tokens_per_s"
TRAIN_TOKENS = "train/tokens"  # training tokens seen up to the step
TRAIN_SECONDS = "train/seconds"  # time in training steps so far, evaluation and checkpoints excluded
TRAIN_AUX_LOSS = "train/aux_loss"  # e.g. H-Net's ratio loss
TRAIN_CE_LOSS = "train/ce_loss"  # distillation: the hard-label part
TRAIN_KD_LOSS = "train/kd_loss"  # distillation: the teacher part
TRAIN_SKIPPED_NONFINITE = "train/skipped_nonfinite"  # in a row, at the step
TRAIN_SKIPPED_NONFINITE_TOTAL = "train/skipped_nonfinite_total"

VAL_PREFIX = "val/"  # + every key of evaluation.metrics.evaluate_lm
VAL_LOSS = "val/loss"
VAL_BPB = "val/bpb"


def grad_norm(group: str) -> str:
    """Gradient norm of a parameter group (`global` for all of them)."""
    return f"grad_norm/{group}"


def ternary(module_path: str, what: str) -> str:
    """BitLinear code shares and scale: `what` is neg, zero, pos or scale; path `all` for the model."""
    return f"ternary/{module_path}/{what}"


def hnet_bytes_per_chunk(stage: int) -> str:
    return f"hnet/stage{stage}/bytes_per_chunk"


def hnet_compression(stage: int) -> str:
    return f"hnet/stage{stage}/compression"


def firing_rate(layer: str) -> str:
    """Mean spike rate of a LIF layer (`all` for every layer together)."""
    return f"snn/firing_rate/{layer}"


GRAD_NORM_PATTERN = re.compile(r"^grad_norm/(.+)$")
TERNARY_PATTERN = re.compile(r"^ternary/(.+)/(neg|zero|pos|scale)$")
HNET_BYTES_PER_CHUNK_PATTERN = re.compile(r"^hnet/stage(\d+)/bytes_per_chunk$")
FIRING_RATE_PATTERN = re.compile(r"^snn/firing_rate/(.+)$")
