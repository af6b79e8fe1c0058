"""TextDataset (the Llama 3.2 SLM recipe's): strided windows over documents, coverage, padding, DataLoader."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from simplified_slm.data import TextDataset
from simplified_slm.errors import SLMError
from simplified_slm.tokenizers import ByteTokenizer, SLMTokenizer


def target_counts(dataset):
    """How often each (document-absolute) token position is a target, keyed by its value."""
    counts = Counter()
    for inputs, targets in dataset:
        counts.update(targets[targets != -100].tolist())
    return counts


@pytest.mark.parametrize("block, stride", [(8, 8), (8, 3), (8, 1), (5, 5), (7, 4)])
def test_every_token_but_the_first_is_a_target(block, stride):
    doc = torch.arange(100, 150)  # distinct values: a target's value is its position + 100
    data = TextDataset([doc], block, stride)
    counts = target_counts(data)
    assert set(counts) == set(range(101, 150))
    for inputs, targets in data:  # each target is the next token of its input
        real = targets != -100
        assert torch.equal(targets[:-1][real[:-1]], inputs[1:][real[:-1]])
    once = target_counts(TextDataset([doc], block, stride, score_each_token_once=True))
    assert once == Counter(range(101, 150))


def test_stride_below_block_overlaps_and_last_window_is_aligned_to_the_end():
    data = TextDataset([np.arange(20)], block_size=8, stride=4)
    starts = [int(inputs[0]) for inputs, _ in data]
    assert starts == [0, 4, 8, 11]  # 11 = 20 - 8 - 1: the tail window ends with the document
    inputs, targets = data[1]
    assert inputs.tolist() == list(range(4, 12)) and targets.tolist() == list(range(5, 13))
    assert len(TextDataset([np.arange(20)], 8, 8)) == 3  # 0, 8, and the tail at 11
    assert len(TextDataset([np.arange(17)], 8, 8)) == 2  # 17 = 2 * 8 + 1 tokens: no tail needed


def test_short_documents_are_padded_and_tiny_ones_skipped():
    data = TextDataset([[5, 6, 7], [9], list(range(10, 20))], block_size=6, pad_id=0)
    assert len(data) == 3
    inputs, targets = data[0]
    assert inputs.tolist() == [5, 6, 0, 0, 0, 0]
    assert targets.tolist() == [6, 7, -100, -100, -100, -100]
    assert data[1][0].tolist() == list(range(10, 16))  # windows never cross documents
    assert data[2][1].tolist() == list(range(14, 20))


def test_dataloader_batches_and_errors():
    data = TextDataset([list(range(40)), list(range(100, 130))], block_size=8, stride=6)
    inputs, targets = next(iter(DataLoader(data, batch_size=4, shuffle=False)))
    assert inputs.shape == targets.shape == (4, 8) and inputs.dtype == torch.long
    with pytest.raises(SLMError, match="stride"):
        TextDataset([list(range(40))], block_size=8, stride=9)
    with pytest.raises(SLMError, match="stride"):
        TextDataset([list(range(40))], block_size=8, stride=0)
    with pytest.raises(SLMError, match="block_size"):
        TextDataset([list(range(40))], block_size=0)
    with pytest.raises(SLMError, match="nothing to predict"):
        TextDataset([[1], []], block_size=4)


def test_from_texts_with_the_seed_tokenizer():
    tokenizer = SLMTokenizer(ByteTokenizer())
    data = TextDataset.from_texts(["hello world", "hi"], tokenizer, block_size=4, stride=2)
    assert bytes(data[0][0].tolist()) == b"hell" and bytes(data[0][1].tolist()) == b"ello"
    inputs, targets = data[len(data) - 1]  # "hi": one padded window, no EOS for byte tokens
    assert inputs.tolist()[:1] == [ord("h")] and targets.tolist() == [ord("i"), -100, -100, -100]
