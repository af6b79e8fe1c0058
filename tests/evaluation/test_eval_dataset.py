"""`slm eval --dataset FILE` scores the whole file (it used to score only its last 5%)."""

import gzip
import json

from conftest import REPO, family_model
from simplified_slm.cli.main import main
from simplified_slm.tokenizers import ByteTokenizer, CharTokenizer


def test_eval_dataset_file_scores_the_whole_file(tmp_path, capsys):
    text = gzip.open(REPO / "src/simplified_slm/corpora/tinystories_valid.txt.gz", "rt").read()[:20_000]
    text = "é" + text  # a first character longer than one byte
    data = tmp_path / "stories.txt"
    data.write_text(text, encoding="utf-8")
    tokenizer = CharTokenizer.from_corpus([text])
    model_dir = tmp_path / "model"
    family_model("gpt", vocab_size=tokenizer.vocab_size).save_pretrained(model_dir, tokenizer=tokenizer)
    report_path = tmp_path / "eval.json"
    common = ["eval", "--checkpoint", str(model_dir), "--dataset", str(data), "--samples", "0",
              "--block_size", "64", "--batch_size", "64", "--device", "cpu", "--json", str(report_path)]

    assert main(common) == 0
    report = json.loads(report_path.read_text())
    assert report["data"]["tokens"] == len(tokenizer.encode_ids(text))
    assert report["data"]["bytes"] == len(text.encode("utf-8")) and report["data"]["split"] == "all"
    # every token after the first is a target, up to the last partial window of 64
    assert report["metrics"]["tokens"] == ((len(text) - 65) // 64 + 1) * 64
    assert f"of {len(text)} tokens" in capsys.readouterr().out

    assert main(common + ["--split", "val"]) == 0
    held_out = json.loads(report_path.read_text())["data"]
    assert held_out["span"].startswith("last 0.05 of") and held_out["tokens"] < len(text) // 10


def test_eval_split_all_without_dataset_is_refused(tmp_path, capsys):
    model_dir = tmp_path / "model"
    family_model("gpt").save_pretrained(model_dir, tokenizer=ByteTokenizer())
    assert main(["eval", "--checkpoint", str(model_dir), "--split", "all", "--device", "cpu"]) == 2
    assert "--split all needs --dataset FILE" in capsys.readouterr().err


def test_per_document_report_reads_a_whole_file_too(tmp_path):
    from simplified_slm.evaluation.per_document import documents_for

    data = tmp_path / "notes.txt"
    data.write_text("first line\n" * 500)
    documents, source = documents_for(data)
    assert "".join(d.text for d in documents) == data.read_text() and source == str(data)
    held_out, _ = documents_for("tinyshakespeare")
    assert 0 < sum(len(d.text) for d in held_out) < 100_000  # a named dataset keeps its validation split
