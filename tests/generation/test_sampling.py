"""Sampling rules on hand-made logits."""

import torch

from simplified_slm.generation.sampling import apply_repetition_penalty, choose_next, filter_top_k, filter_top_p


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    kept = torch.isfinite(filter_top_k(logits, 2))
    assert kept.tolist() == [[False, True, False, True]]


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_top_p(probs.log(), 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_top_p(probs.log(), 0.4))
    assert kept.tolist() == [[True, False, False, False]]


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 1.0]]


def test_greedy_and_sampling():
    logits = torch.tensor([[0.0, 10.0, 0.0], [3.0, 0.0, 0.0]])
    assert choose_next(logits, greedy=True).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = [choose_next(logits, temperature=1.0, top_k=1, generator=g).tolist() for _ in range(5)]
    assert all(d == [1, 0] for d in draws)


def test_generate_stops_at_eos_pads_finished_rows_and_streams():
    from simplified_slm.models.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.preset("tiny", vocab_size=50)).eval()
    prompt = torch.randint(0, 50, (2, 4))
    free = model.generate(prompt, 12, greedy=True)
    eos = int(free[0, 4])  # row 0 finishes at its first new token
    streamed = []
    out = model.generate(prompt, 12, greedy=True, eos_token_id=eos, pad_token_id=0, on_token=streamed.append)
    assert torch.equal(torch.stack(streamed, 1), out[:, 4:])
    assert out[0, 4] == eos and (out[0, 5:] == 0).all()
    first_eos_1 = (free[1, 4:] == eos).nonzero()
    if len(first_eos_1):  # the run ends when both rows have finished
        assert out.shape[1] == 4 + int(first_eos_1[0]) + 1
    else:
        assert out.shape[1] == 16 and torch.equal(out[1], free[1])
    assert model.generate(prompt, 0).shape == (2, 4)
