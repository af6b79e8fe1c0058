"""BitNet (TinyLM) inference at batch 1: prefill and decode tokens/s.

Runs of the same weights, ours timed through `model.generate(greedy=True)` as a user calls
it (prefill = prompt to first token, decode = the tokens after it, from `on_token` times):

- `fp32 fake-quant`: the training model in eval mode (float weights, re-quantised once and
  cached, activations quantised per call);
- `int8 packed`: our BitLinears frozen on int8 ternary codes, `torch._int_mm` matmuls,
  q/k/v and gate/up each one stacked matmul (`sibling_projections`);
- both again with `compile=True` (the one-token decode step through `torch.compile`; the
  one-off compilation is timed apart and reported, not counted);
- `transformers`: stock transformers' BitNetForCausalLM loaded from our `export_hf`
  folder (packed uint8 weights, unpacked on every call), its own cached loop;

plus our int8 model with multi-head latent attention at the same width (other weights:
transformers has no MLA). Every row but MLA must produce fp32's greedy tokens
(`same_tokens_as_fp32`). Each shape runs at configs/tinylm.json's 8192-token BPE vocab
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


def ours_runner(model: BitNetForCausalLM, prompt: torch.Tensor, new_tokens: int,
                compile: bool = False) -> Callable[[], tuple[float, float, torch.Tensor]]:
    """(prefill seconds, decode seconds, tokens) of one greedy `model.generate` call.

    Prefill ends when the first new token arrives; decode is the remaining new_tokens - 1.
    """
    def run() -> tuple[float, float, torch.Tensor]:
        stamps: list[float] = []
        start = time.perf_counter()
        out = model.generate(prompt, new_tokens, greedy=True, compile=compile,
                             on_token=lambda _: stamps.append(time.perf_counter()))
        return stamps[0] - start, stamps[-1] - stamps[0], out[:, prompt.shape[1]:]
    return run


def warm_compiled(model: BitNetForCausalLM, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds of the one-off compilation: two generate calls of different lengths, after
    which the decode graph is dynamic in the cache length and size (no more recompiles)."""
    start = time.perf_counter()
    for extra in (0, 3):
        model.generate(prompt, new_tokens + extra, greedy=True, compile=True)
    return time.perf_counter() - start


def hf_runner(model, prompt: torch.Tensor, new_tokens: int) -> Callable[[], tuple[float, float, torch.Tensor]]:
    """The same greedy loop on a transformers model with its DynamicCache."""
    def run() -> tuple[float, float, torch.Tensor]:
        start = time.perf_counter()
        out = model(prompt, use_cache=True)
        tokens = [out.logits[:, -1:].argmax(-1)]
        prefill = time.perf_counter() - start
        cache = out.cache
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(tokens[-1], cache=cache, use_cache=True)
            cache = out.cache
            tokens.append(out.logits[:, -1:].argmax(-1))
        return prefill, time.perf_counter() - start, torch.cat(tokens, 1)
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


FP32, INT8 = "fp32 fake-quant", "int8 packed (ours)"
FP32_C, INT8_C = "fp32 fake-quant, compiled", "int8 packed, compiled"


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """Index of the first generated token where a and b differ; None if they agree."""
    differ = (a != b).flatten().nonzero()
    return int(differ[0]) if len(differ) else None


