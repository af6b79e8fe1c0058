"""Gradient checkpointing: activation memory saved for backward, peak RSS and step time.

For each family, one training step (forward + backward) of the same model with and without
`train.gradient_checkpointing`; "saved MB" counts every tensor autograd keeps for backward
(exact, from saved-tensor hooks), "peak RSS MB" is the process's high-water mark measured in a
fresh subprocess per variant (CPU has no allocator counter like CUDA's max_memory_allocated).

    python benchmarks/bench_grad_checkpointing.py     # ~1-2 minutes on 2 cores
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from simplified_slm.utils.memory import peak_rss_bytes

RESULTS = Path(__file__).parent / "results" / "bench_grad_checkpointing.json"
MODELS = {
    "gpt": {"family": "gpt", "n_layers": 8, "d_model": 256, "n_heads": 8, "context_length": 512},
    "llama": {"family": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 8,
              "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 512},
    "hgrn_bit": {"family": "hgrn_bit", "hidden_size": 256, "num_hidden_layers": 8},
}
BATCH, LENGTH, VOCAB = 8, 512, 256


def one_step(family: str, checkpointing: bool) -> dict:
    from simplified_slm.models.base import next_token_loss
    from simplified_slm.models.checkpointing import enable_gradient_checkpointing, saved_activation_bytes
    from simplified_slm.models.registry import build_model

    torch.manual_seed(0)
    model = build_model({**MODELS[family], "vocab_size": VOCAB}).train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    x = torch.randint(0, VOCAB, (BATCH, LENGTH))
    box = []
    started = time.perf_counter()
    saved = saved_activation_bytes(model, lambda: box.append(next_token_loss(model(x).logits, x)))
    box[0].backward()
    seconds = time.perf_counter() - started
    rss = peak_rss_bytes() / 2**20
    return {"saved_mb": saved / 2**20, "peak_rss_mb": rss, "step_s": seconds}


def main() -> None:
    if len(sys.argv) == 3:  # child: one measurement
        torch.set_num_threads(2)
        print(json.dumps(one_step(sys.argv[1], sys.argv[2] == "1")))
        return
    rows = []
    for family in MODELS:
        for ckpt in (False, True):
            out = subprocess.run([sys.executable, __file__, family, str(int(ckpt))], capture_output=True,
                                 text=True, check=True).stdout
            rows.append({"family": family, "checkpointing": ckpt, **json.loads(out.strip().splitlines()[-1])})
    print(f"batch {BATCH} x {LENGTH} tokens, 8 blocks")
    print(f"{'family':<9} {'ckpt':<5} {'saved MB':>9} {'peak RSS MB':>12} {'step s':>7}")
    for r in rows:
        print(f"{r['family']:<9} {str(r['checkpointing']):<5} {r['saved_mb']:>9.0f} {r['peak_rss_mb']:>12.0f} "
              f"{r['step_s']:>7.2f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
