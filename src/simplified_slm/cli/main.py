"""The `slm` command: prepare, train, eval, harness, generate, run, tokenizer.

Every user-fixable problem surfaces as `error: <one line>` with exit code 2; tracebacks
are kept for real bugs only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from simplified_slm.errors import SLMError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment config (.json or .yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--output_dir", "--output-dir", help="run folder (overrides the config's output_dir)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (overrides train.device)")


def _experiment(args: argparse.Namespace):
    from simplified_slm.training.config import load_experiment_config

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    return load_experiment_config(args.config, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from simplified_slm.training.trainer import Trainer

    cfg = _experiment(args)
    result = Trainer(cfg, resume=args.resume, until=args.until, allow_data_change=args.allow_data_change).run()
    if result.val_metrics and result.is_main:
        print(json.dumps({"step": result.step, **{f"val_{k}": v for k, v in result.val_metrics.items()}}))
    return EXIT_INTERRUPTED if result.interrupted else 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from simplified_slm.data import prepare_dataset
    from simplified_slm.tokenizers import build_tokenizer
    from simplified_slm.training.trainer import training_texts

    cfg = _experiment(args)
    out = Path(args.out or Path(cfg.output_dir) / "data")
    tokenizer = build_tokenizer(cfg.tokenizer, training_texts(cfg))
    tokenizer.save(out / "tokenizer")
    data = prepare_dataset(cfg.data, tokenizer, out)
    print(json.dumps({"out": str(out), "train_tokens": int(len(data.train)), "val_tokens": int(len(data.val))}))
    return 0


def _load_model(path: str | None, device: str, untrained_fallback: bool = False):
    """Model + tokenizer from a checkpoint/model folder (or the newest run's best checkpoint).

    With `untrained_fallback` (seed 000's `generate.py --prompt ...` without a model) and no
    trained model anywhere, a freshly initialised byte-level SimplifiedSLM small model is
    used, with a warning, so the command runs on a fresh clone.
    """
    from simplified_slm.models.base import CausalLM
    from simplified_slm.tokenizers import load_tokenizer
    from simplified_slm.training.trainer import resolve_device

    if path is None:
        candidates = sorted(Path("runs").glob("*/checkpoints/best"), key=lambda p: p.stat().st_mtime)
        if candidates:
            path = str(candidates[-1])
            print(f"using {path}", file=sys.stderr)
        elif untrained_fallback:
            from simplified_slm.models import SimplifiedSLMConfig, SimplifiedSLMForCausalLM
            from simplified_slm.tokenizers import ByteTokenizer

            print("warning: no trained model under runs/ and no --model_path; sampling from an untrained "
                  "SimplifiedSLMConfig.small() model (train one with `make demo`)", file=sys.stderr)
            model = SimplifiedSLMForCausalLM(SimplifiedSLMConfig.small()).to(resolve_device(device)).eval()
            return model, ByteTokenizer()
        else:
            raise SLMError("no trained model found under runs/; train one (make demo) or pass --model_path")
    if Path(path).is_file():  # a file inside a model folder, e.g. .../model.safetensors
        path = str(Path(path).parent)
    from simplified_slm.export.ternary import PACKED_FILE, load_packed
    from simplified_slm.training.checkpoint import MANIFEST, verify_checkpoint

    if (Path(path) / MANIFEST).is_file():  # a training checkpoint: refuse corrupted files
        verify_checkpoint(path)

    if (Path(path) / PACKED_FILE).is_file():
        model = load_packed(path).to(resolve_device(device))
    else:
        model = CausalLM.from_pretrained(path).to(resolve_device(device))
    model.eval()
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise SLMError(f"tokenizer in {path} has {tokenizer.vocab_size} ids but the model only "
                       f"{model.config.vocab_size}; they do not belong together")
    for param in model.parameters():  # inference only; no process-wide autograd switch
        param.requires_grad_(False)
    return model, tokenizer


def cmd_eval(args: argparse.Namespace) -> int:
    from simplified_slm.data import DATASET_NAMES, DataConfig, load_prepared, prepare_dataset
    from simplified_slm.evaluation.evaluator import evaluate_model

    model, tokenizer = _load_model(args.checkpoint, args.device)
    block = min(args.block_size or model.max_context or 256, model.max_context or 10**9)
    if args.dataset:
        # a named dataset's validation split (or held-out tail) by default; a file or folder whole
        split = args.split or ("val" if args.dataset in DATASET_NAMES else "all")
        # "all": the whole source becomes the val split; the unused train split is capped at
        # one character (at most 4 UTF-8 bytes) so the text is tokenized once
        cfg = (DataConfig(dataset=args.dataset) if split == "val" else
               DataConfig(dataset=None, train_file=args.dataset, val_file=args.dataset, max_train_bytes=4))
        with tempfile.TemporaryDirectory() as tmp:
            data = prepare_dataset(cfg, tokenizer, tmp)
            tokens = data.val.copy()
    else:
        if args.split == "all":
            raise SLMError("--split all needs --dataset FILE; without it the run's validation split is scored")
        run_data = Path(args.checkpoint).resolve().parent.parent / "data"
        if not (run_data / "meta.json").is_file():
            raise SLMError(f"no prepared data next to {args.checkpoint}; pass --dataset NAME_OR_PATH")
        data, split = load_prepared(run_data), "val"
        tokens = data.val
    report = evaluate_model(model, tokenizer, tokens, block_size=block, batch_size=args.batch_size,
                            max_batches=args.max_batches, num_samples=args.samples,
                            sample_tokens=args.sample_tokens, seed=args.seed)
    report["checkpoint"] = str(args.checkpoint)
    report["dataset"] = args.dataset or "run validation split"
    report["data"] = {"split": split, "span": data.meta["val_from"], **data.meta["splits"]["val"]}
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    m, d = report["metrics"], report["data"]
    print(f"scored {int(m['tokens'])} of {d['tokens']} tokens ({d['bytes']} bytes, {d['documents']} documents) "
          f"of {d['span']}")
    print(f"val loss {m['loss']:.4f} nats/token | ppl {m['ppl']:.2f} | bpb {m['bpb']:.4f} | "
          f"accuracy {m['accuracy']:.3f} | utf8 validity {m.get('utf8_validity', 1.0):.3f}")
    for sample in report["samples"]:
        print("---\n" + sample["text"])
    return 0


def cmd_harness(args: argparse.Namespace) -> int:
    from simplified_slm.evaluation.harness import evaluate, harness_model

    lm = harness_model(args.model_path, batch_size=args.batch_size, device=args.device, max_length=args.max_length)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = evaluate(lm, tasks, include_path=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot,
                       bootstrap_iters=args.bootstrap_iters, output_path=args.output_path)
    for task, metrics in results["results"].items():
        values = ", ".join(f"{name.split(',')[0]} {value:.4f}" for name, value in metrics.items()
                           if isinstance(value, float) and "stderr" not in name)
        print(f"{task}: {values}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from simplified_slm.cli.generate_cmd import run_generate

    model, tokenizer = _load_model(args.model_path, args.device, untrained_fallback=True)
    return run_generate(model, tokenizer, args)


def cmd_run(args: argparse.Namespace) -> int:
    from simplified_slm.cli.pipeline import run_pipeline

    return run_pipeline(_experiment(args), resume=args.resume, allow_data_change=args.allow_data_change)


def cmd_export(args: argparse.Namespace) -> int:
    from simplified_slm.export.ternary import save_packed

    model, tokenizer = _load_model(args.checkpoint, "cpu")
    if args.format == "hf":
        from simplified_slm.export.hf import export_hf

        export_hf(model, args.out, tokenizer)
        print(json.dumps({"out": args.out, "format": "transformers"}))
    elif args.format == "ternary":
        info = save_packed(model, args.out, tokenizer)
        ratio = info["linear_weights_fp16_bytes"] / info["linear_weights_packed_bytes"]
        print(json.dumps({"out": args.out, **info, "linear_weights_vs_fp16": round(ratio, 2)}))
    elif args.format == "onnx":
        from simplified_slm.export.onnx import export_onnx

        info = export_onnx(model, args.out, tokenizer)
        if info["max_abs_diff"] > 1e-4:
            print(f"warning: onnxruntime logits differ from PyTorch's by up to {info['max_abs_diff']:.2e}; "
                  "in ternary models a value on an int8 rounding boundary can round the other way "
                  "(docs/EXPORT.md), in float models this is a bug", file=sys.stderr)
        print(json.dumps({"out": args.out, "format": "onnx", **info}))
    elif args.format == "coreml":
        from simplified_slm.export.coreml import export_coreml

        print(json.dumps({"out": args.out, "format": "coreml", **export_coreml(model, args.out, tokenizer)}))
    else:
        model.save_pretrained(args.out, tokenizer=tokenizer)
        print(json.dumps({"out": args.out}))
    return 0


def cmd_boundaries(args: argparse.Namespace) -> int:
    from simplified_slm.models.hnet_bit import boundary_report

    model, tokenizer = _load_model(args.checkpoint, args.device)
    if args.text is not None:
        text = args.text
    else:
        from simplified_slm.data import DataConfig, validation_documents

        docs, _ = validation_documents(DataConfig(dataset=args.dataset))
        text = "".join(d.text for d in docs)[:args.max_chars]
    report = boundary_report(model, tokenizer, text)
    print(report.marked)
    print(f"\n{report.summary()}", file=sys.stderr)
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from simplified_slm.data import read_documents
    from simplified_slm.tokenizers import TokenizerConfig, build_tokenizer

    cfg = TokenizerConfig(kind=args.kind, vocab_size=args.vocab_size)
    tokenizer = build_tokenizer(cfg, lambda: (d.text for d in read_documents(args.data)))
    tokenizer.save(args.out)
    print(json.dumps({"out": args.out, **tokenizer.spec()}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slm", description="Train, evaluate and run small language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from an experiment config")
    _add_config_args(p)
    p.add_argument("--resume", help="'auto' (newest intact checkpoint of the run) or a checkpoint folder")
    p.add_argument("--allow-data-change", "--allow_data_change", action="store_true",
                   help="resume even though the training data changed since the checkpoint")
    p.add_argument("--until", type=int, help="pause at this step with a checkpoint (the schedule still spans "
                   "train.max_steps); continue later with --resume auto")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="end-to-end: prepare, train, evaluate, write the report")
    _add_config_args(p)
    p.add_argument("--resume", help="'auto' or a checkpoint folder")
    p.add_argument("--allow-data-change", "--allow_data_change", action="store_true",
                   help="resume even though the training data changed since the checkpoint")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("prepare", help="tokenize a dataset into token shards")
    _add_config_args(p)
    p.add_argument("--out", help="output folder (default <output_dir>/data)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("eval", help="evaluate a checkpoint: loss, perplexity, bits per byte, samples")
    p.add_argument("--checkpoint", required=True, help="checkpoint or model folder")
    p.add_argument("--dataset", help="built-in name or file/folder (default: the run's validation split)")
    p.add_argument("--split", choices=["all", "val"],
                   help="with --dataset: all = the whole source (default for a file or folder), val = its "
                        "validation split or held-out last 5%% (default for a dataset name, e.g. tinystories)")
    p.add_argument("--block_size", type=int)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_batches", type=int)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--sample_tokens", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("harness", help="standard benchmarks through lm-evaluation-harness (docs/BENCHMARKS.md)")
    p.add_argument("--model_path", "--model-path", required=True, help="checkpoint or model folder")
    p.add_argument("--tasks", required=True,
                   help="comma-separated lm-eval tasks, e.g. tinystories_cloze,tinystories_ppl (shipped) or hellaswag")
    p.add_argument("--include_path", help="extra folder of lm-eval task YAMLs")
    p.add_argument("--limit", type=float, help="at most N documents per task (a fraction if < 1)")
    p.add_argument("--num_fewshot", type=int)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, help="context for scoring (default: the model's, else 2048)")
    p.add_argument("--bootstrap_iters", type=int, default=1000, help="resamples for perplexity standard errors")
    p.add_argument("--output_path", help="write lm-eval's full result JSON here")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_harness)

    p = sub.add_parser("generate", help="generate text from a trained model")
    add_generate_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a model in another format")
    p.add_argument("--checkpoint", required=True, help="checkpoint or model folder")
    p.add_argument("--format", required=True, choices=["safetensors", "ternary", "hf", "onnx", "coreml"],
                   help="safetensors: plain model folder; ternary: 2-bit packed BitLinear weights; "
                        "hf: a transformers folder (gpt -> GPT2LMHeadModel, llama -> LlamaForCausalLM); "
                        "onnx: model.onnx, input_ids -> logits, checked in onnxruntime (gpt, llama, bitnet, "
                        "hgrn_bit); coreml: model.mlpackage for macOS/iOS (gpt, llama, bitnet); see docs/EXPORT.md")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("boundaries", help="show an hnet_bit model's learned chunk boundaries ('|') on text")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--text", help="text to chunk (default: the start of the dataset's validation split)")
    p.add_argument("--dataset", default="tinystories")
    p.add_argument("--max_chars", type=int, default=600)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_boundaries)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a tokenizer on a corpus and save it")
    t.add_argument("--kind", default="bpe", choices=["bpe", "char", "byte"])
    t.add_argument("--vocab-size", "--vocab_size", dest="vocab_size", type=int)
    t.add_argument("--data", default="tinystories", help="built-in dataset name or file/folder")
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_tokenizer)
    return parser


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", "--model-path", help="checkpoint or model folder (default: newest run's best)")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max_tokens", "--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", "--top-k", type=int)
    p.add_argument("--top_p", "--top-p", type=float)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--seed", type=int)
    p.add_argument("--compile", action="store_true",
                   help="run the one-token decode steps through torch.compile: faster per token "
                        "after a one-off compile of several seconds; pays off for long outputs")
    p.add_argument("--interactive", action="store_true")
    p.add_argument("--prompt_file", "--prompt-file")
    p.add_argument("--output_file", "--output-file")
    p.add_argument("--device", default="auto")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
