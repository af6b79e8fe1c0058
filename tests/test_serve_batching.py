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


@pytest.mark.parametrize("family", FAMILIES)
def test_requests_admitted_mid_batch_get_their_solo_tokens(family):
    model, tokenizer = family_model(family), ByteTokenizer()
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