def measure(config: BitNetConfig, args: argparse.Namespace) -> dict[str, dict[str, float | bool | None]]:
    """Rows of the table for one model shape: tokens/s, speed-ups, logit and token checks."""
    torch.compiler.reset()  # the previous shape's graphs would count against dynamo's recompile limit
    torch.manual_seed(0)
    fake = BitNetForCausalLM(config).eval()
    packed = copy.deepcopy(fake).freeze_ternary(int8=True)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt))
    runners = {FP32: ours_runner(fake, prompt, args.new_tokens), INT8: ours_runner(packed, prompt, args.new_tokens)}
    compile_seconds = {}
    if not args.no_compile:
        runners[FP32_C] = ours_runner(fake, prompt, args.new_tokens, compile=True)
        runners[INT8_C] = ours_runner(packed, prompt, args.new_tokens, compile=True)
        compile_seconds = {FP32_C: warm_compiled(fake, prompt, args.new_tokens),
                           INT8_C: warm_compiled(packed, prompt, args.new_tokens)}
    with torch.no_grad():
        reference = fake(prompt).logits
        diffs = {INT8: (packed(prompt).logits - reference).abs().max().item()}
        diffs[INT8_C] = diffs[INT8]  # generate runs the prompt eagerly; only decode steps are compiled
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
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
        tokens: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for run in runners.values():  # warm-up: caches, torch.compile in transformers' BitLinear
                run()
            for _ in range(args.rounds):  # interleaved, so load changes hit every variant alike
                for name, run in runners.items():
                    prefill, decode, tokens[name] = run()
                    samples[name].append((prefill, decode))
    rows: dict[str, dict[str, float | bool | None]] = {}
    for name, times in samples.items():
        same_weights = "MLA" not in name
        rows[name] = {"prefill_tokens_per_s": statistics.median(args.prompt / p for p, _ in times),
                      "decode_tokens_per_s": statistics.median((args.new_tokens - 1) / d for _, d in times),
                      "max_logit_diff_vs_fp32": 0.0 if name.startswith(FP32) else diffs.get(name),
                      "same_tokens_as_fp32": torch.equal(tokens[name], tokens[FP32]) if same_weights else None,
                      "first_token_differing_from_fp32":
                          first_difference(tokens[name], tokens[FP32]) if same_weights else None,
                      "compile_seconds": compile_seconds.get(name)}
    for row in rows.values():
        row["prefill_vs_fp32"] = row["prefill_tokens_per_s"] / rows[FP32]["prefill_tokens_per_s"]
        row["decode_vs_fp32"] = row["decode_tokens_per_s"] / rows[FP32]["decode_tokens_per_s"]
    if INT8_C in rows:  # compiled int8 against fp32 compiled the same way: speed and exactness
        rows[INT8_C]["decode_vs_fp32_compiled"] = rows[INT8_C]["decode_tokens_per_s"] / rows[FP32_C]["decode_tokens_per_s"]
        rows[INT8_C]["same_tokens_as_fp32_compiled"] = torch.equal(tokens[INT8_C], tokens[FP32_C])
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
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows (about 2 minutes "
                                                                  "of compilation per vocab on 2 cores)")
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
        print(f"{'variant':<28}{'prefill tok/s':>14}{'x fp32':>8}{'decode tok/s':>14}{'x fp32':>8}"
              f"{'max |dlogit|':>14}{'fp32 tokens':>13}")
        for name, row in rows.items():
            diff, same = row["max_logit_diff_vs_fp32"], row["same_tokens_as_fp32"]
            print(f"{name:<28}{row['prefill_tokens_per_s']:>14.1f}{row['prefill_vs_fp32']:>8.2f}"
                  f"{row['decode_tokens_per_s']:>14.2f}{row['decode_vs_fp32']:>8.2f}"
                  f"{'other weights' if diff is None else f'{diff:.2e}':>14}{'-' if same is None else str(same):>13}")
        for name in (FP32_C, INT8_C):
            if name in rows:
                print(f"{name}: compilation {rows[name]['compile_seconds']:.0f} s once per model (not in the figures)")
        if INT8_C in rows:
            row = rows[INT8_C]
            print(f"int8 compiled vs fp32 compiled: {row['decode_vs_fp32_compiled']:.2f}x decode, same tokens: "
                  f"{row['same_tokens_as_fp32_compiled']}")
        for name, row in rows.items():
            if row.get("first_token_differing_from_fp32") is not None:
                print(f"{name}: greedy tokens leave fp32 eager's at token {row['first_token_differing_from_fp32']}")
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
