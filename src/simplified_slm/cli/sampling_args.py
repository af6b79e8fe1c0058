"""Sampling flags shared by the commands that generate text (kept free of torch: parsing must be fast)."""

from __future__ import annotations

import argparse


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    """The sampling flags `slm generate` and `slm chat` share (one spelling, one set of checks)."""
    p.add_argument("--max_tokens", "--max-tokens", type=int, default=max_tokens, help="most new tokens")
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top_k", "--top-k", type=int)
    p.add_argument("--top_p", "--top-p", type=float)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int)
