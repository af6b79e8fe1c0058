"""The decoding loop shared by every family.

The prompt runs once through the model (filling the cache); after that each step feeds one
token, so a step costs one attention row for transformers and O(1) for recurrent families.
Models with a bounded context (learned positions) fall back to re-running the last
`max_context` tokens once the cache is full, like nanoGPT's cropping.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from simplified_slm.errors import SLMError
from simplified_slm.generation.compiled_step import compiled_step
from simplified_slm.generation.sampling import choose_next
from simplified_slm.layers.kv_cache import KVCache, resolve_kv_cache_dtype

def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int = 0,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ids, attention_mask)` of token lists left-padded to the longest (mask 1 = real token):
    the batch layout in which every family computes each row as it would alone."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def check_sampling_args(max_new_tokens: int, *, temperature: float, top_k: int | None, top_p: float | None,
                        repetition_penalty: float) -> None:
    """Raise SLMError for a sampling setting `generate` cannot use; callers that print
    (the CLI echoes the prompt) run it first so the error is the only output."""
    if max_new_tokens < 0:
        raise SLMError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if top_k is not None and top_k < 1:
        raise SLMError(f"top_k must be at least 1 (or unset), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise SLMError(f"top_p must be in (0, 1], got {top_p}")
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise SLMError(f"temperature must be a finite number >= 0, got {temperature}")
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0.0):
        raise SLMError(f"repetition_penalty must be a finite number > 0, got {repetition_penalty}")


@torch.no_grad()
def generate(model: Any, input_ids: torch.Tensor, max_new_tokens: int | None = None, *, greedy: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, attention_mask: torch.Tensor | None = None,
             seed: int | None = None, use_cache: bool = True, compile: bool = False,
             kv_cache_dtype: str | torch.dtype | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None,
             stop_when: Callable[[torch.Tensor], bool] | None = None,
             max_length: int | None = None, do_sample: bool | None = None) -> torch.Tensor:
    """Return prompt + generated ids, shape (batch, prompt_len + new_len).

    Batched prompts of different lengths go in left-padded with `attention_mask` (1 = real
    token); each row then gets the same tokens it would get alone. Rows that emit
    `eos_token_id` (one id or several) are padded with `pad_token_id` (default: the first
    eos) until all rows finish. `max_new_tokens` defaults to 100.

    transformers' spellings work too, so Hugging-Face-style snippets run unchanged:
    `max_length` is the total length including the prompt (`max_new_tokens` wins when both
    are given, as there), and `do_sample=False` means greedy. Note the defaults differ:
    without either flag we sample (transformers decodes greedily).
    `on_token` receives each new column of ids (for streaming output); `stop_when` receives
    the ids so far after each step and ends generation by returning True (stop strings,
    which only the caller can decode). `compile=True` runs
    the one-token decode steps through `torch.compile`; the prompt runs eagerly, which also
    refreshes the weight caches the compiled step reads (BitLinear's codes and stacks). The
    first call pays the compilation; benchmarks/bench_decode_smollm2.py and
    bench_bitnet_inference.py show whether it pays. `kv_cache_dtype` ("bf16", "fp16",
    "fp32" or a dtype) stores a transformer's keys and values in that dtype (bf16 halves
    the cache of long contexts; attention still computes in the model's dtype).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.shape[1] == 0:
        raise SLMError("the prompt is empty; give at least one token (e.g. a newline)")
    max_new_tokens = _new_token_budget(max_new_tokens, max_length, input_ids.shape[1])
    greedy = _greedy(greedy, do_sample)
    eos_ids = _eos_ids(eos_token_id)
    check_sampling_args(max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty)
    model.check_input_ids(input_ids)
    limit = model.max_context
    if limit is not None and input_ids.shape[1] > limit:
        raise SLMError(f"the prompt has {input_ids.shape[1]} tokens but the model's context is {limit}; "
                       "shorten the prompt")
    was_training = model.training
    model.eval()
    device = model.device
    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    # ids and mask live in buffers of the final length, so a step writes one column
    # instead of re-allocating the whole history
    ids_buf = torch.empty(batch, total, dtype=torch.long, device=device)
    ids_buf[:, :prompt_len] = input_ids
    mask_buf = None
    if attention_mask is not None:
        mask_buf = torch.ones(batch, total, dtype=torch.long, device=device)
        mask_buf[:, :prompt_len] = attention_mask
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = model.make_cache(batch, total if limit is None else min(total, limit)) if use_cache else None
    if kv_cache_dtype is not None and cache is not None:
        if not isinstance(cache, KVCache):
            raise SLMError(f"kv_cache_dtype applies to transformer KV caches; the {model.config.family} "
                           f"model's {type(cache).__name__} has none, drop the option")
        cache.to_dtype(resolve_kv_cache_dtype(kv_cache_dtype))
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    fill = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    stop = None if eos_ids is None else torch.tensor(eos_ids, device=device)
    length = prompt_len
    step_model = compiled_step(model) if compile and cache is not None else model
    try:
        out = model(ids_buf[:, :length], attention_mask=None if mask_buf is None else mask_buf[:, :length],
                    cache=cache)
        for step in range(max_new_tokens):
            ids = ids_buf[:, :length]
            nxt = choose_next(out.logits[:, -1], ids, greedy=greedy, temperature=temperature, top_k=top_k,
                              top_p=top_p, repetition_penalty=repetition_penalty, generator=generator)
            if stop is not None:
                nxt = torch.where(finished, torch.full_like(nxt, fill), nxt)
                finished |= torch.isin(nxt, stop)
            ids_buf[:, length] = nxt
            length += 1
            if on_token is not None:
                on_token(nxt)
            if (step == max_new_tokens - 1 or (stop is not None and bool(finished.all()))
                    or (stop_when is not None and stop_when(ids_buf[:, :length]))):
                break
            mask = None if mask_buf is None else mask_buf[:, :length]
            if cache is not None and (limit is None or length <= limit):
                out = step_model(ids_buf[:, length - 1:length], attention_mask=mask, cache=cache)
            else:
                start = 0 if limit is None else max(0, length - limit)
                out = model(ids_buf[:, start:length], attention_mask=None if mask is None else mask[:, start:])
    finally:
        model.train(was_training)
    return ids_buf[:, :length]


def _new_token_budget(max_new_tokens: int | None, max_length: int | None, prompt_len: int) -> int:
    """Tokens to generate from our `max_new_tokens` or transformers' total `max_length`."""
    if max_new_tokens is not None:
        return max_new_tokens
    if max_length is None:
        return 100
    if max_length < prompt_len:
        raise SLMError(f"max_length {max_length} is shorter than the prompt ({prompt_len} tokens); "
                       "max_length counts the prompt too, or pass max_new_tokens instead")
    return max_length - prompt_len


def _greedy(greedy: bool, do_sample: bool | None) -> bool:
    """Our `greedy` flag, or its transformers spelling `do_sample` (its negation)."""
    if do_sample is None:
        return greedy
    if greedy and do_sample:
        raise SLMError("greedy=True and do_sample=True contradict each other; pass one of them")
    return not do_sample


def _eos_ids(eos_token_id: int | Sequence[int] | None) -> list[int] | None:
    """End-of-sequence ids as a list (transformers allows one id or several)."""
    if eos_token_id is None:
        return None
    ids = [int(i) for i in eos_token_id] if isinstance(eos_token_id, (list, tuple)) else [int(eos_token_id)]
    if not ids:
        raise SLMError("eos_token_id is an empty list; give one id, several, or None")
    return ids
