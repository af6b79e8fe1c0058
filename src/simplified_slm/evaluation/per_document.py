"""Per-document losses and a confidence interval for bits per byte.

One BPB number over a validation split says nothing about how much it would move on
another sample of the same kind of text. Scoring each document separately gives per-
document (nats, bytes) pairs; resampling documents (bootstrap) or the delta method on the
ratio sum(nats) / sum(bytes) then gives a 95% interval for the split's BPB.

A document is scored on its own: its ids (after an EOS id as the only context, when the
tokenizer has one, exactly as documents follow each other in the training stream) are cut
into windows of the model's context, and every id after the first is a target exactly once.
It differs from the stream BPB of `evaluate_lm` either way: the missing context pushes it up,
the targets it leaves out (paragraph breaks; the first id when there is no EOS) can push it
down (docs/TRAINING_GUIDE.md section 6 quotes a measured case).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import torch

from simplified_slm.data import DATASET_NAMES, DataConfig, Document, read_documents, validation_documents
from simplified_slm.errors import SLMError
from simplified_slm.models.base import CausalLM
from simplified_slm.tokenizers import Tokenizer

Unit = Literal["paragraph", "document"]
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class DocumentScore:
    name: str
    nats: float  # summed next-token loss over the document's targets
    bytes: int  # UTF-8 bytes of those targets
    tokens: int  # number of targets


def split_units(documents: Iterable[Document], unit: Unit = "paragraph") -> list[Document]:
    """Documents as scored units: whole documents, or their blank-line separated paragraphs.

    Single-file corpora (tiny shakespeare, the bundled TinyStories files) are one document
    each, so "paragraph" is what makes per-document statistics possible there. TinyStories
    separates paragraphs, not stories, with blank lines: paragraphs of one story are
    correlated, which makes the interval somewhat narrower than one over whole stories.
    """
    if unit not in ("paragraph", "document"):
        raise SLMError(f"unit {unit!r} is unknown; use 'paragraph' or 'document'")
    out: list[Document] = []
    for doc in documents:
        if unit == "document":
            if doc.text.strip():
                out.append(doc)
            continue
        for i, part in enumerate(_PARAGRAPH_BREAK.split(doc.text)):
            if part.strip():
                out.append(Document(f"{doc.name}#{i}", part.strip("\n")))
    return out


@torch.no_grad()
def score_documents(model: CausalLM, tokenizer: Tokenizer, documents: Sequence[Document], *,
                    context: int, batch_size: int = 16) -> list[DocumentScore]:
    """(nats, bytes, tokens) of each document, scored in windows of `context` tokens.

    Windows are batched across documents (sorted by length, right-padded; padding sits
    after the real tokens, so causal models never see it) to keep short documents cheap.
    A document that gives fewer than two ids and has no EOS to start from has no target
    and scores (0, 0, 0).
    """
    if context < 1 or batch_size < 1:
        raise SLMError(f"context ({context}) and batch_size ({batch_size}) must be at least 1")
    byte_table = np.asarray(tokenizer.token_byte_lengths(), dtype=np.int64)
    eos = tokenizer.eos_token_id
    windows: list[tuple[int, list[int]]] = []  # (document index, context + targets)
    for index, doc in enumerate(documents):
        ids = tokenizer.encode_ids(doc.text)
        if eos is not None:
            ids = [eos, *ids]
        for start in range(0, len(ids) - 1, context):
            windows.append((index, ids[start:start + context + 1]))
    windows.sort(key=lambda w: len(w[1]), reverse=True)
    nats = np.zeros(len(documents), dtype=np.float64)
    num_bytes = np.zeros(len(documents), dtype=np.int64)
    tokens = np.zeros(len(documents), dtype=np.int64)
    was_training = model.training
    model.eval()
    device = model.device
    try:
        for lo in range(0, len(windows), batch_size):
            chunk = windows[lo:lo + batch_size]
            width = len(chunk[0][1]) - 1
            x = torch.zeros(len(chunk), width, dtype=torch.long)
            y = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, (_, ids) in enumerate(chunk):
                x[row, :len(ids) - 1] = torch.tensor(ids[:-1])
                y[row, :len(ids) - 1] = torch.tensor(ids[1:])
            logits = model(x.to(device)).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y.to(device),
                                                     ignore_index=-100, reduction="none").sum(1).cpu()
            for row, (index, ids) in enumerate(chunk):
                nats[index] += float(loss[row])
                num_bytes[index] += int(byte_table[ids[1:]].sum())
                tokens[index] += len(ids) - 1
    finally:
        model.train(was_training)
    return [DocumentScore(doc.name, float(n), int(b), int(t))
            for doc, n, b, t in zip(documents, nats, num_bytes, tokens)]


def bpb_confidence_interval(nats: Sequence[float], num_bytes: Sequence[int], *, level: float = 0.95,
                            resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """BPB = sum(nats) / (ln 2 * sum(bytes)) with a bootstrap and a normal interval over documents.

    The bootstrap resamples whole documents with replacement (percentile interval); the
    normal interval is the delta method for a ratio estimator, symmetric around the point
    estimate. Documents with no bytes are left out.
    """
    n_arr = np.asarray(nats, dtype=np.float64)
    b_arr = np.asarray(num_bytes, dtype=np.float64)
    keep = b_arr > 0
    n_arr, b_arr = n_arr[keep], b_arr[keep]
    count = len(n_arr)
    if count < 2:
        raise SLMError(f"a confidence interval needs at least 2 scored documents, got {count}; "
                       "evaluate on more text or use unit 'paragraph'")
    ln2 = math.log(2)
    bpb = n_arr.sum() / (ln2 * b_arr.sum())
    # delta method: BPB - true ~ sum(n_i - R b_i) / sum(b_i)
    residual = n_arr / ln2 - bpb * b_arr
    se = math.sqrt(count * residual.var(ddof=1)) / b_arr.sum()
    z = _normal_quantile(0.5 + level / 2)
    rng = np.random.default_rng(seed)
    boots = np.empty(resamples)
    step = max(1, 2_000_000 // count)  # bound memory: step x count indices at a time
    for lo in range(0, resamples, step):
        hi = min(resamples, lo + step)
        idx = rng.integers(0, count, size=(hi - lo, count))
        boots[lo:hi] = n_arr[idx].sum(1) / (ln2 * b_arr[idx].sum(1))
    alpha = (1 - level) / 2
    lower, upper = np.quantile(boots, [alpha, 1 - alpha])
    per_doc = n_arr / (ln2 * b_arr)
    return {
        "bpb": float(bpb), "lower": float(lower), "upper": float(upper), "level": level,
        "method": f"percentile bootstrap over {count} documents ({resamples} resamples, seed {seed})",
        "normal": {"lower": float(bpb - z * se), "upper": float(bpb + z * se), "std_error": float(se),
                   "method": "delta method for the ratio sum(nats)/sum(bytes)"},
        "documents": count,
        "per_document_bpb_quantiles": {f"p{q}": float(v) for q, v in
                                       zip((10, 50, 90), np.quantile(per_doc, [0.1, 0.5, 0.9]))},
    }


def _normal_quantile(p: float) -> float:
    """Inverse standard normal CDF (bisection on erf; exact enough for interval bounds)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def per_document_report(model: CausalLM, tokenizer: Tokenizer, documents: Sequence[Document], *,
                        context: int, batch_size: int = 16, unit: Unit = "paragraph",
                        max_documents: int | None = None, resamples: int = 1000,
                        seed: int = 0) -> dict[str, Any]:
    """Score `documents` (split into `unit`s, the first `max_documents` of them) and return
    totals, the BPB interval and the scoring speed, as a JSON-ready dict."""
    units = split_units(documents, unit)
    if max_documents is not None:
        if max_documents < 2:
            raise SLMError(f"max_documents must be at least 2 for an interval, got {max_documents}")
        units = units[:max_documents]
    started = time.perf_counter()
    scores = score_documents(model, tokenizer, units, context=context, batch_size=batch_size)
    elapsed = time.perf_counter() - started
    total_nats = sum(s.nats for s in scores)
    total_tokens = sum(s.tokens for s in scores)
    ci = bpb_confidence_interval([s.nats for s in scores], [s.bytes for s in scores],
                                 resamples=resamples, seed=seed)
    return {
        "unit": unit, "context": context, "documents": len(units),
        "loss": total_nats / max(1, total_tokens), "tokens": total_tokens,
        "bytes": sum(s.bytes for s in scores), "tokens_per_s": total_tokens / max(elapsed, 1e-9),
        "bpb": ci["bpb"], "ci95": ci,
    }


def documents_for(dataset: str | Path | None, data_cfg: dict[str, Any] | None = None) -> tuple[list[Document], str]:
    """Validation documents of a dataset name or of a run's data config section; all the
    documents of a file or folder (as `slm eval --dataset FILE`)."""
    if dataset is not None and str(dataset) not in DATASET_NAMES:
        return list(read_documents(dataset)), str(dataset)
    if dataset is not None:
        return validation_documents(DataConfig(dataset=str(dataset)))
    if data_cfg is None:
        raise SLMError("no dataset given and no run config found; pass --dataset NAME_OR_PATH")
    return validation_documents(DataConfig.from_dict(data_cfg, where="data"))
