"""The trainer end to end on real text: learning, exact resume, signals, hooks, run records."""

import csv
import math
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_experiment
from simplified_slm import SLMError
from simplified_slm.models import CausalLM
from simplified_slm.training import ExperimentConfig, Trainer
from simplified_slm.training import hooks as hooks_mod
from simplified_slm.training import precision as precision_mod


def train(tmp: Path, resume=None, until=None, hooks=(), model=None, **overrides):
    cfg = tiny_experiment(tmp, **overrides)
    cfg["hooks"] = list(hooks)
    cfg["model"].update(model or {})
    return Trainer(ExperimentConfig.from_dict(cfg), resume=resume, until=until, say=lambda m: None).run()


def final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "checkpoints" / "latest" / "model.safetensors"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_loss_falls_well_below_unigram_level(tmp_path, precision):
    result = train(tmp_path, max_steps=200, eval_every=200, eval_batches=8, checkpoint_every=200,
                   sample_every=200, batch_size=16, model={"d_model": 64, "dropout": 0.0}, precision=precision)
    # ln(67) = 4.2 nats at init; a unigram model of this text is 3.31 nats/char, a bigram one 2.45
    assert result.losses[0] > 4.0
    assert result.val_metrics["loss"] < 2.6
    assert result.val_metrics["bpb"] == pytest.approx(result.val_metrics["loss"] / 0.693147, rel=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bit_exact(tmp_path, precision):
    full = train(tmp_path / "full", precision=precision)
    first = train(tmp_path / "split", until=20, precision=precision)
    assert first.step == 20 and not first.interrupted
    second = train(tmp_path / "split", resume="auto", precision=precision)
    assert second.step == 40
    assert first.losses + second.losses == full.losses  # bit for bit, dropout included
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_training_resumes_bit_exact(tmp_path):
    full = train(tmp_path / "full", compile=True, max_steps=20)
    first = train(tmp_path / "split", compile=True, max_steps=20, until=10)
    second = train(tmp_path / "split", compile=True, max_steps=20, resume="auto")
    assert first.losses + second.losses == full.losses
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_training_step_repeats_bit_for_bit():
    # inductor's embedding backward adds with atomics in a varying order, which made
    # gradients (and so resumed runs) differ in their last bits; the GPT keeps its token
    # embedding out of the graph while training. nanoGPT's width and batch show it.
    from simplified_slm.models.gpt import GPTConfig
    from simplified_slm.models.registry import build_model
    from simplified_slm.training.step import model_loss

    torch.manual_seed(0)
    model = build_model(GPTConfig.from_dict({**GPTConfig.presets["nanogpt-cpu"], "vocab_size": 65})).train()
    x, y = torch.randint(0, 65, (2, 12, 64))
    loss_fn = model_loss(model, compile=True)
    grads, threads = [], torch.get_num_threads()
    torch.set_num_threads(2)  # the suite runs on one thread, where there is no race to see
    try:
        for _ in range(20):
            model.zero_grad(set_to_none=True)
            loss_fn(x, y)[0].backward()
            grads.append(model.embed_tokens.weight.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(g, grads[0]) for g in grads)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3, None])
