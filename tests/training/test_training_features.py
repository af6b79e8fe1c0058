"""Muon, cosine warm restarts, curriculum phases and multi-process (DDP) training, all
through the one trainer."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, family_model, tiny_experiment
from simplified_slm import SLMError
from simplified_slm.models.registry import build_model
from simplified_slm.tokenizers import ByteTokenizer
from simplified_slm.training import ExperimentConfig, Trainer
from simplified_slm.training.config import TrainConfig
from simplified_slm.training.optim import CombinedOptimizer, build_optimizer, learning_rate


def final_weights(run: Path) -> dict:
    return load_file(str(run / "checkpoints" / "latest" / "model.safetensors"))


def train_losses(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as fh:
        return {int(r["step"]): float(r["value"]) for r in csv.DictReader(fh) if r["name"] == "train/loss"}


def quiet(**train) -> dict:
    return {"eval_every": 10**6, "sample_every": 10**6, "log_every": 1, **train}


# ------------------------------------------------------------------ schedules
def test_cosine_with_warm_restarts_jumps_back_to_the_peak_at_each_restart():
    cfg = TrainConfig(max_steps=1000, lr=1e-3, min_lr=1e-5, warmup_steps=10, lr_schedule="cosine_restarts",
                      restart_period=100, restart_mult=2.0)
    lrs = [learning_rate(s, cfg) for s in range(1000)]
    assert lrs[9] < lrs[10] == pytest.approx(1e-3)
    # cycles of 100, 200, 400 steps after warmup: restarts at 110, 310, 710
    for restart in (110, 310, 710):
        assert lrs[restart - 1] < 2e-5 and lrs[restart] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # half way through the first cycle
    with pytest.raises(SLMError, match="restart_mult"):
        TrainConfig(lr_schedule="cosine_restarts", restart_mult=0.5)


# ------------------------------------------------------------------------ Muon
def test_muon_takes_exactly_the_hidden_matrices():
    model = build_model({"family": "llama", "preset": "tiny", "vocab_size": 64, "tie_word_embeddings": False})
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02))
    assert isinstance(opt, CombinedOptimizer)
    muon = {id(p) for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    adam = {id(p) for g in opt.optimizers["adamw"].param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert muon and not (muon & adam) and muon | adam == set(names)
    for pid in muon:
        assert "embed" not in names[pid] and "lm_head" not in names[pid] and "norm" not in names[pid]
    assert any("lm_head" in names[p] for p in adam) and any("embed" in names[p] for p in adam)
    lrs = {g["lr"] for g in opt.optimizers["muon"].param_groups}
    assert lrs == {0.02}


def test_muon_trains_and_resumes_bit_exact(tmp_path):
    train = quiet(max_steps=12, checkpoint_every=4, optimizer="muon", muon_lr=0.02, lr=3e-3)
    full = Trainer(ExperimentConfig.from_dict(tiny_experiment(tmp_path / "full", **train))).run()
    assert full.losses[-1] < full.losses[0] - 0.3
    cfg = ExperimentConfig.from_dict(tiny_experiment(tmp_path / "split", **train))
    Trainer(cfg, until=6).run()
    Trainer(cfg, resume="auto").run()
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(tmp_path / "full") == train_losses(tmp_path / "split")


# ------------------------------------------------------------------ curriculum
def curriculum(run: Path, **extra) -> dict:
    phases = [{"name": "short", "steps": 6, "block_size": 16, "batch_size": 8},
              {"name": "long", "steps": 8, "block_size": 32, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2,
               "dataset": "tinystories"}]
    cfg = tiny_experiment(run, **quiet(max_steps=14, checkpoint_every=5, phases=phases, **extra))
    cfg["model"] = {"family": "llama", "preset": "tiny", "max_position_embeddings": 32}
    cfg["tokenizer"] = {"kind": "byte"}
    return cfg


def test_curriculum_phases_change_context_and_resume_mid_phase_exactly(tmp_path):
    said: list[str] = []
    full = Trainer(ExperimentConfig.from_dict(curriculum(tmp_path / "full")), say=said.append).run()
    assert full.step == 14
    assert any("phase 2 'long'" in m and "block_size 32" in m for m in said)
    assert (tmp_path / "full" / "data" / "phase2" / "train.bin").is_file()  # its own dataset
    with open(tmp_path / "full" / "metrics.csv", newline="") as fh:
        lr = {int(r["step"]): float(r["value"]) for r in csv.DictReader(fh) if r["name"] == "train/lr"}
    assert lr[7] == pytest.approx(1e-3 / 3)  # phase 2's own warmup restarts at its first step
    cfg = ExperimentConfig.from_dict(curriculum(tmp_path / "split"))
    Trainer(cfg, until=10).run()  # in the middle of phase 2
    Trainer(cfg, resume="auto").run()
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(tmp_path / "full") == train_losses(tmp_path / "split")


def test_curriculum_errors_name_the_phase(tmp_path):
    cfg = curriculum(tmp_path / "r")
    cfg["model"] = {"family": "gpt", "n_layers": 1, "d_model": 16, "n_heads": 2, "context_length": 32}
    cfg["train"]["phases"][1]["block_size"] = 64
    with pytest.raises(SLMError, match=r"train.phases\[1\].block_size \(64\) exceeds the model's context"):
        Trainer(ExperimentConfig.from_dict(cfg)).run()
    cfg = curriculum(tmp_path / "r2")
    cfg["train"]["max_steps"] = 20
    with pytest.raises(SLMError, match="phases add up to 14 steps; set max_steps to 14"):
        ExperimentConfig.from_dict(cfg)


# ------------------------------------------------------------------------ DDP
def torchrun(args: list[str], log: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "simplified_slm.cli", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    log.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def ddp_config(run: Path) -> dict:
    cfg = tiny_experiment(run, **quiet(max_steps=8, checkpoint_every=4, batch_size=8))
    cfg["model"]["dropout"] = 0.0  # dropout masks differ by rank; everything else must agree
    return cfg


def ddp_matches_single_process(tmp_path: Path, config: Callable[[Path], dict],
                               weights: str = "model.safetensors") -> subprocess.CompletedProcess:
    """`config(run)` trained in one process, and by two DDP processes paused at step 4 and
    resumed: the same losses step by step and the same final `weights`. Returns the resumed
    DDP run's output."""
    single = tmp_path / "single"
    Trainer(ExperimentConfig.from_dict(config(single))).run()
    ddp = tmp_path / "ddp"
    path = tmp_path / "ddp.json"
    path.write_text(json.dumps(config(ddp)))
    torchrun(["train", "--config", str(path), "--until", "4"], tmp_path / "ddp1.log")
    resumed = torchrun(["train", "--config", str(path), "--resume", "auto"], tmp_path / "ddp2.log")
    want, got = train_losses(single), train_losses(ddp)
    assert sorted(got) == list(range(1, 9))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5), step
    a, b = (load_file(str(run / "checkpoints" / "latest" / weights)) for run in (single, ddp))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    return resumed


