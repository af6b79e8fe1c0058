"""MatMul-free model benchmarks (issue: MatMul-free core, must-show 3 and 5).

1. Training tokens/s of SimplifiedSLMConfig.small() vs a `gpt` of (nearly) equal parameter
   count at the same batch x context, and the cost of fake quantization (the same HGRN
   model with BitLinear's quantizers switched off).
2. Packed ternary size vs fp16, decode tokens/s (fake-quant float vs packed codes, float
   and int8 matmul), and the resident memory inference needs from float vs packed weights (each in a
   fresh subprocess so the numbers do not contaminate each other).

Prints a table and writes JSON (default benchmarks/results/hgrn_bit.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from simplified_slm.export.ternary import load_packed, save_packed
from simplified_slm.layers.bitlinear import BitLinear
from simplified_slm.models import CausalLM, GPTConfig, SimplifiedSLMConfig, build_model
from simplified_slm.models.base import next_token_loss


@contextmanager
def quantization_off():
    """BitLinear without its quantizers (norm + float matmul): the overhead baseline."""
    original = BitLinear.forward

    def plain(self, x):
        return F.linear(self.norm(x) if self.norm is not None else x, self.weight, self.bias)

    BitLinear.forward = plain
    try:
        yield
    finally:
        BitLinear.forward = original


def train_tokens_per_s(model: CausalLM, batch: int, context: int, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randint(0, model.config.vocab_size, (batch, context))
    y = torch.randint(0, model.config.vocab_size, (batch, context))
    times = []
    model.train()
    for i in range(steps + 2):
        start = time.perf_counter()
        next_token_loss(model(x).logits, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return batch * context / statistics.median(times)


@torch.no_grad()
def decode_tokens_per_s(model: CausalLM, new_tokens: int) -> float:
    prompt = torch.randint(0, 256, (1, 16))
    model.generate(prompt, 8, greedy=True)  # warm-up
    start = time.perf_counter()
    model.generate(prompt, new_tokens, greedy=True)
    return new_tokens / (time.perf_counter() - start)


RSS_CHILD = """
import sys, torch
from simplified_slm.export.ternary import load_packed
from simplified_slm.models import CausalLM
def rss_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
torch.randint(0, 256, (1, 16)).float().sum()  # touch torch's lazy init before the baseline
before = rss_kib()
model = load_packed(sys.argv[2]) if sys.argv[1] == "packed" else CausalLM.from_pretrained(sys.argv[2]).eval()
with torch.no_grad():
    model.generate(torch.randint(0, 256, (1, 16)), 32, greedy=True)
print(rss_kib() - before)
"""


def rss_growth_mib(kind: str, directory: str) -> float:
    """Resident memory a fresh process gains by loading the model and decoding 32 tokens."""
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, kind, directory], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--decode_tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/results/hgrn_bit.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    hgrn = build_model(SimplifiedSLMConfig.preset(args.preset))
    n = hgrn.num_parameters()
    # a gpt of the same width/depth whose MLP is sized to match the parameter count
    width, layers = hgrn.config.hidden_size, hgrn.config.num_hidden_layers
    per_layer = (n - 2 * 256 * width - args.context * width) / layers
    d_ff = int((per_layer - 4 * width * width) / (2 * width))
    gpt = build_model(GPTConfig(vocab_size=256, n_layers=layers, d_model=width, n_heads=max(1, width // 64),
                                d_ff=d_ff, context_length=args.context, dropout=0.0, bias=False,
                                tie_embeddings=False))
    rows = {}
    rows["hgrn_bit train tok/s"] = train_tokens_per_s(hgrn, args.batch, args.context, args.steps)
    with quantization_off():
        rows["hgrn (quant off) train tok/s"] = train_tokens_per_s(hgrn, args.batch, args.context, args.steps)
    rows["gpt train tok/s"] = train_tokens_per_s(gpt, args.batch, args.context, args.steps)

    hgrn.eval()
    rows["decode tok/s fake-quant fp32"] = decode_tokens_per_s(hgrn, args.decode_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        float_dir, packed_dir = f"{tmp}/float", f"{tmp}/packed"
        hgrn.save_pretrained(float_dir)
        sizes = save_packed(hgrn, packed_dir)
        rows["decode tok/s packed (float matmul)"] = decode_tokens_per_s(load_packed(packed_dir), args.decode_tokens)
        rows["decode tok/s packed (int8 _int_mm)"] = decode_tokens_per_s(load_packed(packed_dir, int8=True),
                                                                         args.decode_tokens)
        rss_float, rss_packed = rss_growth_mib("float", float_dir), rss_growth_mib("packed", packed_dir)
        float_file = (Path(float_dir) / "model.safetensors").stat().st_size
    result = {
        "machine": {"threads": args.threads, "torch": torch.__version__},
        "preset": args.preset, "batch": args.batch, "context": args.context,
        "params": {"hgrn_bit": n, "gpt": gpt.num_parameters(), "gpt_d_ff": d_ff},
        "throughput": rows,
        "ratios": {
            "hgrn_bit / gpt train speed": rows["hgrn_bit train tok/s"] / rows["gpt train tok/s"],
            "quantization overhead (1 - quant/noquant)":
                1 - rows["hgrn_bit train tok/s"] / rows["hgrn (quant off) train tok/s"],
            "packed linear weights vs fp16 (x smaller)":
                sizes["linear_weights_fp16_bytes"] / sizes["linear_weights_packed_bytes"],
        },
        "sizes_bytes": {**sizes, "float32_safetensors_file": float_file},
        "rss_growth_mib_inference": {"float": rss_float, "packed": rss_packed},
    }
    print(f"{'metric':48s} value")
    for k, v in {**rows, **result["ratios"]}.items():
        print(f"{k:48s} {v:,.3f}")
    print(f"{'params hgrn_bit / gpt':48s} {n:,} / {gpt.num_parameters():,}")
    print(f"{'RSS growth MiB inference float / packed':48s} {rss_float:.1f} / {rss_packed:.1f}")
    print(f"{'file bytes float32 / packed':48s} {float_file:,} / {sizes['file_bytes']:,}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
