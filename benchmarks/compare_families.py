"""Every model family at the same training budget on the same data: the README's family table.

Each family trains for `--budget` seconds (`train.time_budget`, so every schedule completes)
with `slm run` on the bundled TinyStories and is scored on the whole validation split in
bits per byte, the one unit that compares tokenizers. The recipes start from the speedrun
record's training settings (`configs/default.json`: 2048-token BPE, batch 8 x 256, AdamW,
bf16) and set the family, its size and its peak learning rate, said beside each. Runs go one after another in subprocesses (a family
never inherits another's threads or memory) and write `runs/compare_families/<name>`.

Decode speed is measured on the trained model: greedy, batch 1, with each family's cache,
`--decode_tokens` new tokens after the sample prompt, best of three.

    python benchmarks/compare_families.py                      # all families, 300 s each
    python benchmarks/compare_families.py --families gpt,llama --budget 60
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from simplified_slm.models import load  # noqa: E402
from simplified_slm.utils.io import atomic_write_json  # noqa: E402

# Each family's changes to the record's training settings (data, tokenizer, batch, schedule).
# Every recipe names its model and peak learning rate, so the table does not change when the
# record moves to another family: attention families take 2e-3, ternary and recurrent ones
# 3e-3 (their usual recipes, see docs/TRAINING_GUIDE.md); hnet_bit works on bytes by design
# (its router chunks raw bytes), so it gets the byte tokenizer.
_SMALL_ATTENTION = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                        num_key_value_heads=2, max_position_embeddings=256)
_ATTENTION_LR = {"lr": 2e-3, "min_lr": 2e-4}
_TERNARY_LR = {"lr": 3e-3, "min_lr": 3e-4}
RECIPES: dict[str, dict[str, Any]] = {
    "gpt": {"model": {"family": "gpt", "preset": "small"}, "train": _ATTENTION_LR},
    "llama": {"model": {"family": "llama", "preset": "small", "max_position_embeddings": 256}, "train": _ATTENTION_LR},
    "bitnet": {"model": {"family": "bitnet", **_SMALL_ATTENTION}, "train": _TERNARY_LR},
    "hgrn_bit": {"model": {"family": "hgrn_bit", "preset": "small"}, "train": _TERNARY_LR},
    "hnet_bit_1stage": {"model": {"family": "hnet_bit", "preset": "1stage"}, "tokenizer": {"kind": "byte"},
                        "train": _TERNARY_LR},
    "hnet_bit_2stage": {"model": {"family": "hnet_bit", "preset": "2stage"}, "tokenizer": {"kind": "byte"},
                        "train": _TERNARY_LR},
    "spiking": {"model": {"family": "spiking", "preset": "small"}, "train": _ATTENTION_LR},
}


def recipe_config(name: str, base: dict[str, Any], budget: float, out_dir: Path) -> dict[str, Any]:
    """The record's config with the family's changes, the budget and the run folder."""
    cfg = copy.deepcopy(base)
    changes = RECIPES[name]
    for section in ("model", "tokenizer"):  # a new model or tokenizer replaces the record's
        if section in changes:
            cfg[section] = dict(changes[section])
    cfg["train"] = {**cfg["train"], **changes.get("train", {})}
    cfg["train"]["time_budget"] = budget
    cfg["run_name"] = f"compare-{name}"
    cfg["output_dir"] = str(out_dir)
    return cfg


def decode_tokens_per_s(run_dir: Path, prompt: str, new_tokens: int) -> float:
    """Greedy cached decoding speed of the run's best checkpoint (best of three)."""
    best = run_dir / "checkpoints" / "best"
    model, tokenizer, _ = load(best if best.exists() else run_dir / "checkpoints" / "latest")
    ids = torch.tensor([tokenizer.encode_ids(prompt) or [0]])
    times = []
    for _ in range(3):
        started = time.perf_counter()
        model.generate(ids, new_tokens, greedy=True)
        times.append(time.perf_counter() - started)
    return new_tokens / min(times)


def run_family(name: str, base: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    run_dir = args.out / name
    cfg = recipe_config(name, base, args.budget, run_dir)
    cfg_path = args.out / f"{name}.json"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "simplified_slm.cli", "run", "--config", str(cfg_path),
                           "--output_dir", str(run_dir)], env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    if done.returncode != 0:
        return {"family": name, "error": f"slm run failed (exit {done.returncode}, its error is above)",
                "config": str(cfg_path)}
    wall = time.perf_counter() - started
    report = json.loads((run_dir / "eval.json").read_text())
    state = json.loads((run_dir / "checkpoints" / "latest" / "trainer_state.json").read_text())
    train = cfg["train"]
    tokens = state["step"] * train["batch_size"] * train["block_size"] * train.get("grad_accum_steps", 1)
    interval = report.get("bpb_interval") or {}
    return {
        "family": name, "parameters": report["num_parameters"], "tokenizer": cfg["tokenizer"]["kind"],
        "steps": state["step"], "tokens_seen": tokens, "train_seconds": round(state["train_seconds"], 1),
        "train_tokens_per_s": round(tokens / max(state["train_seconds"], 1e-9)),
        "val_bpb": round(report["metrics"]["bpb"], 4),
        "val_bpb_95": [round(interval.get("lower", float("nan")), 4), round(interval.get("upper", float("nan")), 4)],
        "decode_tokens_per_s": round(decode_tokens_per_s(run_dir, train["sample_prompt"], args.decode_tokens), 1),
        "wall_s": round(wall, 1), "config": str(cfg_path),
    }


def markdown(rows: list[dict[str, Any]], budget: float) -> str:
    lines = [f"| family ({budget:.0f} s of training) | parameters | tokenizer | steps | tokens seen | "
             "train tokens/s | val BPB (whole split, 95% interval) | decode tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r.get("val_bpb", float("inf"))):
        if "error" in r:
            lines.append(f"| {r['family']} | {r['error']} ({r['config']}) |  |  |  |  |  |  |")
            continue
        lo, hi = r["val_bpb_95"]
        lines.append(f"| {r['family']} | {r['parameters'] / 1e6:.2f}M | {r['tokenizer']} | {r['steps']} | "
                     f"{r['tokens_seen'] / 1e6:.2f}M | {r['train_tokens_per_s']:,} | **{r['val_bpb']:.4f}** "
                     f"({lo:.3f}-{hi:.3f}) | {r['decode_tokens_per_s']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(RECIPES), help="comma-separated, from: " + ", ".join(RECIPES))
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of training per family")
    parser.add_argument("--base", type=Path, default=REPO / "configs" / "default.json")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "compare_families")
    parser.add_argument("--decode_tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "compare_families.json")
    args = parser.parse_args()
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {sorted(RECIPES)}")
    base = json.loads(args.base.read_text())
    rows: list[dict[str, Any]] = []
    for name in names:  # the JSON is rewritten after each family: a long run is never lost
        rows.append(run_family(name, base, args))
        atomic_write_json(args.json, {"budget_s": args.budget, "base": str(args.base), "rows": rows,
                                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                                      "date": time.strftime("%Y-%m-%d")})
    print(markdown(rows, args.budget))
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
