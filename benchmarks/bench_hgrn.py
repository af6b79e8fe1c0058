"""Time and memory of HGRN forward+backward: naive loop vs chunk-parallel, on CPU.

Each form runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own:
the number reported is the peak growth over the RSS measured after the inputs exist,
i.e. what the forward, the saved tensors and the backward added.

    python benchmarks/bench_hgrn.py            # B=4, T=2048, D=512, float32, 2 threads
    python benchmarks/bench_hgrn.py --quick    # small sizes, a few seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from simplified_slm.ops.hgrn import chunk_hgrn, naive_recurrent_hgrn

FORMS = {"naive": naive_recurrent_hgrn, "chunk": chunk_hgrn}
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "hgrn.json"


def _measure(form: str, batch: int, length: int, dim: int, repeats: int, threads: int) -> dict:
    """Run inside the worker process: one untimed fwd+bwd, then `repeats` timed ones."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    i = torch.randn(batch, length, dim, generator=gen).requires_grad_()
    f = torch.rand(batch, length, dim, generator=gen).requires_grad_()
    do = torch.randn(batch, length, dim, generator=gen)
    fn = FORMS[form]
    # Start autograd's engine and the thread pools first: they take tens of MB of RSS
    # once per process, which would otherwise dwarf small problems.
    warm_i = torch.zeros(1, 4, dim, requires_grad=True)
    fn(warm_i, torch.zeros(1, 4, dim))[0].backward(torch.zeros(1, 4, dim))
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fwd_ms, bwd_ms = [], []
    for run in range(repeats + 1):
        i.grad = f.grad = None
        t0 = time.perf_counter()
        o, _ = fn(i, f)
        t1 = time.perf_counter()
        o.backward(do)
        t2 = time.perf_counter()
        del o
        if run:  # the first run only warms up the allocator
            fwd_ms.append((t1 - t0) * 1e3)
            bwd_ms.append((t2 - t1) * 1e3)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kb
    total = [a + b for a, b in zip(fwd_ms, bwd_ms)]
    return {
        "form": form,
        "repeats": repeats,
        "fwd_ms": statistics.median(fwd_ms),
        "bwd_ms": statistics.median(bwd_ms),
        "fwd_bwd_ms": statistics.median(total),
        "peak_mem_mb": peak_kb / 1024,
    }


def _run_worker(form: str, args: argparse.Namespace, repeats: int) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", form,
        "--batch", str(args.batch), "--length", str(args.length), "--dim", str(args.dim),
        "--threads", str(args.threads), "--repeats", str(repeats),
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B=2, T=256, D=64 smoke run")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--naive-repeats", type=int, default=2, help="the naive loop is slow at T=2048")
    parser.add_argument("--chunk-repeats", type=int, default=10)
    parser.add_argument("--worker", choices=sorted(FORMS), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(_measure(args.worker, args.batch, args.length, args.dim, args.repeats, args.threads)))
        return
    if args.quick:
        args.batch, args.length, args.dim = 2, 256, 64

    naive = _run_worker("naive", args, args.naive_repeats)
    chunk = _run_worker("chunk", args, args.chunk_repeats)
    speedup = naive["fwd_bwd_ms"] / chunk["fwd_bwd_ms"]
    mem_ratio = chunk["peak_mem_mb"] / naive["peak_mem_mb"] if naive["peak_mem_mb"] > 0 else float("nan")

    print(f"HGRN fwd+bwd  B={args.batch} T={args.length} D={args.dim} float32, {args.threads} threads, torch {torch.__version__}")
    print(f"{'form':<6} {'fwd ms':>9} {'bwd ms':>9} {'fwd+bwd ms':>11} {'peak MB':>9} {'runs':>5}")
    for r in (naive, chunk):
        print(f"{r['form']:<6} {r['fwd_ms']:>9.1f} {r['bwd_ms']:>9.1f} {r['fwd_bwd_ms']:>11.1f} {r['peak_mem_mb']:>9.1f} {r['repeats']:>5}")
    print(f"speed-up chunk vs naive: {speedup:.1f}x (goal >= 10x); peak memory ratio: {mem_ratio:.2f} (goal <= 2)")

    result = {
        "config": {
            "batch": args.batch, "length": args.length, "dim": args.dim, "dtype": "float32",
            "threads": args.threads, "torch": torch.__version__, "quick": args.quick,
        },
        "naive": naive,
        "chunk": chunk,
        "speedup": speedup,
        "peak_mem_ratio": mem_ratio,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