def test_ddp_two_processes_match_single_process_and_resume(tmp_path):
    resumed = ddp_matches_single_process(tmp_path, ddp_config)
    assert resumed.stdout.count('"val_loss"') == 1 and resumed.stderr.count("resumed from") == 1  # rank 0 speaks
    assert "distributed: 2 processes, ddp over gloo" in resumed.stderr
    # only rank 0 wrote: one metrics file, no temp folders left by a second writer
    ddp = tmp_path / "ddp"
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir() if not p.name.startswith("step_")) == [
        "best", "latest"]
    assert len(list(ddp.glob("**/metrics*.csv"))) == 1


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ddp_from_pretrained_weights_matches_single_process(tmp_path, lora):
    """train.init_from under DDP: every rank loads the same source (and, with LoRA, injects the
    same adapters over it), so two processes train, checkpoint and resume as one."""
    source = tmp_path / "pretrained"
    family_model("gpt").save_pretrained(source, tokenizer=ByteTokenizer())

    def config(run: Path) -> dict:
        cfg = ddp_config(run)
        cfg["model"] = {"family": "gpt", "dropout": 0.0}  # the source's sizes; no dropout masks per rank
        del cfg["tokenizer"]  # the source's
        cfg["train"]["init_from"] = str(source)
        if lora:
            cfg["train"]["lora"] = {"r": 4, "alpha": 8}
        return cfg

    ddp_matches_single_process(tmp_path, config, "adapter_model.safetensors" if lora else "model.safetensors")


def test_ddp_refuses_a_batch_that_does_not_split(tmp_path):
    cfg = ddp_config(tmp_path / "odd")
    cfg["train"]["batch_size"] = 7
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "-m", "simplified_slm.cli", "train", "--config", str(path)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "batch_size (7) is the global batch and must divide evenly over 2 processes" in result.stderr


