"""Loggers as other tools read them, the original reference's scripts, analysis plots and monitoring numbers.

One tiny training (module fixture) feeds every test: its TensorBoard events are read back
with TensorBoard's own reader, its W&B offline folder is checked, and the scripts run on
its checkpoint and metrics the way a user runs them (same argv, in this process to avoid
re-importing torch for every script).
"""

import csv
import json
import math
import runpy
import sys

import pytest
import torch

from conftest import REPO, tiny_experiment
from simplified_slm.cli.main import main as slm_main
from simplified_slm.data import Document
from simplified_slm.errors import SLMError
from simplified_slm.evaluation.analysis import analyze_after_run, analyze_runs
from simplified_slm.evaluation.per_document import bpb_confidence_interval, score_documents, split_units
from simplified_slm.models import CausalLM, SimplifiedSLMConfig, SimplifiedSLMForCausalLM
from simplified_slm.tokenizers import load_tokenizer
from simplified_slm.training.monitoring import grad_norms_by_group, parameter_group, ternary_stats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def run_script(name, *args):
    """Run scripts/<name> as `python scripts/<name> args...` would, in this process; exit code."""
    saved = sys.argv
    sys.argv = [str(REPO / "scripts" / name), *map(str, args)]
    try:
        with torch.enable_grad():  # loading a model for eval turns grad off process-wide; undo it
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as stop:
        return stop.code or 0
    finally:
        sys.argv = saved
    return 0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from 2 threads, and on a shared, busy 2-core machine the
    threads' spin-waits make every op ~100x slower; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("analysis")
    loggers = ["csv", "tensorboard"] + (["wandb"] if _wandb_available() else [])
    cfg = tmp / "cfg.json"
    cfg.write_text(json.dumps(tiny_experiment(tmp / "run", max_steps=20, eval_every=10, checkpoint_every=20,
                                              sample_every=20, loggers=loggers)))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                           "WANDB_CONFIG_DIR": str(tmp / "wandb_config"),
                           "WANDB_CACHE_DIR": str(tmp / "wandb_cache")}.items():
            mp.setenv(key, value)
        assert slm_main(["train", "--config", str(cfg)]) == 0
    return tmp / "run"


