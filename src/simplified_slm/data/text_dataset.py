"""`TextDataset` (the Llama 3.2 SLM recipe's): sliding (input, target) windows with a stride over long documents.

Unlike `BatchSampler`, which cuts random windows from one flat token stream, this is a
map-style torch Dataset over documents kept apart, for DataLoader-based loops and
strided evaluation. A window of `block_size` inputs predicts the next token at each
position (targets pre-shifted, the trainer's `next_token_loss` convention).

Where the windows go, for a document of n tokens:
- windows start at 0, stride, 2·stride, ... while a full window (block_size + 1 tokens)
  fits; if that leaves tokens at the end unpredicted, one last window is aligned to the
  document's end, so every token but the first (it has no context) is a target;
- a document shorter than block_size + 1 tokens gives one window, right-padded with
  `pad_id` in the inputs and -100 (ignored by the loss) in the targets;
- a document of fewer than 2 tokens has nothing to predict and is skipped;
- stride < block_size overlaps windows (more left context per target); stride >
  block_size would skip tokens and is refused.
With `score_each_token_once`, targets an earlier window already predicted are set to -100,
so a sum over the dataset counts every token exactly once (perplexity with a stride).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from simplified_slm.errors import SLMError
from simplified_slm.tokenizers import SLMTokenizer, Tokenizer

IGNORE_INDEX = -100


class TextDataset(Dataset):
    """`dataset[i]` is `(input_ids, targets)`, two int64 tensors of length `block_size`."""

    def __init__(self, documents: Iterable[Sequence[int] | np.ndarray | torch.Tensor], block_size: int,
                 stride: int | None = None, *, pad_id: int = 0, score_each_token_once: bool = False) -> None:
        stride = block_size if stride is None else stride
        if block_size < 1:
            raise SLMError(f"block_size must be at least 1, got {block_size}")
        if not 1 <= stride <= block_size:
            raise SLMError(f"stride must be in 1..block_size ({block_size}), got {stride}; a larger stride "
                           "would leave tokens between windows that are never predicted")
        self.block_size, self.stride, self.pad_id = block_size, stride, pad_id
        docs = [torch.as_tensor(np.asarray(d), dtype=torch.long).reshape(-1) for d in documents]
        docs = [d for d in docs if d.numel() >= 2]
        if not docs:
            raise SLMError("TextDataset got no document with at least 2 tokens; there is nothing to predict")
        offsets = np.cumsum([0] + [d.numel() for d in docs])
        self.tokens = torch.cat(docs)
        # one row per window: absolute start, real tokens in it (<= block_size + 1), first
        # target index (within the window) that is not masked as already predicted
        rows: list[tuple[int, int, int]] = []
        for offset, doc in zip(offsets, docs):
            n = doc.numel()
            starts = list(range(0, n - block_size, stride)) or [0]
            if starts[-1] + block_size + 1 < n:
                starts.append(n - block_size - 1)
            covered = 0  # targets up to this document index were predicted by earlier windows
            for start in starts:
                first_new = max(covered - start, 0) if score_each_token_once else 0
                length = min(block_size + 1, n - start)
                rows.append((int(offset) + start, length, first_new))
                covered = start + length - 1
        self.windows = torch.tensor(rows, dtype=torch.long)

    @classmethod
    def from_texts(cls, texts: Iterable[str], tokenizer: Tokenizer | SLMTokenizer, block_size: int,
                   stride: int | None = None,
                   *, append_eos: bool = True, score_each_token_once: bool = False) -> "TextDataset":
        """The Llama 3.2 SLM recipe's `TextDataset(texts, tokenizer, max_length)`: tokenize each text as one document.

        `tokenizer` is one of ours or an `SLMTokenizer`; EOS is appended to each document
        (when the tokenizer has one) so the model learns where documents end, and padding
        uses the tokenizer's pad id.
        """
        base = tokenizer.tokenizer if isinstance(tokenizer, SLMTokenizer) else tokenizer
        eos = [base.eos_token_id] if append_eos and base.eos_token_id is not None else []
        docs = [base.encode_ids(text) + eos for text in texts]
        pad = base.pad_token_id if base.pad_token_id is not None else 0
        return cls(docs, block_size, stride, pad_id=pad, score_each_token_once=score_each_token_once)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, length, first_new = self.windows[index].tolist()
        chunk = self.tokens[start:start + length]
        inputs = torch.full((self.block_size,), self.pad_id, dtype=torch.long)
        targets = torch.full((self.block_size,), IGNORE_INDEX, dtype=torch.long)
        inputs[:length - 1] = chunk[:-1]
        targets[first_new:length - 1] = chunk[1 + first_new:]
        return inputs, targets
