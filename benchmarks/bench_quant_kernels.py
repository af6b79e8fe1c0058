"""Weight-only quantized matmul kernels at SmolLM2-135M's shapes: ours vs PyTorch's own.

Per shape (out x in: q/o projections 576x576, k/v 192x576, gate/up 1536x576, down
576x1536, the tied LM head 49152x576) and batch M (1 = a decode step, 16 = a short
prompt), microseconds per call and the weight bytes read per second, for:
fp32 `F.linear`; bf16 `F.linear`; `torch._weight_int8pack_mm` (int8 per channel);
`torch._weight_int4pack_mm_for_cpu` (int4, group 32); and our C kernels
(`ops/quant_native.py`) for q8_0 / q4_0 / q4_1 (group 32) and bf16 weights.

Decode reads every weight once per token from memory, not from cache, so each variant
cycles through enough copies of its weight (>= 96 MB in all) that a call never finds its
matrix in the last-level cache; `--hot` times one copy instead (cache-resident, the
number a micro-benchmark usually shows). The machine is shared: variants alternate call
by call within each round, and the figures are medians over rounds.

    .venv/bin/python benchmarks/bench_quant_kernels.py            # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from simplified_slm.ops import quant, quant_native

SHAPES = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
          "down 576x1536": (576, 1536), "head 49152x576": (49152, 576)}
RESULTS = Path(__file__).resolve().parent / "results" / "bench_quant_kernels.json"
STREAM_BYTES = 96 << 20  # more than any last-level cache here


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _int8pack(w: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], Callable]:
    scales = w.abs().amax(1) / 127
    codes = torch.round(w / scales[:, None]).to(torch.int8)
    return (codes, scales), lambda x, c, s: torch._weight_int8pack_mm(x, c, s)


def _int4pack(w: torch.Tensor, group: int = 32) -> tuple[tuple[torch.Tensor, ...], Callable]:
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group)
    low, step = g.amin(-1), (g.amax(-1) - g.amin(-1)) / 15
    q = ((g - low[..., None]) / step[..., None]).round().clamp(0, 15).to(torch.int32).reshape(rows, cols)
    scale_zero = torch.stack([step, low + 8 * step], -1).transpose(0, 1).contiguous()
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    return (packed, scale_zero), lambda x, p, sz: torch._weight_int4pack_mm_for_cpu(x, p, group, sz)


def _ours(w: torch.Tensor, scheme: str) -> tuple[tuple[torch.Tensor, ...], Callable]:
    qw = quant.quantize(w, scheme, 32)
    return (qw.codes, qw.scales, qw.mins), lambda x, c, s, m: quant_native.quantized_matmul(x, c, s, m, scheme, 32)


def variants(w: torch.Tensor) -> dict[str, tuple[tuple[torch.Tensor, ...], Callable]]:
    out = {"fp32 F.linear": ((w,), lambda x, a: F.linear(x, a)),
           "bf16 F.linear": ((w.bfloat16(),), lambda x, a: F.linear(x.bfloat16(), a).float()),
           "torch int8pack": _int8pack(w),
           "torch int4pack g32": _int4pack(w)}
    if quant_native.native_available(w):
        for scheme in ("q8_0", "q4_0", "q4_1", "bf16"):
            out[f"ours {scheme}"] = _ours(w, scheme)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--hot", action="store_true", help="time one cache-resident copy instead of streaming")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    rows = []
    for shape_name, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.05
        built = variants(w)
        copies = {}
        for name, (tensors, fn) in built.items():
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            count = 1 if args.hot else max(1, min(256, -(-STREAM_BYTES // nbytes)))
            copies[name] = ([tuple(t.clone() for t in tensors) for _ in range(count)], fn, nbytes)
        for m in args.batches:
            x = torch.randn(m, k)
            calls = max(3, min(200, int(2e8 // (n * k))))  # ~0.2 G weights per timing
            times: dict[str, list[float]] = {name: [] for name in copies}
            with torch.no_grad():
                for name, (sets, fn, _) in copies.items():  # warm-up
                    fn(x, *sets[0])
                for _ in range(args.rounds):
                    for name, (sets, fn, _) in copies.items():
                        start = time.perf_counter()
                        for i in range(calls):
                            fn(x, *sets[i % len(sets)])
                        times[name].append((time.perf_counter() - start) / calls)
            base = statistics.median(times["fp32 F.linear"])
            for name, ts in times.items():
                us = statistics.median(ts) * 1e6
                nbytes = copies[name][2]
                rows.append({"shape": shape_name, "M": m, "variant": name, "us": us, "weight_bytes": nbytes,
                             "GB_s": nbytes / us / 1e3, "speedup_vs_fp32": base * 1e6 / us})
    load_after = os.getloadavg()

    mode = "cache-resident (--hot)" if args.hot else "streamed (each call reads a weight copy not in cache)"
    print(f"\nweight-only matmul, {args.threads} threads, {mode}, medians of {args.rounds} interleaved rounds; "
          f"load avg {load_before[0]:.2f} -> {load_after[0]:.2f} (shared machine)")
    print(f"{'shape (out x in)':<18}{'M':>3}  {'variant':<20}{'us':>10}{'GB/s':>8}{'x fp32':>8}")
    for r in rows:
        print(f"{r['shape']:<18}{r['M']:>3}  {r['variant']:<20}{r['us']:>10.1f}{r['GB_s']:>8.1f}{r['speedup_vs_fp32']:>8.2f}")
    result = {"machine": {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
                          "load_avg_before": load_before, "load_avg_after": load_after},
              "mode": mode, "rounds": args.rounds, "results": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
