"""Data: read corpora (bundled, WikiText from local files, text/JSONL/HF files), tokenize
them once into memory-mapped splits, sample batches; or slide strided windows over
documents as a torch Dataset (`TextDataset`)."""

from simplified_slm.data.corpus import (
    BUILTIN_DATASETS,
    DATASET_NAMES,
    DEFAULT_EXTENSIONS,
    BuiltinDataset,
    Document,
    builtin_dataset,
    has_validation_split,
    read_documents,
)
from simplified_slm.data.prepare import (
    DataConfig,
    PreparedData,
    load_prepared,
    prepare_dataset,
    split_documents,
    token_dtype,
    tokenizer_texts,
    validation_documents,
)
from simplified_slm.data.sampler import SAMPLER_MODES, BatchSampler, iter_eval_batches
from simplified_slm.data.text_dataset import TextDataset

__all__ = [
    "BUILTIN_DATASETS",
    "DATASET_NAMES",
    "DEFAULT_EXTENSIONS",
    "SAMPLER_MODES",
    "BatchSampler",
    "BuiltinDataset",
    "DataConfig",
    "Document",
    "PreparedData",
    "TextDataset",
    "builtin_dataset",
    "has_validation_split",
    "iter_eval_batches",
    "load_prepared",
    "prepare_dataset",
    "read_documents",
    "split_documents",
    "token_dtype",
    "tokenizer_texts",
    "validation_documents",
]