# -------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("model_cfg", [
    {"family": "gpt", "n_layers": 3, "d_model": 64, "n_heads": 4, "context_length": 64, "dropout": 0.1},
    {"family": "llama", "preset": "tiny", "max_position_embeddings": 64},
    {"family": "hgrn_bit", "hidden_size": 64, "num_hidden_layers": 2},
], ids=lambda c: c["family"])
def test_gradient_checkpointing_same_loss_and_gradients_less_memory(model_cfg):
    from simplified_slm.models.base import next_token_loss
    from simplified_slm.models.checkpointing import enable_gradient_checkpointing, saved_activation_bytes

    torch.manual_seed(0)
    plain = build_model({**model_cfg, "vocab_size": 96})
    ckpt = build_model({**model_cfg, "vocab_size": 96})
    ckpt.load_state_dict(plain.state_dict())
    assert enable_gradient_checkpointing(ckpt) == len(plain.layers)
    x = torch.randint(0, 96, (4, 64))
    results = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        model.train()
        torch.manual_seed(1)  # same dropout masks
        loss_box = []
        results[name + "_bytes"] = saved_activation_bytes(
            model, lambda: loss_box.append(next_token_loss(model(x).logits, x)))
        loss_box[0].backward()
        results[name] = (loss_box[0].item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert results["plain"][0] == results["ckpt"][0]
    for n, g in results["plain"][1].items():
        torch.testing.assert_close(results["ckpt"][1][n], g, rtol=1e-5, atol=1e-6)
    assert results["ckpt_bytes"] < 0.6 * results["plain_bytes"], results
    # checkpoint names are unchanged, and eval/no-grad paths run the plain forward
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    ckpt.eval()
    with torch.no_grad():
        torch.testing.assert_close(ckpt(x).logits, plain.eval()(x).logits)


def test_trainer_with_gradient_checkpointing_matches_without(tmp_path):
    train = quiet(max_steps=6, checkpoint_every=6)
    a = Trainer(ExperimentConfig.from_dict(tiny_experiment(tmp_path / "a", **train))).run()
    b = Trainer(ExperimentConfig.from_dict(tiny_experiment(tmp_path / "b", gradient_checkpointing=True, **train))).run()
    assert a.losses == pytest.approx(b.losses, abs=1e-6)


def test_fsdp_two_processes_train_checkpoint_and_resume(tmp_path):
    """FSDP2 (`fully_shard`) on gloo: the same losses as one process, full (unsharded)
    checkpoints that load anywhere, and exact-enough resume through the sharded optimizer."""
    single = tmp_path / "single"
    cfg = ddp_config(single)
    cfg["model"] = {"family": "llama", "preset": "tiny", "max_position_embeddings": 32}
    cfg["train"]["max_steps"] = 6
    Trainer(ExperimentConfig.from_dict(cfg)).run()
    sharded = tmp_path / "fsdp"
    cfg = {**cfg, "output_dir": str(sharded), "train": {**cfg["train"], "distributed": "fsdp"}}
    path = tmp_path / "fsdp.json"
    path.write_text(json.dumps(cfg))
    torchrun(["train", "--config", str(path), "--until", "3"], tmp_path / "fsdp1.log")
    torchrun(["train", "--config", str(path), "--resume", "auto"], tmp_path / "fsdp2.log")
    want, got = train_losses(single), train_losses(sharded)
    assert sorted(got) == list(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5), step
    a, b = final_weights(single), final_weights(sharded)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_accelerate_launch_runs_the_same_ddp_training(tmp_path):
    """`accelerate launch --multi_gpu` starts the processes (through torchrun, also on a CPU
    machine); the trainer only reads the environment it sets, so training is the DDP run."""
    single = tmp_path / "single"
    cfg = ddp_config(single)
    cfg["train"]["max_steps"] = 4
    Trainer(ExperimentConfig.from_dict(cfg)).run()
    launched = tmp_path / "accelerate"
    path = tmp_path / "acc.json"
    path.write_text(json.dumps({**cfg, "output_dir": str(launched)}))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "simplified_slm.cli", "train", "--config", str(path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('"val_loss"') == 1 and "distributed: 2 processes, ddp over gloo" in result.stderr
    want, got = train_losses(single), train_losses(launched)
    assert got == pytest.approx(want, abs=1e-5)
