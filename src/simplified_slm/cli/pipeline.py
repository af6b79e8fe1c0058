"""`slm run`: the end-to-end job (train, evaluate, report) writing everything into one run folder."""

from __future__ import annotations

import time

from simplified_slm.data import load_prepared
from simplified_slm.evaluation.analysis import analyze_after_run
from simplified_slm.errors import SLMError
from simplified_slm.evaluation.evaluator import evaluate_model
from simplified_slm.models import load
from simplified_slm.training.config import ExperimentConfig
from simplified_slm.training.trainer import Trainer
from simplified_slm.utils.io import atomic_write_json


def run_pipeline(cfg: ExperimentConfig, resume: str | None = None, allow_data_change: bool = False) -> int:
    if cfg.data.format == "chat":
        raise SLMError("slm run evaluates token data; train chat data with slm train (its validation reports the "
                       "answer loss and, with train.eval_exact_match, exact match)")
    started = time.perf_counter()
    result = Trainer(cfg, resume=resume, allow_data_change=allow_data_change).run()
    if result.interrupted:
        return 130
    best = result.run_dir / "checkpoints" / "best"
    model_dir = best if best.exists() else result.checkpoint
    model, tokenizer, _ = load(model_dir, cfg.train.device if cfg.train.device != "auto" else "cpu")
    data = load_prepared(result.run_dir / "data")
    report = evaluate_model(model, tokenizer, data.val, block_size=cfg.train.block_size,
                            batch_size=cfg.train.batch_size, num_samples=3,
                            sample_tokens=cfg.train.sample_tokens, prompt=cfg.train.sample_prompt, seed=cfg.seed)
    report.update({"checkpoint": str(model_dir.resolve()), "train_steps": result.step,
                   "wall_time_s": round(time.perf_counter() - started, 1)})
    atomic_write_json(result.run_dir / "eval.json", report)
    m = report["metrics"]
    print(f"\n=== {cfg.run_name or result.run_dir.name}: {report['family']} model, "
          f"{report['num_parameters']:,} parameters, {result.step} steps, {report['wall_time_s']} s")
    interval = report["bpb_interval"]
    spread = f" (95% interval {interval['lower']:.4f}-{interval['upper']:.4f})" if interval else ""
    print(f"validation: {m['loss']:.4f} nats/token | bits per byte {m['bpb']:.4f}{spread} | ppl {m['ppl']:.2f} | "
          f"accuracy {m['accuracy']:.3f}  (whole validation split, {int(m['tokens']):,} tokens)")
    for i, sample in enumerate(report["samples"], 1):
        print(f"--- sample {i} ---\n{sample['text']}")
    print(f"\nreport: {result.run_dir / 'eval.json'}")
    analyze_after_run(result.run_dir, print)
    return 0
