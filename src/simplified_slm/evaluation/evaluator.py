"""A full evaluation report of a trained model: metrics on a split plus sample generations."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from simplified_slm.data import iter_eval_batches
from simplified_slm.evaluation.metrics import evaluate_lm, utf8_validity
from simplified_slm.evaluation.per_document import bpb_confidence_interval
from simplified_slm.layers.lif import firing_rates
from simplified_slm.models.base import CausalLM
from simplified_slm.tokenizers import Tokenizer


def decoded_bytes(tokenizer: Tokenizer, ids: list[int]) -> bytes:
    """The raw bytes a generation stands for (byte models can emit invalid UTF-8)."""
    if hasattr(tokenizer, "decode_bytes"):
        return tokenizer.decode_bytes(ids)
    return tokenizer.decode(ids).encode("utf-8", errors="surrogateescape")


def evaluate_model(model: CausalLM, tokenizer: Tokenizer, tokens: np.ndarray, *, block_size: int,
                   batch_size: int = 8, max_batches: int | None = None, num_samples: int = 3,
                   sample_tokens: int = 200, prompt: str = "\n", temperature: float = 0.8,
                   seed: int = 0) -> dict[str, Any]:
    """Loss, perplexity, BPB, accuracy on `tokens` (plus `snn/firing_rate/...` for spiking
    models), a 95% interval for the BPB, and `num_samples` generations with their UTF-8 validity.

    The interval resamples the `block_size`-token evaluation windows (a block bootstrap over
    the stream), so it comes from the same pass as the point estimate.
    """
    device = model.device
    started = time.perf_counter()
    windows: list[tuple[float, int]] = []
    metrics = evaluate_lm(model, iter_eval_batches(tokens, block_size, batch_size, max_batches),
                          tokenizer.token_byte_lengths(), device, windows=windows)
    elapsed = time.perf_counter() - started
    interval = None
    if len(windows) >= 2:
        ci = bpb_confidence_interval([n for n, _ in windows], [b for _, b in windows])
        interval = {"lower": ci["lower"], "upper": ci["upper"], "level": ci["level"],
                    "method": f"percentile bootstrap over {ci['documents']} evaluation windows of "
                              f"{block_size} tokens (1000 resamples, seed 0)"}
    metrics["eval_tokens_per_s"] = metrics.get("tokens", 0.0) / max(elapsed, 1e-9)
    # spiking models: rates of the last evaluation batch, read before sampling replaces them
    metrics.update(firing_rates(model))
    samples = []
    prompt_ids = tokenizer.encode_ids(prompt) or [0]
    for i in range(num_samples):
        out = model.generate(torch.tensor([prompt_ids], device=device), sample_tokens, temperature=temperature,
                             top_k=50, seed=seed + i, eos_token_id=tokenizer.eos_token_id)
        new_ids = out[0, len(prompt_ids):].tolist()
        raw = decoded_bytes(tokenizer, new_ids)
        samples.append({"prompt": prompt, "text": tokenizer.decode(new_ids), "utf8_validity": utf8_validity(raw)})
    if samples:
        metrics["utf8_validity"] = float(np.mean([s["utf8_validity"] for s in samples]))
    return {"metrics": metrics, "bpb_interval": interval, "samples": samples,
            "num_parameters": model.num_parameters(), "family": model.config.family}


def metrics_line(metrics: dict[str, float]) -> str:
    """One line of the headline metrics; UTF-8 validity is "n/a" when no sample was generated
    (a default of 1.0 would claim perfect samples that do not exist)."""
    validity = metrics.get("utf8_validity")
    return (f"val loss {metrics['loss']:.4f} nats/token | ppl {metrics['ppl']:.2f} | bpb {metrics['bpb']:.4f} | "
            f"accuracy {metrics['accuracy']:.3f} | utf8 validity "
            f"{'n/a' if validity is None else format(validity, '.3f')}")

