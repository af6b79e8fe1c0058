"""Full evaluation report of a checkpoint: metrics, samples and a 95% interval for BPB.

    python scripts/evaluate_model.py --checkpoint runs/demo/checkpoints/best
        [--dataset tinystories] [--output runs/demo/report.json] [--max_batches N]

Metrics (loss, perplexity, bits per byte, accuracy, UTF-8 validity of samples, tokens/s)
come from the same evaluator as `slm eval`, over the validation split as one token stream.
The interval comes from scoring every validation paragraph (or document) separately and
resampling them (`simplified_slm.evaluation.per_document`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from simplified_slm.cli.outputs import check_output_file  # noqa: E402
from simplified_slm.errors import SLMError  # noqa: E402
from simplified_slm.evaluation.evaluator import metrics_line  # noqa: E402
from simplified_slm.utils.io import atomic_write_text  # noqa: E402


def _run_config(checkpoint: Path) -> dict:
    """The experiment config saved with a trainer checkpoint ({} for a bare model folder)."""
    state = checkpoint / "trainer_state.json"
    if state.is_file():
        return json.loads(state.read_text()).get("config") or {}
    run_json = checkpoint.resolve().parent.parent / "run.json"
    if run_json.is_file():
        return json.loads(run_json.read_text()).get("config") or {}
    return {}


def build_report(args: argparse.Namespace) -> dict:
    import numpy as np

    from simplified_slm.evaluation.evaluator import evaluate_model
    from simplified_slm.evaluation.per_document import documents_for, per_document_report
    from simplified_slm.models import load

    checkpoint = Path(args.checkpoint)
    model, tokenizer, model_source = load(checkpoint, args.device)
    config = _run_config(model_source.path)  # the folder (a file inside one stands for it)
    block = args.block_size or model.max_context or config.get("train", {}).get("block_size") or 256
    if model.max_context is not None:
        block = min(block, model.max_context)
    documents, source = documents_for(args.dataset, None if args.dataset else config.get("data"))

    # the validation split as one stream, documents separated by EOS as in prepare_dataset
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for i, doc in enumerate(documents):
        if i and eos is not None:
            ids.append(eos)
        ids.extend(tokenizer.encode_ids(doc.text))
    tokens = np.asarray(ids, dtype=np.int64)
    report = evaluate_model(model, tokenizer, tokens, block_size=block, batch_size=args.batch_size,
                            max_batches=args.max_batches, num_samples=args.samples,
                            sample_tokens=args.sample_tokens, prompt=args.prompt, seed=args.seed)
    per_doc = per_document_report(model, tokenizer, documents, context=block, batch_size=args.batch_size,
                                  unit=args.unit, max_documents=args.max_documents,
                                  resamples=args.resamples, seed=args.seed)
    ci = per_doc["ci95"]
    report.update({
        "checkpoint": str(checkpoint),
        "dataset": args.dataset or "the run's data config",
        "validation_source": source,
        "block_size": block,
        "bpb_ci95": {"bpb": ci["bpb"], "lower": ci["lower"], "upper": ci["upper"],
                     "unit": per_doc["unit"], "documents": per_doc["documents"], "method": ci["method"]},
        "per_document": per_doc,
    })
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint or model folder, transformers folder or .gguf file")
    p.add_argument("--dataset", help="built-in name or file/folder (default: the run's own data config)")
    p.add_argument("--output", help="write the JSON report here (default: print it)")
    p.add_argument("--max_batches", type=int, help="cap on stream-metric batches (default: whole split)")
    p.add_argument("--max_documents", type=int, help="cap on documents scored for the interval")
    p.add_argument("--unit", default="paragraph", choices=["paragraph", "document"],
                   help="what one resampled unit is (blank-line paragraphs by default)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--block_size", type=int, help="window length (default: the model's context)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--sample_tokens", type=int, default=200)
    p.add_argument("--prompt", default="\n")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        if args.output:
            check_output_file(args.output, "--output")
        report = build_report(args)
    except SLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if not args.output:
        print(text)
    m, ci = report["metrics"], report["bpb_ci95"]
    print(f"{metrics_line(m)} | {m['eval_tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
    print(f"per-{ci['unit']} bpb {ci['bpb']:.4f}, 95% CI [{ci['lower']:.4f}, {ci['upper']:.4f}] "
          f"over {ci['documents']} {ci['unit']}s", file=sys.stderr)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
