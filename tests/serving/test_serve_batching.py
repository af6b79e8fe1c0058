"""The server's batching is exact for every family: joined cache rows continue as if alone,
and requests admitted into a running batch get the tokens `generate` gives them alone."""

import threading
import time

import pytest
import torch

from conftest import FAMILY_CONFIGS, family_model
from simplified_slm.serving.batch_cache import join
from simplified_slm.serving.scheduler import Job, Sampling, Scheduler
from simplified_slm.tokenizers import ByteTokenizer

FAMILIES = list(FAMILY_CONFIGS)


def _prefill(model, ids: list[int], capacity: int):
    cache = model.make_cache(1, capacity)
    out = model(torch.tensor([ids]), cache=cache)
    return cache, out.logits[:, -1]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_joined_caches_continue_like_separate_ones(family):
    model = family_model(family)
    long, short = list(b"The quick brown fox"), list(b"Hi")
    (cache_a, _), (cache_b, _) = _prefill(model, long, 40), _prefill(model, short, 40)
    joined = join(model, [(cache_a, 1), (cache_b, 1)], 40)
    mask = torch.zeros(2, len(long), dtype=torch.long)
    mask[0], mask[1, -len(short):] = 1, 1
    for token in (101, 32, 120):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        together = model(torch.tensor([[token], [token]]), attention_mask=mask, cache=joined).logits[:, -1]
        alone = torch.cat([model(torch.tensor([[token]]), cache=c).logits[:, -1] for c in (cache_a, cache_b)])
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,overrides", [(f, {}) for f in FAMILIES] + [("llama", {"sliding_window": 4})])
def test_requests_admitted_mid_batch_get_their_solo_tokens(family, overrides):
    """Sliding-window layers cannot join; those groups run as separate batches, as exactly."""
    model, tokenizer = family_model(family, **overrides), ByteTokenizer()
    prompts = ["Hello there", "a", "The quick brown fox jumps", "xy", "Once upon a time, in a land"]
    settings = [Sampling(12, temperature=0.0 if i % 2 == 0 else 0.9, seed=100 + i) for i in range(len(prompts))]
    solo = []
    for prompt, s in zip(prompts, settings):
        ids = torch.tensor([tokenizer.encode_ids(prompt)])
        out = model.generate(ids, s.max_tokens, greedy=s.temperature == 0, temperature=s.temperature, seed=s.seed)
        solo.append(tokenizer.decode(out[0, ids.shape[1]:]))
    texts = [""] * len(prompts)
    started = [threading.Event() for _ in prompts]
    finished = [threading.Event() for _ in prompts]

    def emitter(i):
        def emit(event):
            if event[0] in ("delta", "finish"):
                texts[i] += event[2]
                started[i].set()
            if event[0] in ("done", "error"):
                started[i].set()
                finished[i].set()
        return emit

    scheduler = Scheduler(model, tokenizer, max_batch=4)  # the fifth waits for a free row
    scheduler.start()
    try:
        for i, prompt in enumerate(prompts):  # each joins while the earlier ones are decoding
            scheduler.submit(Job([tokenizer.encode_ids(prompt)], 1, settings[i], emitter(i), time.monotonic() + 60))
            assert started[i].wait(60)
        assert all(f.wait(60) for f in finished)
    finally:
        scheduler.stop()
    assert texts == solo


def test_timed_out_requests_fail_with_504_and_stop():
    model, tokenizer = family_model("hgrn_bit"), ByteTokenizer()
    events = {"late": [], "slow": []}
    finished = {name: threading.Event() for name in events}

    def emitter(name):
        def emit(event):
            events[name].append(event)
            if event[0] in ("done", "error"):
                finished[name].set()
        return emit

    scheduler = Scheduler(model, tokenizer, max_batch=2)
    scheduler.start()
    try:
        ids = tokenizer.encode_ids("Hello")
        scheduler.submit(Job([ids], 1, Sampling(10), emitter("late"), time.monotonic() - 1))
        scheduler.submit(Job([ids], 1, Sampling(10**6), emitter("slow"), time.monotonic() + 0.5))
        assert finished["late"].wait(30) and finished["slow"].wait(30)
        deadline = time.monotonic() + 10  # the failed row leaves the batch at the end of that step
        while scheduler.load()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.load()["running"] == 0
    finally:
        scheduler.stop()
    for name in events:
        kind, error = events[name][-1]
        assert kind == "error" and error.status == 504
    assert not any(e[0] == "delta" for e in events["late"])
