"""The `slm` command: prepare, train, eval, harness, generate, run, serve, quantize, tokenizer.

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

from simplified_slm.cli.outputs import check_output_dir, check_output_file
from simplified_slm.cli.quantize_cmd import add_quantize_args, add_quantize_command
from simplified_slm.cli.sampling_args import add_sampling_args
from simplified_slm.errors import SLMError
from simplified_slm.utils.io import atomic_dir, atomic_write_text

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


def _note_vocab_size(asked: int | None, tokenizer) -> None:
    """BPE training stops early when the corpus has no pair left to merge; say so."""
    if asked is not None and tokenizer.vocab_size < asked:
        print(f"note: the tokenizer has {tokenizer.vocab_size} tokens, not the {asked} asked for: the corpus "
              "ran out of pairs to merge (every word is already one token); train on more text for more",
              file=sys.stderr)


def cmd_prepare(args: argparse.Namespace) -> int:
    from simplified_slm.data import prepare_dataset, tokenizer_texts
    from simplified_slm.data.prepare import META_FILE
    from simplified_slm.tokenizers import build_tokenizer

    cfg = _experiment(args)
    if cfg.data.format == "chat":
        raise SLMError("chat data is tokenized by slm train itself (data/chat.py); slm prepare writes token shards")
    out = check_output_dir(args.out or Path(cfg.output_dir) / "data", "--out", args.overwrite,
                           reusable=lambda folder: (folder / META_FILE).is_file())  # refreshed in place
    tokenizer = build_tokenizer(cfg.tokenizer, tokenizer_texts(cfg.data))
    _note_vocab_size(cfg.tokenizer.vocab_size, tokenizer)

    def write(folder: Path):
        tokenizer.save(folder / "tokenizer")
        return prepare_dataset(cfg.data, tokenizer, folder)

    if args.overwrite:
        with atomic_dir(out) as tmp:
            data = write(tmp)
    else:
        data = write(out)
    print(json.dumps({"out": str(out), "train_tokens": int(len(data.train)), "val_tokens": int(len(data.val))}))
    return 0


def _load_model(path: str | None, device: str, untrained: bool = False, args: argparse.Namespace | None = None):
    """Model + tokenizer through `simplified_slm.models.load` (or the newest run's best checkpoint).

    Only with `untrained` (`slm generate --untrained`, which the repo-root `generate.py` passes
    so it runs on a fresh clone) and no trained model anywhere is a freshly initialised
    byte-level SimplifiedSLM small model used, with a warning; otherwise no model is an error.
    `args.quantize` / `args.group_size` (`--quantize`) quantize on load.
    """
    from simplified_slm.models import load
    from simplified_slm.models.loading import resolve_device

    if path is None:
        candidates = sorted(Path("runs").glob("*/checkpoints/best"), key=lambda p: p.stat().st_mtime)
        if candidates:
            path = str(candidates[-1])
            print(f"using {path}", file=sys.stderr)
        elif untrained:
            from simplified_slm.models import SimplifiedSLMConfig, SimplifiedSLMForCausalLM
            from simplified_slm.tokenizers import ByteTokenizer

            print("warning: no trained model under runs/ and no --model_path; sampling from an untrained "
                  "SimplifiedSLMConfig.small() model (train one with `make demo`)", file=sys.stderr)
            model = SimplifiedSLMForCausalLM(SimplifiedSLMConfig.small()).to(resolve_device(device)).eval()
            if getattr(args, "quantize", None) not in (None, "none"):
                model.quantize(args.quantize, args.group_size)
            return model, ByteTokenizer()
        else:
            raise SLMError("no trained model found under runs/; pass --model_path, train one (make demo), "
                           "or pass --untrained to sample from an untrained model")
    quantize = getattr(args, "quantize", None)
    model, tokenizer, _ = load(path, device, quantize, getattr(args, "group_size", 32))  # resolves "auto" itself
    return model, tokenizer


def cmd_eval(args: argparse.Namespace) -> int:
    from simplified_slm.data import DATASET_NAMES, DataConfig, load_prepared, prepare_dataset
    from simplified_slm.evaluation.evaluator import evaluate_model, metrics_line

    json_out = check_output_file(args.json, "--json") if args.json else None
    if args.block_size is not None and args.block_size < 1:
        raise SLMError(f"--block_size must be at least 1, got {args.block_size}")
    model, tokenizer = _load_model(args.checkpoint, args.device, args=args)
    block = args.block_size or model.max_context or 256
    if model.max_context is not None and block > model.max_context:
        print(f"note: --block_size {block} is longer than the model's context; evaluating with "
              f"{model.max_context}", file=sys.stderr)
        block = model.max_context
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
    m, d = report["metrics"], report["data"]
    print(f"scored {int(m['tokens'])} of {d['tokens']} tokens ({d['bytes']} bytes, {d['documents']} documents) "
          f"of {d['span']}")
    print(metrics_line(report["metrics"]))
    for sample in report["samples"]:
        print("---\n" + sample["text"])
    if json_out:
        atomic_write_text(json_out, json.dumps(report, indent=2) + "\n")
    return 0


def cmd_harness(args: argparse.Namespace) -> int:
    from simplified_slm.evaluation.harness import evaluate, harness_model, results_json

    out = check_output_file(args.output_path, "--output_path") if args.output_path else None
    if args.quantize:  # loaded here, quantized; the adapter takes the model as it is
        model, tokenizer = _load_model(args.model_path, args.device, args=args)
        lm = harness_model(model=model, tokenizer=tokenizer, batch_size=args.batch_size, max_length=args.max_length)
    else:
        lm = harness_model(args.model_path, batch_size=args.batch_size, device=args.device, max_length=args.max_length)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = evaluate(lm, tasks, include_path=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot,
                       bootstrap_iters=args.bootstrap_iters)
    for task, metrics in results["results"].items():
        values = ", ".join(f"{name.split(',')[0]} {value:.4f}" for name, value in metrics.items()
                           if isinstance(value, float) and "stderr" not in name)
        print(f"{task}: {values}")
    if out:
        atomic_write_text(out, results_json(results))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from simplified_slm.cli.generate_cmd import check_generate_args, run_generate

    check_generate_args(args)
    model, tokenizer = _load_model(args.model_path, args.device, untrained=args.untrained, args=args)
    return run_generate(model, tokenizer, args)


def cmd_chat(args: argparse.Namespace) -> int:
    from simplified_slm.cli.chat_cmd import check_chat_args, run_chat

    check_chat_args(args)
    model, tokenizer = _load_model(args.model_path, args.device)
    return run_chat(model, tokenizer, args)


def cmd_run(args: argparse.Namespace) -> int:
    from simplified_slm.cli.pipeline import run_pipeline

    return run_pipeline(_experiment(args), resume=args.resume, allow_data_change=args.allow_data_change)


def _export(fmt: str, model, tokenizer, directory: Path) -> dict:
    """Write `model` in format `fmt` into `directory`; what to report about it."""
    if fmt == "hf":
        from simplified_slm.export.hf import export_hf

        export_hf(model, directory, tokenizer)
        return {"format": "transformers"}
    if fmt == "ternary":
        from simplified_slm.export.ternary import save_packed

        info = save_packed(model, directory, tokenizer)
        ratio = info["linear_weights_fp16_bytes"] / info["linear_weights_packed_bytes"]
        return {**info, "linear_weights_vs_fp16": round(ratio, 2)}
    if fmt == "onnx":
        from simplified_slm.export.onnx import export_onnx

        info = export_onnx(model, directory, tokenizer)
        if info["max_abs_diff"] > 1e-4:
            print(f"warning: onnxruntime logits differ from PyTorch's by up to {info['max_abs_diff']:.2e}; "
                  "in ternary models a value on an int8 rounding boundary can round the other way "
                  "(docs/EXPORT.md), in float models this is a bug", file=sys.stderr)
        return {"format": "onnx", **info}
    if fmt == "coreml":
        from simplified_slm.export.coreml import export_coreml

        return {"format": "coreml", **export_coreml(model, directory, tokenizer)}
    model.save_pretrained(directory, tokenizer=tokenizer)
    return {}


def cmd_export(args: argparse.Namespace) -> int:
    out = check_output_dir(args.out, "--out", args.overwrite)
    # the other formats convert float weights; a safetensors folder keeps a GGUF's quantization
    model, tokenizer = _load_model(args.checkpoint, "cpu", args=argparse.Namespace(
        quantize=None if args.format == "safetensors" else "none"))
    if args.format == "hf":
        from simplified_slm.export.hf_tokenizer import transformers_can_load

        if not transformers_can_load(tokenizer):
            raise SLMError(f"the model's {type(tokenizer).__name__} has no transformers equivalent, so "
                           "AutoTokenizer could not load the export; use --format safetensors, or train with "
                           "a byte or bpe tokenizer")
    from simplified_slm.export.lora import prepare_export

    model, write_adapter = prepare_export(model, args.format, args.merge_lora)  # LoRA: merged, or base + adapter/
    with atomic_dir(out) as tmp:  # written beside --out, then swapped in: no half or mixed folder
        info = _export(args.format, model, tokenizer, tmp)
        if write_adapter is not None:
            info.update(write_adapter(tmp, out))
    if "file" in info:  # report the final path, not the temporary one
        info["file"] = str(out / Path(info["file"]).name)
    print(json.dumps({"out": args.out, **info}))
    return 0


def cmd_boundaries(args: argparse.Namespace) -> int:
    from simplified_slm.evaluation.boundaries import boundary_report

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


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from simplified_slm.serving.app import ServerConfig
        from simplified_slm.serving.server import model_name, serve
    except ImportError as err:
        raise SLMError(f"slm serve needs FastAPI and uvicorn ({err.name} is missing): "
                       "pip install 'simplified-slm[serve]'") from None

    for name in ("port", "max_batch", "max_queue", "max_body_bytes"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise SLMError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    model, tokenizer = _load_model(args.model_path, args.device, args=args)
    config = ServerConfig(model_name=args.model_name or model_name(args.model_path), max_batch=args.max_batch,
                          max_queue=args.max_queue, api_key=args.api_key, request_timeout_s=args.request_timeout,
                          max_body_bytes=args.max_body_bytes)
    serve(model, tokenizer, config, args.host, args.port, args.grace_period)
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from simplified_slm.data import read_documents
    from simplified_slm.tokenizers import TokenizerConfig, build_tokenizer

    out = check_output_dir(args.out, "--out", args.overwrite)
    cfg = TokenizerConfig(kind=args.kind, vocab_size=args.vocab_size)
    tokenizer = build_tokenizer(cfg, lambda: (d.text for d in read_documents(args.data)))
    _note_vocab_size(args.vocab_size, tokenizer)
    with atomic_dir(out) as tmp:
        tokenizer.save(tmp)
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
    p.add_argument("--out", help="output folder (default <output_dir>/data); an earlier prepared folder is "
                   "refreshed in place, any other non-empty folder needs --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder (atomically)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("eval", help="evaluate a checkpoint: loss, perplexity, bits per byte, samples")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint or model folder, transformers folder or .gguf file")
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
    add_quantize_args(p)
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
    add_quantize_args(p)
    p.set_defaults(func=cmd_harness)

    p = sub.add_parser("generate", help="generate text from a trained model")
    add_generate_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with a model in its chat template, on stdin/stdout")
    from simplified_slm.cli.chat_cmd import add_chat_args
    add_chat_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("export", help="write a model in another format")
    p.add_argument("--checkpoint", required=True, help="checkpoint or model folder")
    p.add_argument("--format", required=True, choices=["safetensors", "ternary", "hf", "onnx", "coreml"],
                   help="safetensors: plain model folder; ternary: 2-bit packed BitLinear weights; "
                        "hf: a transformers folder (gpt -> GPT2LMHeadModel, llama -> LlamaForCausalLM); "
                        "onnx: model.onnx, input_ids -> logits, checked in onnxruntime (gpt, llama, bitnet, "
                        "hgrn_bit); coreml: model.mlpackage for macOS/iOS (gpt, llama, bitnet); see docs/EXPORT.md")
    p.add_argument("--out", required=True, help="output folder: new or empty, or pass --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder (atomically)")
    p.add_argument("--merge-lora", "--merge_lora", dest="merge_lora", action="store_true",
                   help="a LoRA checkpoint: fold the adapter into the weights (without it, safetensors/hf "
                        "exports write the base model with the adapter in adapter/, docs/FINETUNING.md)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("boundaries", help="show an hnet_bit model's learned chunk boundaries ('|') on text")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--text", help="text to chunk (default: the start of the dataset's validation split)")
    p.add_argument("--dataset", default="tinystories")
    p.add_argument("--max_chars", type=int, default=600)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_boundaries)

    p = sub.add_parser("serve", help="serve a model over OpenAI's HTTP API, with a chat page at /")
    p.add_argument("--model_path", "--model-path", required=True, help="checkpoint or model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", "--max_batch", dest="max_batch", type=int, default=8,
                   help="sequences decoded together in one forward pass")
    p.add_argument("--max-queue", "--max_queue", dest="max_queue", type=int, default=64,
                   help="requests waiting for a batch slot before new ones get 429")
    p.add_argument("--api-key", "--api_key", dest="api_key",
                   help="require 'Authorization: Bearer KEY' on every route but /health and the chat page")
    p.add_argument("--model-name", "--model_name", dest="model_name", help="id in /v1/models (default: folder name)")
    p.add_argument("--request-timeout", "--request_timeout", dest="request_timeout", type=float, default=300.0,
                   help="seconds a request may wait and generate before it fails with 504")
    p.add_argument("--max-body-bytes", "--max_body_bytes", dest="max_body_bytes", type=int, default=1 << 20)
    p.add_argument("--grace-period", "--grace_period", dest="grace_period", type=float, default=10.0,
                   help="seconds running requests may finish after SIGTERM")
    p.add_argument("--device", default="auto")
    add_quantize_args(p)
    p.set_defaults(func=cmd_serve)

    from simplified_slm.cli.distill_cmd import add_distill_parser

    add_distill_parser(sub)
    add_quantize_command(sub)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a tokenizer on a corpus and save it")
    t.add_argument("--kind", default="bpe", choices=["bpe", "char", "byte"])
    t.add_argument("--vocab-size", "--vocab_size", dest="vocab_size", type=int)
    t.add_argument("--data", default="tinystories", help="built-in dataset name or file/folder")
    t.add_argument("--out", required=True, help="output folder: new or empty, or pass --overwrite")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder (atomically)")
    t.set_defaults(func=cmd_tokenizer)
    return parser


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", "--model-path", help="checkpoint or model folder, transformers folder or "
                   ".gguf file (default: newest run's best)")
    p.add_argument("--untrained", action="store_true",
                   help="with no --model_path and no trained model under runs/, sample from an untrained "
                        "model instead of failing (to try the command on a fresh clone)")
    p.add_argument("--prompt", default="\n")
    add_sampling_args(p, max_tokens=200, temperature=0.8)
    p.add_argument("--compile", action="store_true",
                   help="run the one-token decode steps through torch.compile: faster per token "
                        "after a one-off compile of several seconds; pays off for long outputs")
    p.add_argument("--interactive", action="store_true")
    p.add_argument("--prompt_file", "--prompt-file", help="one prompt per line; each completion is written as "
                   "it finishes")
    p.add_argument("--output_file", "--output-file", help="write here instead of stdout; a .jsonl output of a "
                   "prompt file is resumable (a rerun answers only the prompts not in it yet)")
    p.add_argument("--device", default="auto")
    add_quantize_args(p, kv_cache=True)


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
