"""`slm distill traces`: a teacher writes answers to prompts for a student to be SFT-trained on
(training/traces.py; docs/FINETUNING.md). Logit distillation is `slm train` with
`train.use_distillation`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from simplified_slm.cli.outputs import check_output_file


def add_distill_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="distillation tools: teacher traces for sequence-level distillation")
    dsub = p.add_subparsers(dest="distill_command", required=True)
    t = dsub.add_parser("traces", help="a teacher answers every prompt of a JSONL file (resumable)")
    t.add_argument("--teacher", required=True, help="our checkpoint or model folder, a transformers causal-LM "
                   "folder (any architecture transformers knows) or a .gguf file")
    t.add_argument("--prompts", required=True, help='JSONL: {"prompt": ...} or {"messages": [...]} per line, '
                   'optional "id"')
    t.add_argument("--out", required=True, help="JSONL of {id, prompt|messages, completion}; a rerun continues "
                   "an interrupted one")
    t.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=256)
    t.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    t.add_argument("--top-p", "--top_p", dest="top_p", type=float)
    t.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.set_defaults(func=cmd_distill_traces)


def cmd_distill_traces(args: argparse.Namespace) -> int:
    from simplified_slm.training.traces import TraceSettings, open_teacher, read_prompt_records, write_traces

    settings = TraceSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             batch_size=args.batch_size, seed=args.seed)
    settings.check()
    out = check_output_file(args.out, "--out")
    records = read_prompt_records(args.prompts)
    teacher = open_teacher(args.teacher, args.device)
    summary = write_traces(teacher, records, out, settings, teacher_name=str(Path(args.teacher).resolve()),
                           say=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(summary))
    return 0
