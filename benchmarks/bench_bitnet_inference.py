"""BitNet (seed 001 TinyLM) inference at batch 1: prefill and decode tokens/s.

Three runs of the same weights:

- `fp32 fake-quant`: the training model in eval mode (float weights, re-quantised once and
  cached, activations quantised per call);
- `int8 packed`: our BitLinears frozen on int8 ternary codes, `torch._int_mm` matmuls;
- `transformers`: stock transformers' BitNetForCausalLM loaded from our `export_hf`
  folder (packed uint8 weights, unpacked on every call);

plus our int8 model with multi-head latent attention at the same width (other weights:
transformers has no MLA). Each shape runs at configs/tinylm.json's 8192-token BPE vocab
and at the preset's 32000: the lm_head stays float32 in every variant (quantising it
would change the logits), so its share of the decode step bounds the int8 speed-up.

Also prints the generation-cache bytes per token of MHA, GQA and MLA at the preset's width.
The machine is shared: variants are interleaved round by round and medians reported, so
compare the ratios, not the absolute figures. Writes benchmarks/results/bench_bitnet_inference.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from simplified_slm.export.hf import export_hf
from simplified_slm.models.bitnet import BitNetConfig, BitNetForCausalLM, cache_bytes_per_token

RESULTS = Path(__file__).resolve().parent / "results" / "bench_bitnet_inference.json"


def ours_runner(model: BitNetForCausalLM, prompt: torch.Tensor, new_tokens: int) -> Callable[[], tuple[float, float]]:
    """(prefill seconds, decode seconds) of one greedy generation with our cache."""
    def run() -> tuple[float, float]:
        cache = model.make_cache(1, prompt.shape[1] + new_tokens)
        start = time.perf_counter()
        nxt = model(prompt, cache=cache).logits[:, -1:].argmax(-1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            nxt = model(nxt, cache=cache).logits[:, -1:].argmax(-1)
        return prefill, time.perf_counter() - start
    return run


def hf_runner(model, prompt: torch.Tensor, new_tokens: int) -> Callable[[], tuple[float, float]]:
    """The same loop on a transformers model with its DynamicCache."""
    def run() -> tuple[float, float]:
        start = time.perf_counter()
        out = model(prompt, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        prefill = time.perf_counter() - start
        cache = out.cache
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(nxt, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        return prefill, time.perf_counter() - start
    return run


def cache_table(config: BitNetConfig, gqa_kv_heads: int) -> dict[str, dict[str, float]]:
    """Cache bytes/token (fp32, all layers) of MHA, GQA and MLA (default widths) at the config's width."""
    base = {k: v for k, v in config.to_dict().items() if k != "family"}
    base.update(attention="mha", num_key_value_heads=None, kv_lora_rank=None, q_lora_rank=None,
                qk_nope_head_dim=None, qk_rope_head_dim=None, v_head_dim=None)
    variants = {"MHA": BitNetConfig.from_dict(base),
                "GQA": BitNetConfig.from_dict({**base, "num_key_value_heads": gqa_kv_heads}),
                "MLA": BitNetConfig.from_dict({**base, "attention": "mla"})}
    mha = cache_bytes_per_token(variants["MHA"])
    table = {}
    for name, cfg in variants.items():
        size = cache_bytes_per_token(cfg)
        detail = (f"latent {cfg.mla_dims().kv_lora_rank} + rope key {cfg.mla_dims().qk_rope_head_dim}"
                  if name == "MLA" else f"2 x {cfg.kv_heads} heads x {cfg.dim_per_head}")
        table[name] = {"bytes_per_token": size, "vs_mha": mha / size, "per_layer": detail}
    return table