def test_clip_folded_into_fused_adamw_matches_clip_grad_norm(max_norm):
    from simplified_slm.models.gpt import GPTConfig
    from simplified_slm.models.registry import build_model
    from simplified_slm.training.config import TrainConfig
    from simplified_slm.training.optim import build_optimizer, clip_grad_norm

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, n_layers=1, d_model=32, n_heads=2, context_length=16, dropout=0.0)
    models = [build_model(cfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [build_optimizer(m, TrainConfig(lr=1e-2)) for m in models]
    assert optimizers[0].defaults["fused"]
    x = torch.randint(0, 50, (4, 16))
    for step in range(3):
        norms = []
        for model, opt, folded in zip(models, optimizers, (False, True)):
            model(x, labels=x).loss.backward()
            params = list(model.parameters())
            if folded:
                norms.append(clip_grad_norm(opt, params, max_norm))
                assert (opt.grad_scale is None) == (max_norm is None or norms[-1] < max_norm)
            else:
                norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf).item())
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert norms[0] == pytest.approx(norms[1], rel=1e-5)
        for p, q in zip(*(m.parameters() for m in models)):  # a divide instead of a multiply: an ulp apart
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_clip_falls_back_to_clip_grad_norm_for_other_optimizers():
    from simplified_slm.training.optim import clip_grad_norm

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)  # norm 6
    opt = torch.optim.AdamW([p], lr=1e-2, foreach=False)
    assert clip_grad_norm(opt, [p], 1.0) == pytest.approx(6.0)
    assert torch.allclose(p.grad, torch.full((4,), 0.5), atol=1e-6)  # rewritten, as clip_grad_norm_ does
    assert getattr(opt, "grad_scale", None) is None


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_bf16_natively(tmp_path, monkeypatch, native):
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert precision_mod.autocast_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    assert precision_mod.autocast_dtype("bf16", cpu) == torch.bfloat16
    assert precision_mod.autocast_dtype("fp32", cpu) is None
    train(tmp_path, max_steps=2, precision="auto")
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["compute_dtype"] == ("bfloat16" if native else "float32")  # what "auto" resolved to


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    train(tmp_path, max_steps=10)
    with pytest.raises(SLMError, match="--resume auto"):
        train(tmp_path, max_steps=10)


def test_run_records(tmp_path):
    train(tmp_path, max_steps=20, hooks=[{"name": "activation_stats", "params": {"every": 5}}])
    info = json.loads((tmp_path / "run.json").read_text())
    for key in ("run_id", "git_commit", "config_hash", "hook_list", "versions"):
        assert key in info
    assert info["hook_list"] == ["activation_stats"]
    assert info["compute_dtype"] == "float32"  # train.precision fp32, the default
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    names = {r["name"] for r in rows}
    assert {"train/loss", "train/lr", "train/grad_norm", "val/bpb", "act/layer0/std"} <= names
    samples = [json.loads(l) for l in open(tmp_path / "samples.jsonl")]
    assert samples and all(s["text"] for s in samples)
    best = CausalLM.from_pretrained(tmp_path / "checkpoints" / "best")  # a checkpoint is a model folder
    assert best.config.n_layers == 2


def test_forward_hook_leaves_logits_unchanged():
    from simplified_slm.models import GPTConfig, build_model

    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=30, n_layers=2, d_model=16, n_heads=2, context_length=16)).eval()
    ids = torch.randint(0, 30, (2, 10))
    before = model(ids).logits
    hook = hooks_mod.ActivationStats(every=1)
    hook.attach(model)
    hook.active = True
    after = model(ids).logits
    assert torch.equal(before, after)
    stats = hook.metrics()
    assert set(stats) >= {"act/layer0/mean", "act/layer1/absmax"}
    hook.detach()


def test_update_hook_changes_the_update(tmp_path):
    plain = train(tmp_path / "plain", max_steps=10)
    noisy = train(tmp_path / "noisy", max_steps=10,
                  hooks=[{"name": "gradient_noise", "params": {"eta": 1.0}}])
    assert plain.losses[0] == noisy.losses[0]  # same first forward
    assert plain.losses[1:] != noisy.losses[1:]
    frozen = train(tmp_path / "frozen", max_steps=10, weight_decay=0.0,
                   hooks=[{"name": "scale_gradients", "params": {"factor": 0.0}}])
    assert len(set(frozen.losses)) > 1  # batches differ, but weights stay at init:
    init = train(tmp_path / "init", max_steps=1, lr=1e-9, min_lr=0.0, weight_decay=0.0)
    assert abs(frozen.losses[0] - init.losses[0]) < 1e-6


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    class PoisonGradients(hooks_mod.UpdateHook):
        def apply(self, model, step):
            if step >= 3:
                next(model.parameters()).grad.fill_(float("nan"))

    monkeypatch.setitem(hooks_mod.UPDATE_HOOKS, "poison", PoisonGradients)
    with pytest.raises(SLMError, match=r"diverged: 3 non-finite steps in a row ending at step 6"):
        train(tmp_path, max_steps=20, max_nonfinite_steps=3, hooks=[{"name": "poison"}])
    ckpt = tmp_path / "checkpoints" / "latest"
    weights = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


