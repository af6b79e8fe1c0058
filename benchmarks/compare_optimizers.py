"""Muon vs AdamW on the bundled data: validation-loss curves and steps to the baseline.

Both runs go through the real Trainer with the same model (llama tiny-ish, byte tokens),
data, seed, batches and schedule; only `train.optimizer` differs (Muon: torch.optim.Muon at
`muon_lr` for the hidden matrices, AdamW for embeddings, head and gains). The headline is
the first evaluated step at which Muon's validation loss reaches AdamW's final one.

    python benchmarks/compare_optimizers.py            # ~4-8 minutes on 2 cores
    python benchmarks/compare_optimizers.py --steps 60 # smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import torch

from simplified_slm.training import ExperimentConfig, Trainer

RESULTS = Path(__file__).parent / "results" / "compare_optimizers.json"


def experiment(out: Path, optimizer: str, steps: int, eval_every: int) -> dict:
    return {
        "seed": 1234, "output_dir": str(out),
        "model": {"family": "llama", "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "intermediate_size": 384, "max_position_embeddings": 128},
        "tokenizer": {"kind": "byte"},
        "data": {"dataset": "tinystories", "max_train_bytes": 4_000_000},
        "train": {"max_steps": steps, "batch_size": 16, "block_size": 128, "optimizer": optimizer,
                  "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 30, "muon_lr": 0.02, "weight_decay": 0.1,
                  "eval_every": eval_every, "eval_batches": 20, "sample_every": 10**6, "log_every": 10,
                  "checkpoint_every": 10**6, "progress": False, "loggers": ["csv"]},
    }


def val_curve(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as fh:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(fh) if r["name"] == "val/loss"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    curves, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for optimizer in ("adamw", "muon"):
            cfg = ExperimentConfig.from_dict(experiment(Path(tmp) / optimizer, optimizer, args.steps, args.eval_every))
            started = time.perf_counter()
            Trainer(cfg, say=lambda m: None).run()
            print(f"{optimizer}: {time.perf_counter() - started:.0f}s", flush=True)
            seconds[optimizer] = time.perf_counter() - started
            curves[optimizer] = val_curve(Path(tmp) / optimizer)
    target = curves["adamw"][args.steps]
    reached = next((s for s, v in sorted(curves["muon"].items()) if v <= target), None)
    print(f"{'step':>6} {'adamw val':>10} {'muon val':>10}")
    for step in sorted(curves["adamw"]):
        print(f"{step:>6} {curves['adamw'][step]:>10.4f} {curves['muon'].get(step, float('nan')):>10.4f}")
    print(f"AdamW final val loss {target:.4f} at step {args.steps}; Muon reaches it at step {reached} "
          f"(wall: adamw {seconds['adamw']:.0f}s, muon {seconds['muon']:.0f}s)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"steps": args.steps, "curves": curves, "adamw_final": target,
                                   "muon_steps_to_adamw_final": reached, "wall_s": seconds}, indent=1))


if __name__ == "__main__":
    main()
