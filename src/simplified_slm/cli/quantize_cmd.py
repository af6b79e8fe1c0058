"""`slm quantize` and the `--quantize` / `--kv-cache-dtype` options of the inference commands.

`slm quantize --model_path IN --out OUT --scheme int4` writes a quantized model folder
(`config.json`, packed `model.safetensors`, `quantization.json`, the tokenizer) that
`slm generate/eval/serve`, `models.load` and `CausalLM.from_pretrained` load quantized.
Our folders and GGUF files are quantized tensor by tensor as they are read
(`models/quantization.py`), so a model larger than memory in float32 still converts.
"""

from __future__ import annotations

import argparse
import json

from simplified_slm.cli.outputs import check_output_dir
from simplified_slm.layers.kv_cache import KV_CACHE_DTYPES
from simplified_slm.models.quantization import SCHEME_CHOICES, quantization_record, resident_bytes, \
    resolve_scheme, summary
from simplified_slm.ops.quant import GROUP_SIZES
from simplified_slm.utils.io import atomic_dir


def add_quantize_args(p: argparse.ArgumentParser, kv_cache: bool = False) -> None:
    """`--quantize SCHEME [--group-size N]` (and `--kv-cache-dtype` for commands that decode)."""
    p.add_argument("--quantize", choices=SCHEME_CHOICES, metavar="SCHEME",
                   help="quantize the weights on load: int8 (= q8_0), int4 (= q4_1), q8_0, q4_0, q4_1, bf16, "
                        "fp16; none = float32 (a GGUF otherwise keeps its own quantization)")
    p.add_argument("--group-size", "--group_size", dest="group_size", type=int, default=32, choices=GROUP_SIZES,
                   help="weights per scale for q8_0/q4_0/q4_1 (default 32, GGUF's block)")
    if kv_cache:
        p.add_argument("--kv-cache-dtype", "--kv_cache_dtype", dest="kv_cache_dtype", choices=sorted(KV_CACHE_DTYPES),
                       help="store the attention KV cache in this dtype (bf16 halves it; transformer families)")


def add_quantize_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="write a weight-only quantized copy of a model (int8, int4, bf16, ...)")
    p.add_argument("--model_path", "--model-path", required=True,
                   help="checkpoint or model folder, transformers folder or .gguf file")
    p.add_argument("--out", required=True, help="output folder: new or empty, or pass --overwrite")
    p.add_argument("--scheme", required=True, choices=[c for c in SCHEME_CHOICES if resolve_scheme(c)],
                   help="int8 (= q8_0), int4 (= q4_1), q8_0, q4_0, q4_1 (GGUF's types), bf16, fp16")
    p.add_argument("--group-size", "--group_size", dest="group_size", type=int, default=32, choices=GROUP_SIZES,
                   help="weights per scale for q8_0/q4_0/q4_1 (default 32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder (atomically)")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from simplified_slm.models import load

    out = check_output_dir(args.out, "--out", args.overwrite)
    model, tokenizer, _ = load(args.model_path, "cpu", quantize=args.scheme, group_size=args.group_size)
    with atomic_dir(out) as tmp:  # written beside --out, then swapped in: no half-written folder
        model.save_pretrained(tmp, tokenizer=tokenizer)
    print(json.dumps({"out": args.out, "scheme": summary(quantization_record(model)),
                      "weight_bytes": resident_bytes(model)}))
    return 0
