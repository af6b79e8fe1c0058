"""The family table's recipes are valid experiments before anyone spends 45 minutes on them."""

import importlib.util
import json
from pathlib import Path

import pytest

from simplified_slm.models.registry import build_model
from simplified_slm.training.config import ExperimentConfig

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("compare_families", REPO / "benchmarks" / "compare_families.py")
compare_families = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_families)
BASE = json.loads((REPO / "configs" / "default.json").read_text())


@pytest.mark.parametrize("name", list(compare_families.RECIPES))
def test_each_recipe_is_the_record_with_its_family_changes(name, tmp_path):
    cfg = compare_families.recipe_config(name, BASE, 120, tmp_path / name)
    experiment = ExperimentConfig.from_dict(cfg, where=name)
    assert experiment.train.time_budget == 120 and experiment.output_dir == str(tmp_path / name)
    assert experiment.data == ExperimentConfig.from_dict(BASE).data  # one corpus for every row
    vocab = 256 if experiment.tokenizer.kind == "byte" else experiment.tokenizer.vocab_size
    model = build_model(experiment.model_config(vocab_size=vocab).to_dict())
    assert model.config.family == cfg["model"]["family"]
    assert sum(p.numel() for p in model.parameters()) > 1e6  # a real model, not a smoke-test toy


def test_table_sorts_by_bpb_and_reports_a_failed_family():
    rows = [{"family": "b", "parameters": 2e6, "tokenizer": "bpe", "steps": 9, "tokens_seen": 1e6,
             "train_tokens_per_s": 3000, "val_bpb": 1.5, "val_bpb_95": [1.4, 1.6], "decode_tokens_per_s": 80},
            {"family": "a", "parameters": 1e6, "tokenizer": "byte", "steps": 9, "tokens_seen": 1e6,
             "train_tokens_per_s": 3000, "val_bpb": 1.2, "val_bpb_95": [1.1, 1.3], "decode_tokens_per_s": 90},
            {"family": "c", "error": "slm run failed (exit 1)", "config": "c.json"}]
    lines = compare_families.markdown(rows, 300).splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["a", "b", "c"]
    assert "**1.2000** (1.100-1.300)" in lines[2] and "slm run failed" in lines[4]
