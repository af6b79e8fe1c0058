"""Every metric the analysis reads (plots, run table) is written by some real training run.

The names live in `simplified_slm.metric_names`; this test reads which of them
`evaluation/analysis.py` uses straight from its source, so a metric the analysis starts to
read but no writer produces (or a writer that renames one) fails here.
"""

from __future__ import annotations

import ast
import csv
import re
from pathlib import Path

from conftest import tiny_experiment
from simplified_slm import metric_names as M
from simplified_slm.evaluation import analysis
from simplified_slm.training import ExperimentConfig, Trainer


def names_read_by_analysis() -> dict[str, object]:
    tree = ast.parse(Path(analysis.__file__).read_text())
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "M"}
    # names and patterns; the name-building functions are the writers' side
    return {attr: getattr(M, attr) for attr in sorted(used) if isinstance(getattr(M, attr), (str, re.Pattern))}


def logged_names(tmp_path: Path, model: dict) -> set[str]:
    cfg = tiny_experiment(tmp_path, max_steps=4, batch_size=4, log_every=2, eval_every=4, eval_batches=1,
                          sample_every=4, sample_tokens=4, checkpoint_every=4)
    cfg["model"], cfg["tokenizer"] = model, {"kind": "byte"}
    cfg["data"]["max_train_bytes"] = 30_000
    Trainer(ExperimentConfig.from_dict(cfg), say=lambda s: None).run()
    with open(tmp_path / "metrics.csv", newline="") as fh:
        return {row["name"] for row in csv.DictReader(fh)}


def test_every_metric_the_analysis_reads_is_written_by_a_run(tmp_path):
    read = names_read_by_analysis()
    assert {"TRAIN_LOSS", "VAL_BPB", "TERNARY_PATTERN", "HNET_BYTES_PER_CHUNK_PATTERN"} <= set(read)
    written = logged_names(tmp_path / "bitnet", {"family": "bitnet", "preset": "tiny"})
    written |= logged_names(tmp_path / "hnet", {"family": "hnet_bit", "preset": "tiny", "d_model": [32, 48],
                                                "encoder_layers": [1], "decoder_layers": [1], "main_layers": 1,
                                                "target_ratio": [2.0]})
    for attr, name in read.items():
        if isinstance(name, re.Pattern):
            assert any(name.match(w) for w in written), f"analysis reads {attr}, which no run writes"
        elif attr != "VAL_PREFIX":  # a prefix, not a name
            assert name in written, f"analysis reads {attr} = {name!r}, which no run writes"
