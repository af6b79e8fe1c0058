"""Language-model metrics, with bits per byte as the cross-tokenizer number.

BPB = total nats over the evaluated targets / (ln 2 * total UTF-8 bytes of those targets).
A byte model, a char model and a BPE model evaluated on the same text are comparable in
BPB, never in loss per token.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

from simplified_slm.models.base import CausalLM


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    return total_nats / (math.log(2) * max(1, total_bytes))


def utf8_validity(data: bytes) -> float:
    """Fraction of bytes that belong to well-formed UTF-8 sequences (1.0 for empty input)."""
    if not data:
        return 1.0
    text = data.decode("utf-8", errors="surrogateescape")
    invalid = sum(1 for ch in text if 0xDC80 <= ord(ch) <= 0xDCFF)
    return 1.0 - invalid / len(data)


@torch.no_grad()
def evaluate_lm(model: CausalLM, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                token_bytes: np.ndarray, device: torch.device | str,
                autocast_dtype: torch.dtype | None = None,
                windows: list[tuple[float, int]] | None = None) -> dict[str, float]:
    """Loss (nats/token), perplexity, BPB and next-token accuracy over `batches` of (x, y).

    `windows`, when given, receives one (nats, bytes) pair per evaluated row: the units a
    confidence interval for the BPB resamples, at no extra model cost.
    """
    was_training = model.training
    model.eval()
    byte_table = torch.as_tensor(np.asarray(token_bytes, dtype=np.int64))
    nats = 0.0
    tokens = correct = num_bytes = 0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                logits = model(x).logits
            logits = logits.float()
            row_nats = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none").view_as(y).sum(1)
            row_bytes = byte_table[y.cpu()].sum(1)
            nats += row_nats.sum().item()
            correct += (logits.argmax(-1) == y).sum().item()
            tokens += y.numel()
            num_bytes += int(row_bytes.sum())
            if windows is not None:
                windows.extend(zip(row_nats.tolist(), row_bytes.tolist()))
    finally:
        model.train(was_training)
    if tokens == 0:
        return {}
    loss = nats / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": bits_per_byte(nats, num_bytes),
            "accuracy": correct / tokens, "tokens": float(tokens), "bytes": float(num_bytes)}
