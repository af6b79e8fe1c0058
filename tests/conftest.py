"""Shared fixtures: a tiny but real experiment config on the bundled tiny shakespeare."""

import signal
import sys
from pathlib import Path

import pytest
import torch

from simplified_slm.models import CausalLM
from simplified_slm.models.registry import build_model

# A shell starts background jobs with SIGINT ignored, and children inherit that, so the tests
# that Ctrl-C a child `slm` would see it never interrupted. Catching SIGINT here (exec resets
# a caught signal to the default) gives every child Python's KeyboardInterrupt back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parent.parent

# The test models are tiny: one thread avoids OpenMP overhead and contention with the
# training subprocesses some tests start.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo_caches():
    """Each test file starts with torch.compile's caches empty. Dynamo keeps at most 8 graphs
    per code object (`recompile_limit`), and every model instance compiled adds one for the
    shared family forward: which files ran before in the same pytest worker must not decide
    whether a `fullgraph=True` compile passes."""
    torch._dynamo.reset()
    yield


def tiny_experiment(output_dir: Path, **train_overrides) -> dict:
    train = {"max_steps": 40, "batch_size": 8, "block_size": 32, "lr": 3e-3, "min_lr": 3e-4,
             "warmup_steps": 5, "eval_every": 20, "eval_batches": 4, "sample_every": 20,
             "sample_tokens": 20, "checkpoint_every": 10, "log_every": 5, "progress": False,
             "loggers": ["csv"]}
    train.update(train_overrides)
    return {
        "seed": 7,
        "output_dir": str(output_dir),
        "model": {"family": "gpt", "n_layers": 2, "d_model": 32, "n_heads": 2, "context_length": 32,
                  "dropout": 0.1},
        "tokenizer": {"kind": "char", "char_policy": "corpus"},
        "data": {"dataset": "tinyshakespeare", "max_train_bytes": 200_000},
        "train": train,
    }


@pytest.fixture
def python_exe() -> str:
    return sys.executable


# Small untrained models of every family with byte vocabularies, for the shared contract
# checks and the family test modules. Values that make the checks bite: lower bounds
# drawn at random (hgrn_bit), neurons that fire (spiking, initializer_range 0.25), H-Net
# routers that open chunks.
FAMILY_CONFIGS: dict[str, dict] = {
    "gpt": {"family": "gpt", "n_layers": 2, "d_model": 32, "n_heads": 2, "context_length": 64},
    "llama": {"family": "llama", "preset": "tiny"},
    "bitnet": {"family": "bitnet", "preset": "tiny"},
    "hgrn_bit": {"family": "hgrn_bit", "hidden_size": 64, "num_hidden_layers": 3, "num_heads": 2},
    "hnet_bit": {"family": "hnet_bit", "preset": "tiny"},
    "spiking": {"family": "spiking", "preset": "tiny", "initializer_range": 0.25},
}


def family_model(family: str, seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    model = build_model({"vocab_size": 256, **FAMILY_CONFIGS[family], **overrides})
    if family == "hgrn_bit":
        with torch.no_grad():  # give the lower bounds something to do
            model.lower_bounds.normal_()
    return model.eval()