def measure(config: BitNetConfig, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Rows of the table for one model shape: tokens/s, speed-ups and logit differences."""
    torch.manual_seed(0)
    fake = BitNetForCausalLM(config).eval()
    packed = copy.deepcopy(fake).freeze_ternary(int8=True)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt))
    runners = {"fp32 fake-quant": ours_runner(fake, prompt, args.new_tokens),
               "int8 packed (ours)": ours_runner(packed, prompt, args.new_tokens)}
    with torch.no_grad():
        reference = fake(prompt).logits
        diffs = {"int8 packed (ours)": (packed(prompt).logits - reference).abs().max().item()}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_transformers:
            import transformers

            export_hf(fake, tmp)
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
            runners["transformers BitNet"] = hf_runner(hf, prompt, args.new_tokens)
            with torch.no_grad():
                diffs["transformers BitNet"] = (hf(prompt).logits - reference).abs().max().item()
        mla = BitNetForCausalLM(BitNetConfig.from_dict({**config.to_dict(), "attention": "mla",
                                                        "num_key_value_heads": None})).eval()
        runners["int8 packed, MLA"] = ours_runner(mla.freeze_ternary(int8=True), prompt, args.new_tokens)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
        with torch.no_grad():
            for run in runners.values():  # warm-up: caches, torch.compile in transformers' BitLinear
                run()
            for _ in range(args.rounds):  # interleaved, so load changes hit every variant alike
                for name, run in runners.items():
                    times[name].append(run())
    rows = {}
    for name, samples in times.items():
        rows[name] = {"prefill_tokens_per_s": statistics.median(args.prompt / p for p, _ in samples),
                      "decode_tokens_per_s": statistics.median(args.new_tokens / d for _, d in samples),
                      "max_logit_diff_vs_fp32": diffs.get(name)}
    base = rows["fp32 fake-quant"]
    for row in rows.values():
        row["prefill_vs_fp32"] = row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        row["decode_vs_fp32"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    rows["fp32 fake-quant"]["max_logit_diff_vs_fp32"] = 0.0
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tinylm", help="bitnet preset (MHA/GQA: transformers has no MLA)")
    parser.add_argument("--vocabs", type=int, nargs="+", default=[8192, 32000],
                        help="vocabulary sizes to run: 8192 is configs/tinylm.json's BPE, 32000 the preset's "
                             "(Llama 2's); the float lm_head is a fixed cost both paths share")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gqa-kv-heads", type=int, default=4, help="kv heads of the GQA row of the cache table")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    runs = {}
    for vocab in args.vocabs:
        config = BitNetConfig.preset(args.preset, vocab_size=vocab)
        with torch.device("meta"):
            params = BitNetForCausalLM(config).num_parameters()
        rows = measure(config, args)
        runs[str(vocab)] = {"parameters": params, "results": rows}
        print(f"\nbitnet preset '{args.preset}', vocab {vocab}: {params / 1e6:.1f}M parameters, batch 1, "
              f"prompt {args.prompt}, {args.new_tokens} decoded tokens x {args.rounds} rounds, "
              f"{args.threads} threads (shared machine)")
        print(f"{'variant':<22}{'prefill tok/s':>15}{'x fp32':>8}{'decode tok/s':>14}{'x fp32':>8}{'max |dlogit|':>14}")
        for name, row in rows.items():
            diff = row["max_logit_diff_vs_fp32"]
            print(f"{name:<22}{row['prefill_tokens_per_s']:>15.1f}{row['prefill_vs_fp32']:>8.2f}"
                  f"{row['decode_tokens_per_s']:>14.2f}{row['decode_vs_fp32']:>8.2f}"
                  f"{'other weights' if diff is None else f'{diff:.2e}':>14}")
    config = BitNetConfig.preset(args.preset)
    caches = cache_table(config, args.gqa_kv_heads)
    print(f"\ngeneration cache per token (fp32, {config.num_hidden_layers} layers, width {config.hidden_size})")
    for name, row in caches.items():
        print(f"{name:<5}{row['bytes_per_token']:>8} bytes  {row['vs_mha']:>5.2f}x smaller than MHA  ({row['per_layer']})")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "preset": args.preset, "prompt_tokens": args.prompt, "decoded_tokens": args.new_tokens,
        "rounds": args.rounds, "threads": args.threads, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "by_vocab": runs, "cache_bytes_per_token": caches,
    }, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
