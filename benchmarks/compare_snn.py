"""Transformer vs SNN (the edge framework's hybrid engine) on the bundled TinyStories, same budget each.

Both runs use `configs/spiking_tinystories.json` through the real `Trainer`; the only
difference is the model's `architecture` field ("transformer": the Llama-style GQA decoder
it names; "snn": the `spiking` family with the same vocab, width, depth, FFN width and tied
embeddings). Same BPE tokenizer, data, batch, block, optimizer and wall-clock budget.

To give each model a complete cosine schedule inside its budget, a few training steps of
the model are timed first (random tokens, the trainer's optimizer) and `max_steps` is set to
what fits the budget; `time_limit_s` still stops a run that the machine slows down. The
evaluation (the final one only) and data preparation are outside the budget.

Reported per model: parameters, steps and tokens trained, training tokens/s (median over
the trainer's 10-step windows, first one dropped), validation loss and bits per byte, and
for the SNN the firing rate of every layer (training batches, last log step).

    python benchmarks/compare_snn.py                  # 180 s per model, ~8 minutes in all
    python benchmarks/compare_snn.py --budget-s 20    # smoke run
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from simplified_slm.models.base import next_token_loss
from simplified_slm.models.registry import build_model
from simplified_slm.training import ExperimentConfig, Trainer
from simplified_slm.training.optim import build_optimizer

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "spiking_tinystories.json"
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "compare_snn.json"
ARCHITECTURES = ("transformer", "snn")


def experiment(architecture: str, run_dir: Path, budget_s: float, max_steps: int, eval_batches: int) -> dict:
    data = json.loads(CONFIG.read_text())
    data["model"]["architecture"] = architecture
    if architecture == "snn":  # the scan neuron: snn.Leaky's equations (tested equal), 2-3x faster
        data["model"]["lif_backend"] = "scan"
    data["output_dir"] = str(run_dir)
    data["run_name"] = f"compare-snn-{architecture}"
    never = 10**9  # only the final evaluation, sample and checkpoint
    data["train"].update(max_steps=max_steps, time_limit_s=budget_s, warmup_steps=min(100, max_steps // 10),
                         eval_every=never, eval_batches=eval_batches, sample_every=never, sample_tokens=60,
                         checkpoint_every=never, log_every=10, loggers=["csv"], progress=False, device="cpu")
    return data


def steps_per_second(cfg: ExperimentConfig, vocab_size: int, steps: int = 6) -> float:
    """Median speed of a few training steps (forward, loss, backward, optimizer) on random tokens."""
    torch.manual_seed(0)
    model = build_model(cfg.model_config(vocab_size))
    optimizer = build_optimizer(model, cfg.train)
    shape = (cfg.train.batch_size, cfg.train.block_size)
    times = []
    for _ in range(steps):
        x, y = torch.randint(0, vocab_size, shape), torch.randint(0, vocab_size, shape)
        start = time.perf_counter()
        next_token_loss(model(x).logits, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times[1:])


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    with open(run_dir / "metrics.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            out.setdefault(row["name"], []).append((int(row["step"]), float(row["value"])))
    return out


def run_one(architecture: str, out_dir: Path, budget_s: float, eval_batches: int, say) -> dict:
    run_dir = out_dir / architecture
    vocab = json.loads(CONFIG.read_text())["tokenizer"]["vocab_size"]
    probe = ExperimentConfig.from_dict(experiment(architecture, run_dir, budget_s, 1, eval_batches))
    speed = steps_per_second(probe, vocab)
    max_steps = max(20, int(budget_s * speed * 0.95))
    say(f"{architecture}: ~{speed:.2f} steps/s measured, planning {max_steps} steps in {budget_s:.0f} s")
    cfg = ExperimentConfig.from_dict(experiment(architecture, run_dir, budget_s, max_steps, eval_batches))
    started = time.perf_counter()
    result = Trainer(cfg, say=say).run()
    wall = time.perf_counter() - started
    metrics = read_metrics(run_dir)
    windows = [v for _, v in metrics["train/tokens_per_s"]][1:]
    rates = {name.removeprefix("snn/firing_rate/"): values[-1][1]
             for name, values in metrics.items() if name.startswith("snn/firing_rate/")}
    info = json.loads((run_dir / "run.json").read_text())
    samples = [json.loads(line)["text"] for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return {
        "architecture": architecture,
        "family": info["family"],
        "parameters": info["num_parameters"],
        "steps": result.step,
        "planned_steps": max_steps,
        "train_tokens": int(metrics["train/tokens"][-1][1]),
        "tokens_per_s": statistics.median(windows) if windows else metrics["train/tokens_per_s"][-1][1],
        "val_loss": result.val_metrics["loss"],
        "val_bpb": result.val_metrics["bpb"],
        "val_tokens": result.val_metrics["tokens"],
        "final_train_loss": result.losses[-1],
        "firing_rates": rates,
        "wall_s": wall,
        "sample": samples[-1] if samples else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=180.0, help="training seconds per model")
    parser.add_argument("--eval-batches", type=int, default=40, help="validation batches of 16 x 128 tokens")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="run folders go to OUT_DIR/<architecture> (default runs/compare_snn/<date-time>)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    say = lambda s: print(s, flush=True)  # noqa: E731

    out_dir = args.out_dir or ROOT / "runs" / "compare_snn" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    load_before = os.getloadavg()
    results = {arch: run_one(arch, out_dir, args.budget_s, args.eval_batches, say) for arch in ARCHITECTURES}
    load_after = os.getloadavg()

    layers = sorted((k for k in results["snn"]["firing_rates"] if k.startswith("layer_")),
                    key=lambda k: int(k.split("_")[1]))
    say("")
    say("| model | params | steps | train tokens | tokens/s | val loss | val BPB | firing rate |")
    say("|---|---:|---:|---:|---:|---:|---:|---|")
    for arch, r in results.items():
        fr = r["firing_rates"]
        rate = (f"{fr['all']:.3f} (" + ", ".join(f"{fr[k]:.3f}" for k in layers) + ")") if fr else "-"
        say(f"| {arch} ({r['family']}) | {r['parameters']:,} | {r['steps']} | {r['train_tokens']:,} | "
            f"{r['tokens_per_s']:,.0f} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | {rate} |")
    say(f"firing rate: mean over all LIF layers (per layer {', '.join(layers)}); load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    for arch, r in results.items():
        say(f"sample ({arch}): {r['sample']!r}")

    run_dirs = out_dir.relative_to(ROOT) if out_dir.is_relative_to(ROOT) else out_dir
    out = {
        "config": {"base_config": str(CONFIG.relative_to(ROOT)), "run_dirs": str(run_dirs),
                   "budget_s_per_model": args.budget_s,
                   "eval_batches": args.eval_batches, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                   "torch": torch.__version__, "python": platform.python_version(),
                   "load_average_before_after": [load_before[0], load_after[0]],
                   "date": datetime.datetime.now().isoformat(timespec="seconds")},
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    say(f"wrote {args.json}")


if __name__ == "__main__":
    main()