class PoisonOneLoss(hooks_mod.ForwardHook):
    """Makes the first block's output NaN on the `at`-th training forward (the loss itself)."""

    def __init__(self, at: int = 4) -> None:
        self.at, self.calls, self._handles = at, 0, []

    def attach(self, model):
        def poison(module, inputs, output):
            if not module.training:
                return None
            self.calls += 1
            return output * float("nan") if self.calls == self.at else None
        self._handles.append(model.layers[0].register_forward_hook(poison))


def test_one_nonfinite_loss_is_skipped_and_training_carries_on(tmp_path, monkeypatch):
    monkeypatch.setitem(hooks_mod.FORWARD_HOOKS, "poison_loss", PoisonOneLoss)
    said = []
    cfg = tiny_experiment(tmp_path, max_steps=20, log_every=1, checkpoint_every=10)
    cfg["hooks"] = [{"name": "poison_loss", "params": {"at": 4}}]
    result = Trainer(ExperimentConfig.from_dict(cfg), say=said.append).run()
    assert result.losses and all(math.isfinite(x) for x in result.losses)
    assert len(result.losses) == 19  # 20 steps, the 4th skipped: its NaN loss never reached the weights
    assert any("step 4 has a non-finite loss" in m and "1 in this run" in m for m in said)
    weights = final_weights(tmp_path)
    assert all(torch.isfinite(t).all() for t in weights.values())
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    skipped = [r for r in rows if r["name"] == "train/skipped_nonfinite_total"]
    assert [(int(r["step"]), float(r["value"])) for r in skipped] == [(4, 1.0)]
    # the count survives in the checkpoint, so a resumed run keeps counting from it
    state = json.loads((tmp_path / "checkpoints" / "latest" / "trainer_state.json").read_text())
    assert state["skipped_nonfinite"] == 1


def _launch(tmp_path: Path, run_dir: Path, extra=(), checkpoint_every=5):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(tiny_experiment(run_dir, max_steps=60, checkpoint_every=checkpoint_every)))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, "-m", "simplified_slm.cli", "train", "--config", str(cfg_path),
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(run_dir: Path, steps: int, proc, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        csv_path = run_dir / "metrics.csv"
        if csv_path.exists() and csv_path.read_text().count("train/loss") >= steps:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("training did not progress")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    proc = _launch(tmp, tmp / "run")
    assert proc.wait(timeout=120) == 0, proc.communicate()
    return tmp / "run"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_to_the_same_model(tmp_path, sig, reference_run):
    reference = reference_run
    run_dir = tmp_path / "interrupted"
    # SIGTERM/SIGINT: no periodic checkpoints, so resuming can only use the one the signal wrote
    every = 5 if sig == signal.SIGKILL else 1000
    proc = _launch(tmp_path, run_dir, checkpoint_every=every)
    _wait_for_steps(run_dir, 3, proc)
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        out, err = proc.communicate()
        assert code == 130, err  # stopped cleanly after writing a checkpoint
        stopped = re.search(r"stopped at step (\d+) \(%s\)" % sig.name, out + err)
        assert stopped, out + err
        saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
        assert saved[-1] == f"step_{int(stopped.group(1)):08d}"  # (earlier ones: best-val saves)
        assert (run_dir / "checkpoints" / "latest").resolve().name == saved[-1]
        assert 3 <= int(stopped.group(1)) < 60
    proc = _launch(tmp_path, run_dir, ["--resume", "auto"], checkpoint_every=every)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    a, b = final_weights(reference), final_weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
