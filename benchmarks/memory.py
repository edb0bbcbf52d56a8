"""Memory at the released shapes: KV cache bytes per token, the longest context that fits on a card, and the
measured peak of one denoising step at the released vocabulary.

    python benchmarks/memory.py                    # layout tables (arithmetic from the config, instant)
    python benchmarks/memory.py --check            # + today's KVCache measured on a scaled model
    python benchmarks/memory.py --step             # + step memory: hidden 64, vocab 262,144, canvas 256
    python benchmarks/memory.py --step --batch 8 --canvas 64 --impl fast --dtype bfloat16

KV cache, released shapes (30 layers: 25 sliding with 8 KV heads x 256, 5 full with 2 KV heads x 512,
window 1024), cache in bf16 whatever the weight format (letterpress quantizes weights, not the cache):

- before: today's `KVCache`: every position on every layer, `max_model_len` positions preallocated per slot;
- after: the paged cache (`letterpress/cache.py`): full layers keep every position, sliding layers only the
  blocks the window and the chunk being encoded can see, rounded up to blocks. Computed from the layout
  here; `tests/test_paged_cache.py` checks the paged cache's own bytes against it and measures its pool
  on a scaled model with a row 60 windows long.

Fit on a card: vLLM's default `--gpu-memory-utilization 0.9` of the card, minus the weights
(`letterpress.quant.projected_bytes`), minus the step's working set at batch 1 (two [256, vocab] float32
tensors, the bound measured by `--step`, plus one full layer's keys and values gathered for attention)
is the KV budget of one row. Contexts are capped at 262,144 tokens, the model's maximum.

Step memory (`--step`): one `Runner` step (self-conditioning, decoder, LM head, sampler, state update) of a
model with the released vocabulary and a scaled hidden size, measured by `letterpress.profiling.
AllocationPeak`: the peak of bytes allocated during the step and live at once, from every allocation of
torch's CPU allocator (op-internal buffers included), in units of one [canvas, vocab] float32 tensor per
row. The step measured is the third, so the previous step's self-conditioning state exists (it is not
counted: it was allocated before the step).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from common import REAL_26B, machine, set_threads, text_config

GIB = 2**30
KIB = 2**10
CARDS = [("24 GiB card (RTX 4090)", 24 * GIB, "int4"), ("80 GiB card (H100)", 80 * GIB, "bf16"),
         ("80 GiB card (H100)", 80 * GIB, "fp8")]
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default
MAX_CONTEXT = 262_144  # the released model's max_position_embeddings (vLLM: --max-model-len 262144)


# ------------------------------------------------------------------------------------------------ layout
def kv_bytes_per_token(text, cache_bytes: int = 2) -> dict[str, dict]:
    """Keys + values of one token on one layer of each type, and over all layers of that type."""
    out: dict[str, dict] = {}
    for spec in text.layers:
        entry = out.setdefault(spec.layer_type, {"layers": 0, "kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
                                                 "per_layer": 2 * spec.num_kv_heads * spec.head_dim * cache_bytes})
        entry["layers"] += 1
    for entry in out.values():
        entry["all_layers"] = entry["layers"] * entry["per_layer"]
    return out


def sliding_kept(text, block: int, chunk: int) -> int:
    """Positions a sliding layer of a paged cache holds for one row at most: the last window - 1 prefix
    tokens that a canvas or the next chunk can see, plus the chunk being encoded, in whole blocks (+1 for
    a partly filled first block)."""
    return (math.ceil((text.sliding_window - 1 + chunk) / block) + 1) * block


def row_bytes(text, tokens: int, layout: str, block: int = 16, chunk: int = 2048, cache_bytes: int = 2) -> int:
    """KV bytes one row of `tokens` tokens holds: 'before' (every position on every layer) or 'after' (paged)."""
    per = kv_bytes_per_token(text, cache_bytes)
    full = sum(e["all_layers"] for t, e in per.items() if t != "sliding_attention")
    sliding = per.get("sliding_attention", {"all_layers": 0})["all_layers"]
    if layout == "before":
        return tokens * (full + sliding)
    return math.ceil(tokens / block) * block * full + min(math.ceil(tokens / block) * block, sliding_kept(text, block, chunk)) * sliding


def attention_gather_bytes(text, tokens: int, cache_bytes: int = 2) -> int:
    """The decoder concatenates a layer's cached keys and values with the canvas's: one full layer's copy."""
    per = kv_bytes_per_token(text, cache_bytes)
    return tokens * max(e["per_layer"] for e in per.values())


