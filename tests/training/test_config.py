"""Experiment config parsing and command-line overrides."""

import pytest

from simplified_slm import SLMError
from simplified_slm.training.config import ExperimentConfig, apply_overrides, load_experiment_config
from conftest import REPO


def test_overrides_parse_values_like_a_user_means_them():
    out = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=3e-3", "train.loggers=[csv, console]",
                                                    "run_name=abc", "train.eval_batches=null", "seed=4"])
    assert out == {"train": {"lr": 0.003, "loggers": ["csv", "console"], "eval_batches": None},
                   "run_name": "abc", "seed": 4}
    with pytest.raises(SLMError, match="section.key=value"):
        apply_overrides({}, ["train.lr"])


@pytest.mark.parametrize("name", ["default", "nanogpt_shakespeare_char", "training_flat_tinystories",
                                  "training_1stage_tinystories", "training_2stage_tinystories", "tiny_test"])
def test_shipped_configs_parse(name):
    cfg = load_experiment_config(REPO / "configs" / f"{name}.json")
    assert cfg.model_config(256).vocab_size >= 256


def test_vocab_mismatch_is_refused():
    cfg = ExperimentConfig.from_dict({"model": {"family": "gpt", "vocab_size": 100}})
    with pytest.raises(SLMError, match="tokenizer has 256 ids"):
        cfg.model_config(256)
