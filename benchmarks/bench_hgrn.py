"""Time and memory of HGRN forward+backward on CPU: the naive loop, the pure-PyTorch
chunk-parallel form and the fused recurrent form (the C kernel models use when it builds).

Each form runs in a fresh subprocess so its peak resident memory (VmHWM) is its own:
the number reported is the peak growth over the RSS measured after the inputs exist,
during the first forward+backward, i.e. what the forward, the saved tensors and the
backward added. Later runs only add glibc's retention of freed heap (its mmap threshold
rises after the first large free, and full-size gradients reallocated every run then
fragment the heap), which grows with the number of runs and not with the algorithm; that
growth is recorded as rss_growth_all_runs_mb.

Timing on a shared 2-core machine: when another process holds the cores, every
multi-threaded torch op waits for a descheduled thread and the chunk form slows down
100x while the single-threaded naive loop barely notices. So before each timed run the
worker waits (up to --idle-wait seconds) for the CPUs to be idle, then runs fwd+bwd once
untimed so the thread pool is awake and the inputs are back in cache, as they are inside a
training loop, and times the next one. The best run is the headline number, the median is
reported next to it, and the CPU load seen before each pair of runs is recorded.

    python benchmarks/bench_hgrn.py            # B=4, T=2048, D=512, float32, 2 threads
    python benchmarks/bench_hgrn.py --quick    # small sizes, a few seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from simplified_slm.ops.hgrn import chunk_hgrn, fused_recurrent_hgrn, naive_recurrent_hgrn
from simplified_slm.ops.hgrn.native import native_available
from simplified_slm.utils.memory import peak_rss_bytes

FORMS = {"naive": naive_recurrent_hgrn, "chunk": chunk_hgrn, "fused": fused_recurrent_hgrn}
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "hgrn.json"
_TICKS = os.sysconf("SC_CLK_TCK")  # benchmark is Unix-only anyway: it needs `resource`


def _cpu_busy(interval_s: float = 0.2) -> float:
    """Fraction of all CPUs other processes kept busy over `interval_s` (Linux; 0 elsewhere).

    Our own CPU time is subtracted: torch's OpenMP workers keep spinning for a while after
    each parallel op and would otherwise read as load.
    """

    def snapshot() -> tuple[float, float, float]:
        with open("/proc/stat") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:]]
        own = os.times()
        return sum(ticks) / _TICKS, (ticks[3] + ticks[4]) / _TICKS, own.user + own.system

    try:
        total0, idle0, own0 = snapshot()
        time.sleep(interval_s)
        total1, idle1, own1 = snapshot()
    except OSError:
        return 0.0
    elapsed = max(1e-9, total1 - total0)
    return max(0.0, (elapsed - (idle1 - idle0) - (own1 - own0)) / elapsed)


def _wait_for_idle(timeout_s: float, threshold: float = 0.15) -> float:
    """Wait until the CPUs are mostly idle or `timeout_s` passes; return the last load seen."""
    deadline = time.monotonic() + timeout_s
    busy = _cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = _cpu_busy()
    return busy


def _measure(args: argparse.Namespace) -> dict:
    """Run inside the worker process: `args.repeats` pairs of untimed + timed fwd+bwd."""
    torch.set_num_threads(args.threads)
    shape = (args.batch, args.length, args.dim)
    gen = torch.Generator().manual_seed(0)
    i = torch.randn(shape, generator=gen).requires_grad_()
    f = torch.rand(shape, generator=gen).requires_grad_()
    do = torch.randn(shape, generator=gen)
    fn = FORMS[args.worker]
    # Start autograd's engine and the thread pools first: they take tens of MB of RSS
    # once per process, which would otherwise dwarf small problems.
    tiny = (1, 4, args.dim)
    fn(torch.zeros(tiny, requires_grad=True), torch.zeros(tiny))[0].backward(torch.zeros(tiny))
    rss_before_kb = peak_rss_bytes() // 1024
    runs, loads = [], []
    for run in range(2 * args.repeats):
        if run % 2 == 0:
            loads.append(round(_wait_for_idle(args.idle_wait), 2))
        i.grad = f.grad = None
        t0 = time.perf_counter()
        o, _ = fn(i, f)
        t1 = time.perf_counter()
        o.backward(do)
        t2 = time.perf_counter()
        del o
        if run == 0:  # see the module docstring: later runs add the allocator's retention
            peak_kb = peak_rss_bytes() // 1024 - rss_before_kb
        if run % 2:  # timed runs follow an untimed one, back to back as in a training loop
            runs.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3))
    growth_kb = peak_rss_bytes() // 1024 - rss_before_kb
    best_fwd, best_bwd = min(runs, key=sum)
    return {
        "form": args.worker,
        "repeats": args.repeats,
        "fwd_ms": best_fwd,
        "bwd_ms": best_bwd,
        "fwd_bwd_ms": best_fwd + best_bwd,
        "fwd_bwd_median_ms": statistics.median(sum(r) for r in runs),
        "cpu_busy_before_runs": loads,
        "peak_mem_mb": peak_kb / 1024,
        "rss_growth_all_runs_mb": growth_kb / 1024,
    }


def _run_worker(form: str, args: argparse.Namespace, repeats: int) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", form, "--repeats", str(repeats),
        "--batch", str(args.batch), "--length", str(args.length), "--dim", str(args.dim),
        "--threads", str(args.threads), "--idle-wait", str(args.idle_wait),
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B=2, T=256, D=64 smoke run")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--naive-repeats", type=int, default=3, help="the naive loop is slow at T=2048")
    parser.add_argument("--chunk-repeats", type=int, default=10, help="runs of the chunk and fused forms")
    parser.add_argument("--idle-wait", type=float, default=10.0, help="max seconds to wait for idle CPUs, per run")
    parser.add_argument("--worker", choices=sorted(FORMS), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.length, args.dim = 2, 256, 64
    return args


def main() -> None:
    args = _parse_args()
    if args.worker:
        print(json.dumps(_measure(args)))
        return

    if not native_available(torch.zeros(1, 1, 1)):
        raise SystemExit("the fused form's C kernel did not build here (see the log above); "
                         "install a C compiler (cc/gcc/clang) or set CC")  # fmt: skip
    naive = _run_worker("naive", args, args.naive_repeats)
    fast = {form: _run_worker(form, args, args.chunk_repeats) for form in ("chunk", "fused")}

    print(f"HGRN fwd+bwd  B={args.batch} T={args.length} D={args.dim} float32, {args.threads} threads, "
          f"torch {torch.__version__}; times of the best run, median alongside")  # fmt: skip
    print(f"{'form':<6} {'fwd ms':>8} {'bwd ms':>8} {'fwd+bwd ms':>11} {'median ms':>10} {'peak MB':>8} "
          f"{'runs':>5} {'vs naive':>9} {'mem ratio':>10}")  # fmt: skip
    result = {
        "config": {
            "batch": args.batch, "length": args.length, "dim": args.dim, "dtype": "float32",
            "threads": args.threads, "torch": torch.__version__, "quick": args.quick,
        },
        "naive": naive,
    }  # fmt: skip
    for r in (naive, *fast.values()):
        speedup = naive["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        mem_ratio = r["peak_mem_mb"] / naive["peak_mem_mb"] if naive["peak_mem_mb"] > 0 else float("nan")
        print(
            f"{r['form']:<6} {r['fwd_ms']:>8.1f} {r['bwd_ms']:>8.1f} {r['fwd_bwd_ms']:>11.1f} "
            f"{r['fwd_bwd_median_ms']:>10.1f} {r['peak_mem_mb']:>8.1f} {r['repeats']:>5} "
            f"{speedup:>8.1f}x {mem_ratio:>10.2f}"
        )
        if r is not naive:
            result[r["form"]] = {
                **r,
                "speedup": speedup,
                "median_speedup": naive["fwd_bwd_median_ms"] / r["fwd_bwd_median_ms"],
                "peak_mem_ratio": mem_ratio,
            }
    print("goals: >= 10x the naive loop's fwd+bwd time, peak memory <= 2x the naive form's")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
