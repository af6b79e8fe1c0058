"""Load test of `slm serve`: 1, 4, 8, 16 concurrent streaming clients on loopback.

A small untrained GPT (byte vocabulary, so no end-of-text token cuts replies short) is
saved to a temporary folder and served by a real `slm serve` process. Each client sends
`--requests` streaming chat-less completions one after the other (each `--max-tokens`
long, seeded sampling); a level stops issuing requests after `--level-seconds`. Reported
per level: requests/s, aggregate tokens/s, p50/p95 time to first token and latency,
failed requests, and the server's resident memory (VmRSS) before and after. The whole
sweep runs `--repeats` times so RSS growth across repeats shows up.

The clients are threads of this process (httpx, SSE parsed with json); on a 2-core
machine they compete with the server for CPU, so absolute numbers are pessimistic. The
server's CPU time per generated token is reported too: unlike tokens/s it does not
depend on what else the machine is running, and it shows what batching saves.

    python benchmarks/bench_serve.py             # 3 repeats of 1/4/8/16 clients
    python benchmarks/bench_serve.py --quick     # one short repeat
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from simplified_slm.models.registry import build_model
from simplified_slm.tokenizers import ByteTokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"
MODEL = {"family": "gpt", "vocab_size": 256, "n_layers": 6, "d_model": 256, "n_heads": 8, "context_length": 512}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_request(http: httpx.Client, max_tokens: int, seed: int) -> dict:
    """One streamed completion; SSE lines are parsed with json only (the `openai` client's
    per-chunk models cost the 2-core machine more CPU than the server's work per token)."""
    start = time.perf_counter()
    first, tokens = None, 0
    body = {"model": "bench", "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0.8,
            "seed": seed, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:200]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "latency": end - start, "tokens": tokens}


def run_level(url: str, clients: int, requests: int, max_tokens: int, seconds: float, pid: int) -> dict:
    http = httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients))
    stop_at = time.perf_counter() + seconds
    results, failures, lock = [], [], threading.Lock()

    def worker(index: int) -> None:
        for r in range(requests):
            if time.perf_counter() > stop_at:
                return
            try:
                outcome = one_request(http, max_tokens, seed=index * 1000 + r)
                with lock:
                    results.append(outcome)
            except Exception as err:  # counted and reported, never hidden
                with lock:
                    failures.append(repr(err))

    rss_before, cpu_before = rss_mb(pid), cpu_seconds(pid)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - start
    http.close()
    tokens = sum(r["tokens"] for r in results)
    server_cpu = cpu_seconds(pid) - cpu_before
    return {"clients": clients, "requests": len(results), "failed": len(failures), "failures": failures[:3],
            "wall_s": round(wall, 3), "requests_per_s": round(len(results) / wall, 3),
            "tokens_per_s": round(tokens / wall, 1),
            "server_cpu_ms_per_token": round(1000 * server_cpu / max(tokens, 1), 3),
            "ttft_p50_ms": round(1000 * percentile([r["ttft"] for r in results], 0.5), 1),
            "ttft_p95_ms": round(1000 * percentile([r["ttft"] for r in results], 0.95), 1),
            "latency_p50_ms": round(1000 * percentile([r["latency"] for r in results], 0.5), 1),
            "latency_p95_ms": round(1000 * percentile([r["latency"] for r in results], 0.95), 1),
            "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_mb(pid), 1)}


def start_server(model_dir: Path, max_batch: int, threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "simplified_slm.cli", "serve", "--model_path", str(model_dir),
                             "--port", str(port), "--max-batch", str(max_batch), "--device", "cpu"],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=4, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--level-seconds", type=float, default=60.0, help="stop issuing requests after this")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--quick", action="store_true", help="one repeat, 2 requests per client")
    parser.add_argument("--json", default=str(RESULTS))
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.requests = 1, 2
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = build_model(MODEL)
        model.save_pretrained(Path(tmp) / "model", tokenizer=ByteTokenizer())
        proc, url = start_server(Path(tmp) / "model", max(levels), args.threads, Path(tmp) / "server.log")
        try:
            with httpx.Client(base_url=url, timeout=120) as http:
                one_request(http, 8, 0)  # warm-up
            rounds = []
            for repeat in range(args.repeats):
                rows = [run_level(url, c, args.requests, args.max_tokens, args.level_seconds, proc.pid) for c in levels]
                rounds.append(rows)
                print(f"\nrepeat {repeat + 1}/{args.repeats}")
                print(f"{'clients':>7} {'req/s':>7} {'tok/s':>8} {'ttft p50':>9} {'ttft p95':>9} {'lat p50':>8} "
                      f"{'lat p95':>8} {'cpu ms/tok':>10} {'failed':>6} {'rss MB before/after':>20}")
                for r in rows:
                    print(f"{r['clients']:>7} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>8.1f} "
                          f"{r['ttft_p50_ms']:>7.0f}ms {r['ttft_p95_ms']:>7.0f}ms {r['latency_p50_ms']:>6.0f}ms "
                          f"{r['latency_p95_ms']:>6.0f}ms {r['server_cpu_ms_per_token']:>10.2f} {r['failed']:>6} "
                          f"{r['rss_before_mb']:>9.1f}/{r['rss_after_mb']:.1f}")
        finally:
            proc.terminate()
            exit_code = proc.wait(60)
    speedups = [{r["clients"]: round(r["tokens_per_s"] / rows[0]["tokens_per_s"], 2) for r in rows} for rows in rounds]
    rss_end = [rows[-1]["rss_after_mb"] for rows in rounds]
    summary = {"tokens_per_s_vs_1_client": speedups,
               "median_speedup_8_clients": statistics.median(s.get(8, float("nan")) for s in speedups),
               "failed_requests": sum(r["failed"] for rows in rounds for r in rows),
               "rss_after_each_repeat_mb": rss_end, "server_exit_code": exit_code}
    print(f"\ntokens/s relative to 1 client: {speedups}")
    print(f"failed requests: {summary['failed_requests']}; server RSS after each repeat (MB): {rss_end}; "
          f"server exit code after SIGTERM: {exit_code}")
    report = {"benchmark": "serve", "model": MODEL, "threads": args.threads, "max_tokens": args.max_tokens,
              "requests_per_client": args.requests, "torch": torch.__version__, "cpus": os.cpu_count(),
              "rounds": rounds, "summary": summary}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
