"""Step latency against the roofline: how far a denoising step is from reading every weight once.

A canvas of 256 tokens routes 256 x 8 (token, expert) pairs over 128 experts, so practically every expert
of every layer is read at every step: a step reads (almost) all ~25 B weights, whatever the batch.

    python benchmarks/roofline.py                 # theory for the real 26B-A4B shape + a measured scaled shape
    python benchmarks/roofline.py --moe           # the MoE methods of letterpress.model.fast, timed per shape

Without a GPU the real shape is not run: its bound is computed (H100 SXM: 3.35 TB/s HBM3, 989 TFLOP/s
dense bf16, 1979 TFLOP/s fp8/int8) and a scaled-down shape is measured on the CPU against the CPU's
own measured copy bandwidth and matmul rate. With a GPU, `--device cuda` runs the real shape with random
weights (written for it, untested: no GPU was available when this was written).
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from common import REAL_26B, interleaved, machine, median, set_threads, text_config

H100 = {"name": "H100 SXM", "bandwidth": 3.35e12, "bf16_flops": 989e12, "int8_flops": 1979e12}
FORMAT_BYTES = {"bf16": 2.0, "int8": 1.0, "fp8": 1.0, "int4": 0.5 + 4 / 64}  # int4: bf16 scale + zero per 64

# A scaled-down shape for the CPU: the 26B's layout (128 experts, top 8, 5 sliding : 1 full, canvas 256)
# with hidden, head and FFN sizes / 4, 6 layers and a 16 K vocabulary.
SCALED = dict(vocab_size=16_384, hidden_size=704, intermediate_size=528, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, head_dim=128, global_head_dim=256, num_global_key_value_heads=1, sliding_window=1024,
              num_experts=128, top_k_experts=8, moe_intermediate_size=176)


def step_costs(text, canvas: int = 256, context: int = 1024, batch: int = 1) -> dict[str, float]:
    """Weights read and FLOPs of one denoising step (a batch of canvases over `context` cached tokens)."""
    from letterpress.quant import projected_bytes

    sizes = projected_bytes(text, None, dtype_bytes=1)  # bytes at 1 byte/weight = weight count
    tokens = canvas * batch
    expert_params = 3 * text.hidden_size * text.moe_intermediate_size
    # expected experts hit per layer with uniform routing: E (1 - (1 - k/E)^tokens)
    hit = text.num_experts * (1 - (1 - text.top_k_experts / text.num_experts) ** tokens)
    experts_read = hit * expert_params * text.num_hidden_layers
    all_experts = text.num_experts * expert_params * text.num_hidden_layers
    read = sizes["params"] - all_experts + experts_read
    active = sizes["params"] - all_experts + text.top_k_experts * expert_params * text.num_hidden_layers
    active += text.vocab_size * text.hidden_size  # the self-conditioning matmul reads the embedding again
    attn_flops = sum(4 * tokens * (context + canvas) * text.num_attention_heads * s.head_dim for s in text.layers)
    return {"weights_read": read, "experts_hit_per_layer": hit, "flops": 2 * active * tokens + attn_flops}


def theory(batch: int) -> None:
    text = text_config(REAL_26B)
    c = step_costs(text, batch=batch)
    print(f"\nreal shape (26B-A4B, assumptions in letterpress/quant.py), batch {batch}, canvas 256, context 1024:")
    print(f"  weights read per step {c['weights_read'] / 1e9:.2f} B "
          f"({c['experts_hit_per_layer']:.1f} of {text.num_experts} experts hit per layer), "
          f"{c['flops'] / 1e12:.2f} TFLOP per step")
    for fmt, nbytes in FORMAT_BYTES.items():
        mem = c["weights_read"] * nbytes / H100["bandwidth"]
        flops = H100["bf16_flops"] if fmt in ("bf16", "int4") else H100["int8_flops"]
        compute = c["flops"] / flops
        print(f"  {fmt:5s} {H100['name']}: memory bound {mem * 1e3:6.2f} ms, compute bound {compute * 1e3:6.2f} ms "
              f"-> step >= {max(mem, compute) * 1e3:6.2f} ms; at 16 accepted tokens/step <= "
              f"{16 * batch / max(mem, compute):7.0f} tok/s")


def measure_bandwidth(mib: int = 512) -> float:
    a = torch.empty(mib * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t)
    return 2 * a.numel() * 4 / min(times)  # read + write


def measure_matmul(dtype: torch.dtype, n: int = 1024) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    t = time.perf_counter()
    reps = 5
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def measured(args) -> None:
    from letterpress.config import model_config_from_dict
    from letterpress.fast_sampling import fused_denoise_step
    from letterpress.model import DiffusionGemma
    from letterpress.model.fast import apply_fast_path
    from letterpress.quant import model_bytes, quantize_model
    from letterpress.sampling import GeneratorDraws

    shape = REAL_26B if args.device == "cuda" else SCALED
    device = torch.device(args.device)
    config = model_config_from_dict({"model_type": "diffusion_gemma", "canvas_length": args.canvas,
                                     "text_config": {"model_type": "diffusion_gemma_text", **shape}})
    text = config.text
    costs = step_costs(text, canvas=args.canvas, context=args.context, batch=args.batch)
    print(f"\nmeasured: {'real' if args.device == 'cuda' else 'scaled-down (CPU)'} shape on {args.device}, "
          f"batch {args.batch}, canvas {args.canvas}, context {args.context}: "
          f"{costs['weights_read'] / 1e6:.0f} M weights read, {costs['flops'] / 1e9:.1f} GFLOP per step")
    if device.type == "cpu":
        bw = measure_bandwidth()
        rates = {d: measure_matmul(d) for d in (torch.float32, torch.bfloat16)}
        print(f"  this CPU: copy bandwidth {bw / 1e9:.1f} GB/s, matmul {rates[torch.float32] / 1e9:.0f} GFLOP/s fp32, "
              f"{rates[torch.bfloat16] / 1e9:.0f} GFLOP/s bf16 ({torch.get_num_threads()} threads)")
    else:  # pragma: no cover - GPU only
        bw, rates = H100["bandwidth"], {torch.bfloat16: H100["bf16_flops"]}

    variants = {"bf16": None, "int8": "int8", "int4": "int4"}
    if device.type == "cuda" or args.fp8:
        variants["fp8"] = "fp8"
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, text.vocab_size, (args.batch, args.context), generator=g).to(device)
    canvas = torch.randint(0, text.vocab_size, (args.batch, args.canvas), generator=g).to(device)
    steps, sizes = {}, {}
    for name, fmt in variants.items():
        with torch.device("meta"):
            model = DiffusionGemma(config).to(torch.bfloat16)
        model = model.to_empty(device=device)
        model.init_rope()
        model.init_weights(std=0.02, generator=None)
        quantize_model(model, fmt)
        apply_fast_path(model)
        sizes[name] = model_bytes(model)
        cache = model.new_cache(args.batch, args.context + args.canvas)
        with torch.inference_mode():
            model.encode(prompt, cache)
        draws = [GeneratorDraws(i, device) for i in range(args.batch)]
        temps, bounds = torch.full((args.batch,), 0.8), torch.full((args.batch,), 0.1)

        def step(model=model, cache=cache, draws=draws):
            with torch.inference_mode():
                logits = model.denoise(canvas, cache)
                fused_denoise_step(logits, temps, bounds, draws, [0] * args.batch, [0] * args.batch,
                                   sc_dtype=torch.bfloat16)
            if device.type == "cuda":  # pragma: no cover
                torch.cuda.synchronize()

        steps[name] = step
    times = interleaved(steps, args.repeats, warmup=1)
    for name, fmt in variants.items():
        t = median(times[name])
        weight_bytes = costs["weights_read"] * FORMAT_BYTES[name]
        mem_bound = weight_bytes / bw
        compute_bound = costs["flops"] / rates[torch.bfloat16]
        print(f"  {name:5s} weights {sizes[name] / 2**20:8.1f} MiB  step {t * 1e3:8.1f} ms   "
              f"memory bound {mem_bound * 1e3:7.1f} ms ({t / mem_bound:5.1f}x)   "
              f"bf16 compute bound {compute_bound * 1e3:7.1f} ms ({t / compute_bound:5.1f}x)")


def moe_methods(args) -> None:
    """The MoE implementations of letterpress.model.fast, one layer's experts, timed interleaved."""
    from letterpress.model.fast import grouped_mm_supported, moe_forward
    from letterpress.model.layers import Experts

    shapes = {  # name: (hidden, experts, top_k, moe_intermediate, tokens, dtype)
        "embedded (64-token canvas)": (128, 8, 2, 64, 64, torch.float32),
        "medium (64-token canvas)": (256, 16, 4, 128, 64, torch.float32),
        "medium, batch 8": (256, 16, 4, 128, 512, torch.float32),
        "scaled 26B (256 tokens)": (704, 128, 8, 176, 256, torch.float32),
        "26B layer, 64 tokens, bf16": (2816, 128, 8, 704, 64, torch.bfloat16),
    }
    print("\nMoE methods (one layer's experts; time per call, speed-up over the plain loop):")
    for name, (h, e, k, i, n, dtype) in shapes.items():
        g = torch.Generator().manual_seed(0)
        gate_up = (torch.randn(e, 2 * i, h, generator=g) * 0.05).to(dtype)
        down = (torch.randn(e, h, i, generator=g) * 0.05).to(dtype)
        x = torch.randn(n, h, generator=g).to(dtype)
        w, idx = torch.topk(torch.softmax(torch.randn(n, e, generator=g), -1), k)
        w = w / w.sum(-1, keepdim=True)
        plain = SimpleNamespace(gate_up_proj=gate_up, down_proj=down, impl="loop")  # the plain path's state
        cands = {"loop": lambda: Experts.forward(plain, x, w, idx)}
        for method in ("grouped_mm", "sorted", "bmm"):
            if method == "grouped_mm" and not grouped_mm_supported(x.device, dtype):
                continue
            cands[method] = lambda m=method: moe_forward(gate_up, down, x, w, idx, m)
        reps = max(5, min(args.repeats * 10, int(2e10 / (n * k * 3 * h * i * 2 + 1))))
        times = interleaved(cands, reps, warmup=1)
        base = median(times["loop"])
        print(f"  {name:28s} " + "  ".join(f"{m} {median(t) * 1e3:7.2f} ms ({base / median(t):4.2f}x)" for m, t in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fp8", action="store_true", help="also time fp8 on the CPU (emulated W8A8, slow)")
    parser.add_argument("--moe", action="store_true", help="time the MoE methods instead")
    args = parser.parse_args()
    set_threads(args.threads)
    print(f"machine: {machine()}")
    if args.moe:
        moe_methods(args)
        return
    for batch in (1, 8):
        theory(batch)
    measured(args)
    print("\n(the real shape's figures above are bounds computed from the config, not measurements"
          + (")" if args.device == "cuda" else "; no GPU here, so only the scaled shape was run)"))


if __name__ == "__main__":
    main()
