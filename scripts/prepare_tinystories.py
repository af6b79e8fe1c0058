"""Tokenize the bundled TinyStories slice into token shards (the original reference's data step).

    python scripts/prepare_tinystories.py --output_dir data/tinystories [--tokenizer byte|char|bpe] [--vocab_size N]

Writes DIR/train.bin, DIR/val.bin, DIR/meta.json (via `simplified_slm.data.prepare_dataset`)
and the tokenizer to DIR/tokenizer. Training runs tokenize their data into their own run
folder anyway; this step is for inspecting the data, or for training a BPE vocabulary once
and reusing it: `--set tokenizer.kind=file --set tokenizer.path=DIR/tokenizer`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from simplified_slm.errors import SLMError  # noqa: E402


def prepare(output_dir: str, tokenizer_kind: str = "byte", vocab_size: int | None = None,
            max_train_bytes: int | None = None, char_policy: str = "ascii") -> dict:
    from simplified_slm.data import DataConfig, prepare_dataset, read_documents
    from simplified_slm.tokenizers import TokenizerConfig, build_tokenizer

    out = Path(output_dir)
    data_cfg = DataConfig(dataset="tinystories", max_train_bytes=max_train_bytes)
    tok_cfg = TokenizerConfig(kind=tokenizer_kind, vocab_size=vocab_size,
                              char_policy=char_policy)
    tokenizer = build_tokenizer(tok_cfg, lambda: (d.text for d in read_documents("tinystories")))
    tokenizer.save(out / "tokenizer")
    data = prepare_dataset(data_cfg, tokenizer, out)
    splits = data.meta["splits"]
    return {"out": str(out), "tokenizer": tokenizer.spec(), "reused": data.reused,
            **{f"{name}_tokens": s["tokens"] for name, s in splits.items()},
            **{f"{name}_bytes": s["bytes"] for name, s in splits.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", "--output-dir", required=True, help="folder for shards, meta.json, tokenizer/")
    p.add_argument("--tokenizer", default="byte", choices=["byte", "char", "bpe"],
                   help="byte (256 ids, the original reference's), char or bpe")
    p.add_argument("--char_policy", default="ascii", choices=["ascii", "corpus"],
                   help="char only: the fixed ASCII vocab of configs/default.json, or the corpus' characters")
    p.add_argument("--vocab_size", "--vocab-size", type=int, help="BPE vocabulary size (bpe only), e.g. 4096")
    p.add_argument("--max_train_bytes", type=int, help="use only the first N bytes of the training text")
    args = p.parse_args(argv)
    try:
        if args.tokenizer == "bpe" and args.vocab_size is None:
            raise SLMError("--tokenizer bpe needs --vocab_size (e.g. 4096)")
        if args.tokenizer != "bpe" and args.vocab_size is not None:
            raise SLMError(f"--vocab_size only applies to --tokenizer bpe (got {args.tokenizer}); remove it")
        summary = prepare(args.output_dir, args.tokenizer, args.vocab_size, args.max_train_bytes, args.char_policy)
    except SLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