# ------------------------------------------------------------------------- loggers
def test_tensorboard_events_readable_by_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((trained / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    acc = EventAccumulator(str(trained / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "val/loss", "val/bpb"} <= set(scalars)
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [5, 10, 15, 20]
    # the same numbers as metrics.csv (TensorBoard stores float32)
    with open(trained / "metrics.csv", newline="") as fh:
        csv_loss = {int(r["step"]): float(r["value"]) for r in csv.DictReader(fh) if r["name"] == "train/loss"}
    for event in loss:
        assert event.value == pytest.approx(csv_loss[event.step], rel=1e-6)


@pytest.mark.skipif(not _wandb_available(), reason="wandb not installed (the error test covers that case)")
def test_wandb_offline_run_folder(trained):
    runs = list((trained / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {trained / 'wandb'}"
    data = list(runs[0].glob("run-*.wandb"))
    assert data and data[0].stat().st_size > 0
    assert b"train/loss" in data[0].read_bytes()  # the metric names are in the run's record file


def test_console_logger_prints_a_line_per_log_step_and_samples(tmp_path):
    from simplified_slm.training.loggers import ConsoleLogger, build_loggers

    printed: list[str] = []
    console = ConsoleLogger(printed.append)
    console.log(5, {"train/loss": 2.5, "train/lr": 1e-3, "train/tokens_per_s": 12345.6, "train/grad_norm": 0.3})
    assert printed == ["step 5: loss 2.5000  lr 1.00e-03  tok/s 12,346"]
    console.log(10, {"val/loss": 1.234567, "val/bpb": 1.5})
    assert printed[-1] == "step 10: val/loss 1.2346  val/bpb 1.5000"
    console.log(11, {"train/skipped_nonfinite": 1.0})  # nothing a person watches: no line
    assert len(printed) == 2
    console.log_text(10, "sample", "ROMEO: hi")
    assert printed[-1] == "--- sample at step 10 ---\nROMEO: hi\n---"
    # behind the one interface: "console" adds it next to the always-on CSV logger
    printed.clear()
    loggers = build_loggers(["console"], tmp_path, "run", {}, printed.append)
    loggers.log(20, {"val/loss": 0.5, "train/loss": 0.7})
    loggers.close()
    assert printed == ["step 20: loss 0.7000  val/loss 0.5000"]
    assert (tmp_path / "metrics.csv").read_text().count("\n20,") == 2
    assert [type(x).__name__ for x in loggers.loggers] == ["CSVLogger", "ConsoleLogger"]


def test_wandb_missing_is_one_clear_error(tmp_path, monkeypatch):
    from simplified_slm.training.loggers import WandbLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(SLMError, match=r"pip install wandb.*remove 'wandb' from train.loggers"):
        WandbLogger(tmp_path, "run", {})


# ------------------------------------------------------------------------- analysis
def test_analyze_training_writes_plots_and_comparison(trained, tmp_path, capsys):
    # a second run for the comparison, plus ternary and H-Net metrics the plots must pick up
    other = tmp_path / "other"
    other.mkdir()
    rows = [("step", "name", "value", "time")]
    for step in (10, 20, 30):
        t = 1000.0 + step
        rows += [(step, "train/loss", 4 - step / 20, t), (step, "train/tokens", step * 256, t),
                 (step, "train/lr", 1e-3, t), (step, "train/grad_norm", 1.0 / step, t),
                 (step, "val/loss", 4.1 - step / 20, t), (step, "val/bpb", 6 - step / 15, t),
                 (step, "train/tokens_per_s", 100.0 * step, t),
                 (step, "hnet/stage0/bytes_per_chunk", 2 + step / 30, t),
                 (step, "hnet/stage0/compression", 2 + step / 30, t),
                 (step, "hnet/stage1/bytes_per_chunk", 4 + step / 15, t),
                 (step, "hnet/stage1/compression", (4 + step / 15) / (2 + step / 30), t)]
        for layer, zero in (("layers.0.attn.i_proj", 0.3), ("lm_head", 0.4), ("all", 0.35)):
            rows += [(step, f"ternary/{layer}/neg", (1 - zero) / 2, t), (step, f"ternary/{layer}/zero", zero, t),
                     (step, f"ternary/{layer}/pos", (1 - zero) / 2, t), (step, f"ternary/{layer}/scale", 20.0, t)]
    rows.append(("30", "train/loss", "0.5", "1"))  # a resumed run re-logs a step: the later row wins
    rows.append(("31", "train/lo"))  # half-written last line of a killed run: skipped
    with open(other / "metrics.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    (other / "run.json").write_text(json.dumps({"family": "hgrn_bit", "num_parameters": 1234,
                                                "config": {"run_name": "synthetic"}}))
    (other / "data").mkdir()
    (other / "data" / "meta.json").write_text(json.dumps({"splits": {"train": {"tokens": 500, "bytes": 1500}}}))

    out = tmp_path / "plots"
    assert run_script("analyze_training.py", "--run_dir", trained, "--compare", other, "--out", out) == 0
    for name in ("loss", "bpb", "lr", "grad_norm", "compare_val"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    assert not (out / "ternary.png").exists()  # the first run (gpt) has no BitLinear metrics
    table = (out / "comparison.md").read_text()
    assert "| run | family | params" in table and "synthetic" in table and "1,234" in table
    rows_json = json.loads((out / "comparison.json").read_text())
    assert [r["run"] for r in rows_json][1] == "synthetic"
    first, second = rows_json
    assert first["steps"] == 20 and first["tokens"] == 20 * 8 * 32 and first["params"] > 0
    assert first["best_val_loss"] <= first["final_val_loss"] and first["final_val_bpb"] > 0
    assert second["final_train_loss"] == 0.5 and second["steps"] == 30 and second["best_val_step"] == 30
    # bytes/s: median tokens/s (2000) x 3 bytes per token; compression of each stage at the last log
    assert second["train_bytes_per_s"] == 6000 and second["compression"] == "3.00 / 2.00"
    assert first["train_bytes_per_s"] > 0 and first["compression"] is None  # a gpt run: no stages
    assert "train bytes/s" in table and "6,000" in table and "3.00 / 2.00" in table
    assert str(out / "comparison.md") in capsys.readouterr().out

    # the synthetic run alone: ternary distribution and H-Net compression plots
    assert run_script("analyze_training.py", "--run_dir", other) == 0
    for name in ("ternary", "hnet_compression"):
        assert (other / "plots" / f"{name}.png").read_bytes().startswith(PNG_MAGIC)


def test_analysis_without_matplotlib_is_one_clear_note(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SLMError, match=r"plots need matplotlib: pip install matplotlib"):
        analyze_runs([trained], tmp_path)
    said = []
    assert analyze_after_run(trained, said.append) is None  # slm run must not fail over plots
    assert said == ["note: no plots (plots need matplotlib: pip install matplotlib (or pip install -e '.[dev]'))"]


def test_analyze_training_bad_run_dir_is_one_line(tmp_path, capsys):
    assert run_script("analyze_training.py", "--run_dir", tmp_path / "nope") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run folder") and "\n" not in err


# ------------------------------------------------------------------------- evaluation
def test_evaluate_model_report_with_bpb_interval(trained, tmp_path):
    report_path = tmp_path / "report.json"
    assert run_script("evaluate_model.py", "--checkpoint", trained / "checkpoints" / "best",
                      "--dataset", "tinyshakespeare", "--output", report_path, "--max_batches", "4",
                      "--max_documents", "150", "--samples", "1", "--sample_tokens", "20") == 0
    report = json.loads(report_path.read_text())
    m = report["metrics"]
    assert {"loss", "ppl", "bpb", "accuracy", "utf8_validity", "eval_tokens_per_s"} <= set(m)
    assert m["bpb"] > 0 and 0 <= m["accuracy"] <= 1 and len(report["samples"]) == 1
    ci = report["bpb_ci95"]
    assert ci["lower"] <= ci["bpb"] <= ci["upper"] and ci["upper"] - ci["lower"] < 1.0
    assert ci["documents"] == 150 and ci["unit"] == "paragraph"
    normal = report["per_document"]["ci95"]["normal"]
    assert normal["lower"] < ci["bpb"] < normal["upper"]
    # per-document BPB of the same text is close to the stream BPB (same model, same bytes)
    assert abs(ci["bpb"] - m["bpb"]) < 0.25 * m["bpb"]


def test_document_scores_do_not_depend_on_batching(trained):
    """Windows of different lengths share a right-padded batch; padding must not leak in."""
    model = CausalLM.from_pretrained(trained / "checkpoints" / "best")
    tokenizer = load_tokenizer(trained / "checkpoints" / "best")
    docs = [Document("a", "First Citizen:\nBefore we proceed any further, hear me speak." * 3),
            Document("b", "All:\nSpeak, speak."), Document("c", "x")]
    alone = score_documents(model, tokenizer, docs, context=32, batch_size=1)
    batched = score_documents(model, tokenizer, docs, context=32, batch_size=8)
    for a, b in zip(alone, batched):
        assert (a.tokens, a.bytes) == (b.tokens, b.bytes) and a.nats == pytest.approx(b.nats, rel=1e-4)
    # every id after the first is predicted once (no EOS in a char corpus tokenizer: the first is context)
    assert [s.tokens for s in alone] == [len(tokenizer.encode_ids(d.text)) - 1 for d in docs]
    assert alone[2].tokens == 0 and alone[0].tokens > 32  # a one-char document has no target; a long one spans windows


def test_bpb_interval_math():
    rng = torch.Generator().manual_seed(0)
    num_bytes = (torch.rand(400, generator=rng) * 300 + 20).round()
    nats = num_bytes * math.log(2) * (2.0 + 0.3 * torch.randn(400, generator=rng))
    ci = bpb_confidence_interval(nats.tolist(), num_bytes.int().tolist(), resamples=500)
    assert ci["bpb"] == pytest.approx(float(nats.sum() / (math.log(2) * num_bytes.sum())))
    assert ci["lower"] < 2.0 < ci["upper"] and ci["upper"] - ci["lower"] < 0.1
    # bootstrap and delta-method intervals agree for many documents
    assert ci["lower"] == pytest.approx(ci["normal"]["lower"], abs=0.01)
    with pytest.raises(SLMError, match="at least 2"):
        bpb_confidence_interval([1.0], [10])


def test_paragraph_units():
    docs = [Document("a", "one\ntwo\n\nthree\n   \nfour"), Document("b", "\n\n")]
    assert [d.text for d in split_units(docs)] == ["one\ntwo", "three", "four"]
    assert [d.name for d in split_units(docs, "document")] == ["a"]


# ------------------------------------------------------------------------- data script
def test_prepare_tinystories_writes_shards_and_meta(tmp_path, capsys):
    out = tmp_path / "ts"
    assert run_script("prepare_tinystories.py", "--output_dir", out, "--tokenizer", "byte",
                      "--max_train_bytes", "20000") == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "byte" and meta["splits"]["train"]["tokens"] == 20000
    assert (out / "train.bin").stat().st_size == 20000  # uint8 ids for a byte vocab
    assert (out / "val.bin").stat().st_size == meta["splits"]["val"]["tokens"] > 0
    assert (out / "tokenizer" / "tokenizer_config.json").is_file()
    assert json.loads(capsys.readouterr().out)["train_tokens"] == 20000
    assert run_script("prepare_tinystories.py", "--output_dir", out, "--tokenizer", "bpe") == 2
    assert "--tokenizer bpe needs --vocab_size" in capsys.readouterr().err


# ------------------------------------------------------------------------- monitoring
def _tiny_hgrn():
    torch.manual_seed(0)
    return SimplifiedSLMForCausalLM(SimplifiedSLMConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1))


def test_ternary_stats_shares_sum_to_one():
    model = _tiny_hgrn()
    stats = ternary_stats(model)
    layers = {name.rsplit("/", 1)[0] for name in stats}
    bitlinears = [n for n, m in model.named_modules() if type(m).__name__ == "BitLinear"]
    assert layers == {f"ternary/{n}" for n in bitlinears} | {"ternary/all"}
    for layer in layers:
        shares = [stats[f"{layer}/{k}"] for k in ("neg", "zero", "pos")]
        assert sum(shares) == pytest.approx(1.0) and all(0 <= s <= 1 for s in shares)
        assert stats[f"{layer}/scale"] > 0
    # absmean ternarisation of gaussian weights: about 31% zeros (|w| < mean|w| / 2)
    assert 0.2 < stats["ternary/all/zero"] < 0.45
    model.freeze_ternary()  # frozen layers report their stored codes: the same numbers
    assert ternary_stats(model) == pytest.approx(stats)
    assert ternary_stats(torch.nn.Linear(3, 3)) == {}


def test_grad_norms_by_group_matches_clip_grad_norm():
    model = _tiny_hgrn()
    ids = torch.randint(0, 64, (2, 16))
    model(ids, labels=ids).loss.backward()
    norms = grad_norms_by_group(model)
    assert {"grad_norm/embeddings", "grad_norm/layer0", "grad_norm/head"} <= set(norms)
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3).item()
    assert norms["grad_norm/global"] == pytest.approx(total, rel=1e-5)
    groups = [v for k, v in norms.items() if k != "grad_norm/global"]
    assert math.sqrt(sum(v * v for v in groups)) == pytest.approx(total, rel=1e-5)
    assert parameter_group("layers.12.mlp.up_proj.weight") == "layer12"
    assert parameter_group("embed_tokens.weight") == "embeddings"
    assert parameter_group("norm.weight") == "head"
    # H-Net: by stage and part (the stages nest under `inner`)
    assert parameter_group("stage.encoder.layers.0.attn.i_proj.weight") == "stage0.encoder"
    assert parameter_group("stage.inner.decoder.norm.weight") == "stage1.decoder"
    assert parameter_group("stage.inner.router.q_proj.weight") == "stage1.routing"
    assert parameter_group("stage.residual_proj.weight") == parameter_group("stage.pad") == "stage0.routing"
    assert parameter_group("stage.inner.inner.main.layers.0.mlp.up_proj.weight") == "main"