def longest_context(text, budget: int, layout: str, block: int, chunk: int) -> int:
    """Largest token count (<= MAX_CONTEXT) whose row bytes plus the attention gather fit in `budget`."""
    lo, hi = 0, MAX_CONTEXT
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if row_bytes(text, mid, layout, block, chunk) + attention_gather_bytes(text, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def layout_report(block: int, chunk: int, canvas: int = 256, step_units: float = 2.0) -> dict:
    from letterpress.quant import projected_bytes

    text = text_config(REAL_26B)
    per = kv_bytes_per_token(text)
    step_bytes = int(step_units * canvas * text.vocab_size * 4)
    fits = []
    for card, size, fmt in CARDS:
        weights = projected_bytes(text, None if fmt == "bf16" else fmt)["bytes"]
        budget = int(GPU_MEMORY_UTILIZATION * size - weights - step_bytes)
        before = longest_context(text, budget, "before", block, chunk)
        after = longest_context(text, budget, "after", block, chunk)
        full_row = row_bytes(text, MAX_CONTEXT, "after", block, chunk)
        fits.append({"card": card, "format": fmt, "weights_gib": weights / GIB, "kv_budget_gib": budget / GIB,
                     "before_tokens": before, "after_tokens": after,
                     # rows of 262,144 tokens at once: each with its KV blocks and its share of the step
                     "after_rows_at_max_context": max(0, int(GPU_MEMORY_UTILIZATION * size - weights)
                                                      - attention_gather_bytes(text, MAX_CONTEXT)) // (full_row + step_bytes)})
    full = sum(e["all_layers"] for t, e in per.items() if t != "sliding_attention")
    return {"per_token": per, "before_per_token_kib": sum(e["all_layers"] for e in per.values()) / KIB,
            "after_per_token_beyond_window_kib": full / KIB,
            "after_sliding_fixed_mib": sliding_kept(text, block, chunk) * per["sliding_attention"]["all_layers"] / 2**20,
            "row_at_max_context_gib": {"before": row_bytes(text, MAX_CONTEXT, "before") / GIB,
                                       "after": row_bytes(text, MAX_CONTEXT, "after", block, chunk) / GIB},
            "eight_slots_of_8k_before_gib": 8 * row_bytes(text, 8192, "before") / GIB,
            "step_reserve_gib": step_bytes / GIB, "fits": fits}


def print_layout(report: dict, block: int, chunk: int) -> None:
    print(f"KV cache per token, released shapes (bf16 cache; block {block}, prefill chunk {chunk}):")
    for layer_type, e in report["per_token"].items():
        print(f"  {layer_type:18s} {e['layers']:2d} layers x {e['kv_heads']} KV heads x {e['head_dim']}: "
              f"{e['per_layer'] / KIB:.0f} KiB/token/layer, {e['all_layers'] / KIB:.0f} KiB/token over those layers")
    print(f"  before: {report['before_per_token_kib']:.0f} KiB per token per row (every position on every layer)")
    print(f"  after:  {report['after_per_token_beyond_window_kib']:.0f} KiB per token beyond the window, plus "
          f"{report['after_sliding_fixed_mib']:.0f} MiB of sliding-layer blocks per row")
    rows = report["row_at_max_context_gib"]
    print(f"  one 262,144-token row: {rows['before']:.1f} GiB before, {rows['after']:.2f} GiB after; "
          f"8 slots x 8K preallocated before: {report['eight_slots_of_8k_before_gib']:.1f} GiB")
    print(f"\nLongest context of one row (x {GPU_MEMORY_UTILIZATION} of the card, minus weights, minus a "
          f"{report['step_reserve_gib']:.2f} GiB step reserve and one full layer's attention gather; cap 262,144):")
    print(f"  {'card':24s} {'weights':>8s} {'weights GiB':>11s} {'KV budget GiB':>13s} {'before':>9s} {'after':>9s} "
          f"{'rows at 262K after':>18s}")
    for f in report["fits"]:
        print(f"  {f['card']:24s} {f['format']:>8s} {f['weights_gib']:11.1f} {f['kv_budget_gib']:13.1f} "
              f"{f['before_tokens']:9,d} {f['after_tokens']:9,d} {f['after_rows_at_max_context']:18d}")


# ------------------------------------------------------------------------------------------- scaled check
def check_scaled_cache(slots: int = 2, capacity: int = 512) -> dict:
    """Today's KVCache on a scaled model with the released layout: measured bytes per token per row against
    `row_bytes(..., 'before')` (the paged cache is checked against 'after' in tests/test_paged_cache.py)."""
    from letterpress.cache import KVCache

    shape = dict(REAL_26B, hidden_size=64, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                 top_k_experts=2, vocab_size=512, num_attention_heads=8)
    text = text_config(shape)
    cache = KVCache(text, slots, capacity, torch.bfloat16, "cpu")
    measured = sum(t.nbytes for t in cache.keys + cache.values) / (slots * capacity)
    return {"measured_bytes_per_token": measured, "layout_bytes_per_token": row_bytes(text, 1, "before")}


# -------------------------------------------------------------------------------------------- step memory
def scaled_model(vocab: int, hidden: int, canvas: int, dtype: torch.dtype, seed: int = 0):
    """Two layers (one sliding, one full) of the released layout with a small hidden size and the real vocabulary."""
    from letterpress.config import model_config_from_dict
    from letterpress.model import DiffusionGemma

    text = dict(model_type="diffusion_gemma_text", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=64,
                num_global_key_value_heads=1, sliding_window=64, num_experts=4, top_k_experts=2,
                moe_intermediate_size=hidden, layer_types=["sliding_attention", "full_attention"],
                max_position_embeddings=4096, final_logit_softcapping=30.0)
    config = model_config_from_dict({"model_type": "diffusion_gemma", "canvas_length": canvas, "text_config": text})
    model = DiffusionGemma(config).init_weights(std=0.5, generator=torch.Generator().manual_seed(seed))
    return model.to(dtype).eval()


def measure_step(model, impl: str, batch: int, prompt: int = 16, step: int = 2) -> dict:
    """Peak bytes allocated during one runner step (the `step`-th denoising step, 0-based) of `batch` rows."""
    from letterpress.config import GenerationDefaults
    from letterpress.engine.request import Request, SamplingParams
    from letterpress.engine.runner import Row, Runner
    from letterpress.model.fast import apply_fast_path, apply_plain_path
    from letterpress.profiling import AllocationPeak
    from letterpress.sampling import GeneratorDraws

    (apply_fast_path if impl == "fast" else apply_plain_path)(model)
    canvas, vocab = model.config.canvas_length, model.text_config.vocab_size
    runner = Runner(model, batch, prompt + 2 * canvas, impl=impl)
    # never stops early: the measured step always has every row denoising
    params = SamplingParams(max_new_tokens=canvas, max_denoising_steps=step + 2, stability_threshold=step + 2,
                            seed=0).resolve(GenerationDefaults())
    rows = [Row(request=Request(list(range(3, 3 + prompt)), params, GeneratorDraws(i)), slot=i,
                pending=list(range(3, 3 + prompt))) for i in range(batch)]
    with torch.inference_mode():
        for _ in range(step):  # encode + first steps: afterwards every row carries self-conditioning state
            runner.step(rows)
        assert all(r.denoising and r.sc_logits is not None for r in rows)
        with AllocationPeak() as peak:
            runner.step(rows)
    unit = canvas * vocab * 4
    return {"impl": impl, "dtype": str(model.dtype).replace("torch.", ""), "batch": batch, "canvas": canvas,
            "vocab": vocab, "hidden": model.text_config.hidden_size, "peak_bytes": peak.peak,
            "peak_gib": peak.peak / GIB, "units_per_row": peak.peak / (batch * unit)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-size", type=int, default=16, help="paged-cache block (vLLM's default 16)")
    parser.add_argument("--prefill-chunk", type=int, default=2048, help="tokens encoded per step (the runner's default)")
    parser.add_argument("--check", action="store_true", help="measure today's KVCache on a scaled model")
    parser.add_argument("--step", action="store_true", help="measure one denoising step's peak memory")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--impl", nargs="+", default=["plain", "fast"], choices=["plain", "fast"])
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args()
    set_threads(1)  # AllocationPeak sees the allocating thread only
    report = {"machine": machine(), "layout": layout_report(args.block_size, args.prefill_chunk)}
    if args.check:
        report["scaled_check"] = check_scaled_cache()
    if args.step:
        report["step"] = []
        for dtype in args.dtype:
            model = scaled_model(args.vocab, args.hidden, args.canvas, getattr(torch, dtype))
            for batch in args.batch:
                for impl in args.impl:
                    report["step"].append(measure_step(model, impl, batch))
                    if not args.json:
                        r = report["step"][-1]
                        print(f"step {r['impl']:5s} {r['dtype']:8s} batch {r['batch']}: peak {r['peak_gib']:.2f} GiB "
                              f"= {r['units_per_row']:.2f} x [{r['canvas']}, {r['vocab']}] float32 per row", flush=True)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(report["machine"])
    print_layout(report["layout"], args.block_size, args.prefill_chunk)
    if args.check:
        c = report["scaled_check"]
        print(f"\nscaled check (today's KVCache, released layout, hidden 64): {c['measured_bytes_per_token'] / KIB:.0f} "
              f"KiB/token measured, {c['layout_bytes_per_token'] / KIB:.0f} KiB/token from the layout")


if __name__ == "__main__":
    main()
