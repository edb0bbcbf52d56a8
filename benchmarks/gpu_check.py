"""One prepared GPU check (issue 13, item 6): the released 26B-A4B shapes with random weights built on the GPU.

    bash benchmarks/gpu_check.sh                          # one H100 / H200, within 8 minutes
    python benchmarks/gpu_check.py --device cpu --tiny    # the dry run a test does on CPU (seconds)

Prints one table: per weight format (bf16, fp8, int4), batch (1, 8), context (1K, 32K) and mode (plain,
fast, fast + torch.compile, fast + CUDA graphs), the median latency of one denoising step (decoder pass with
self-conditioning, LM head, sampler) next to its weight-bandwidth roofline (weight bytes the step reads,
plus the KV bytes the fast path reads, over HBM bandwidth), and the step's peak memory
(torch.cuda.max_memory_allocated during the step, and over the whole process). Then fast-vs-plain parity
on the device: the fused sampler against the plain one on the same logits (bit for bit), and the fast
decoder's logits against the plain one's.

Weights are random (normal, std 0.02), built layer by layer straight on the device from a meta-device
model (no float copy on the host; a quantized format keeps only one float layer at a time). The KV cache is
filled with random values and its lengths set to the context, so no prefill runs: the step is what is
timed. int4 has no CUDA kernel here, so it computes by dequantization (as README says); fp8 uses
torch._scaled_mm where the GPU has it (SM >= 8.9). Configurations that do not fit in free memory, or that
would overrun `--budget-s`, are listed as skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from letterpress.quant import GEMMA4_26B_A4B_TEXT as RELEASED  # noqa: E402

GIB = 2**30
# HBM bandwidth by device name (vendor figures); anything else is measured with a device copy
BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12,
             "A100": 2.0e12}
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, sliding_window=32,
            num_experts=8, top_k_experts=2, moe_intermediate_size=32)
FORMAT_BYTES = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5 + 2 * 2 / 64}  # int4: bf16 scale + zero per group of 64


# ------------------------------------------------------------------------------------------------- model
def build_config(text: dict, canvas: int):
    from letterpress.config import model_config_from_dict

    return model_config_from_dict({"model_type": "diffusion_gemma", "canvas_length": canvas,
                                   "text_config": {"model_type": "diffusion_gemma_text", **text}})


@torch.no_grad()
def random_model(config, fmt: str, device: torch.device, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """The model with random weights made on `device`: built on the meta device, then each piece is
    allocated there, filled, and (fp8 / int4) quantized before the next piece exists."""
    from letterpress.model import DiffusionGemma
    from letterpress.model.layers import init_parameters
    from letterpress.quant import quantize_module

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # meta parameters in `dtype`: `to_empty` then allocates that directly
    try:
        with torch.device("meta"):
            model = DiffusionGemma(config)
    finally:
        torch.set_default_dtype(default)
    generator = torch.Generator(device=device).manual_seed(seed)
    for piece in [model.embed_tokens, model.norm, model.self_conditioning, *model.layers]:
        init_parameters(piece.to_empty(device=device), 0.02, generator)
        if fmt != "bf16" and piece is not model.embed_tokens and piece is not model.norm:
            quantize_module(piece, fmt)
    for layer in model.layers:
        layer.encoder_scalar.fill_(1.0)
        layer.decoder_scalar.fill_(1.0)
    model.init_rope()
    model.quantization = None if fmt == "bf16" else fmt
    return model.eval()


def random_cache(model, batch: int, context: int, seed: int = 1):
    """A cache whose `batch` slots hold `context` random positions (no prefill)."""
    cache = model.new_cache(batch, context)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    for tensor in list(cache.keys) + list(cache.values):
        tensor.normal_(0.0, 1.0, generator=generator)
    cache.lengths.fill_(context)
    return cache


# ---------------------------------------------------------------------------------------------- roofline
def step_bytes(text, fmt: str, batch: int, canvas: int, context: int) -> float:
    """Bytes one fast-path step reads at least: weights (attention, dense MLPs, the experts the canvas tokens
    hit with uniform routing, the embedding twice: LM head and self-conditioning) and the KV span read."""
    from letterpress.quant import projected_bytes

    counts = projected_bytes(text, None, dtype_bytes=1)  # bytes at 1 byte per weight = weight counts
    expert = 3 * text.hidden_size * text.moe_intermediate_size
    all_experts = expert * text.num_experts * text.num_hidden_layers
    hit = text.num_experts * (1 - (1 - text.top_k_experts / text.num_experts) ** (batch * canvas))
    quantized = counts["quantized_params"] - all_experts + hit * expert * text.num_hidden_layers
    floating = 2 * counts["embedding_params"] + (counts["params"] - counts["quantized_params"] - counts["embedding_params"])
    kv = 0
    for spec in text.layers:
        span = min(context, text.sliding_window - 1) if spec.is_sliding else context
        kv += 2 * spec.num_kv_heads * spec.head_dim * 2 * span * batch
    return quantized * FORMAT_BYTES[fmt] + floating * 2 + kv


def bandwidth(device: torch.device) -> tuple[float, str]:
    if device.type != "cuda":
        return _measured_bandwidth(device, 2**25), "measured copy"
    name = torch.cuda.get_device_name(device)
    for key, value in BANDWIDTH.items():
        if key in name:
            return value, f"{name} spec"
    return _measured_bandwidth(device), f"{name} measured copy"


def _measured_bandwidth(device: torch.device, nbytes: int = 2**28) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / min(times)


# -------------------------------------------------------------------------------------------------- step
def warm_clocks(device: torch.device, seconds: float = 2.0) -> None:
    """Matrix products for a couple of seconds, so the first timed row does not meet idle clocks."""
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            a @ a
        _sync(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_start(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_end(device: torch.device, start: int) -> tuple[float, float]:
    if device.type != "cuda":
        return float("nan"), float("nan")
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return (peak - start) / GIB, peak / GIB


class Stepper:
    """Denoising steps of `batch` canvases the way the runner takes them: decoder pass with the previous
    step's self-conditioning state, then the plain or the fused sampler; the state and canvas carry over."""

    def __init__(self, model, cache, batch: int, fast: bool, seed: int = 0):
        from letterpress.sampling import GeneratorDraws

        self.model, self.cache, self.fast = model, cache, fast
        device = model.device
        self.slots = torch.arange(batch, device=device)
        canvas, vocab = model.config.canvas_length, model.text_config.vocab_size
        self.draws = [GeneratorDraws(seed + r, device) for r in range(batch)]
        self.canvas = torch.stack([d.initial_canvas(canvas, vocab, 0) for d in self.draws])
        self.state = None
        self.steps = 0

    def __call__(self):
        from letterpress.fast_sampling import fused_denoise_step
        from letterpress.sampling import denoise_step

        model, batch = self.model, len(self.draws)
        mask = None if self.state is None else torch.ones(batch, dtype=torch.bool, device=model.device)
        if self.fast:
            logits = model.denoise(self.canvas, self.cache, self.slots, None, mask, self_conditioning_probs=self.state)
        else:
            logits = model.denoise(self.canvas, self.cache, self.slots, self.state, mask)
        self.state = None
        temps = torch.full((batch,), 0.7)
        bounds = torch.full((batch,), 1.0)
        args = ([0] * batch, [self.steps] * batch)
        if self.fast:
            out = fused_denoise_step(logits, temps, bounds, self.draws, *args, sc_dtype=model.dtype, keep_processed=False)
            self.state = out.sc_probs
        else:
            out = denoise_step(logits, temps, bounds, self.draws, *args)
            self.state = out.processed_logits.to(model.dtype)
        self.canvas = out.next_canvas
        self.steps += 1
        return out


def time_steps(stepper: Stepper, device: torch.device, warmup: int, repeat: int) -> dict:
    with torch.inference_mode():
        for _ in range(warmup):
            stepper()
        times = []
        start_bytes = _peak_start(device)
        for _ in range(repeat):
            _sync(device)
            t0 = time.perf_counter()
            stepper()
            _sync(device)
            times.append(time.perf_counter() - t0)
        step_peak, total_peak = _peak_end(device, start_bytes)
    return {"ms": 1e3 * statistics.median(times), "step_peak_gib": step_peak, "total_peak_gib": total_peak}


# ------------------------------------------------------------------------------------------------ parity
def sampler_parity(device: torch.device, vocab: int, canvas: int) -> bool:
    """The fused sampler (chunked, drawing into its logits) against the plain one, on the device."""
    from letterpress.fast_sampling import fused_denoise_step
    from letterpress.sampling import GeneratorDraws, denoise_step

    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(2, canvas, vocab, device=device, generator=g) * 4
    temps, bounds = torch.tensor([0.8, 0.5]), torch.tensor([0.5, 3.0])
    plain = denoise_step(logits.clone(), temps, bounds, [GeneratorDraws(s, device) for s in (1, 2)], [0, 0], [3, 3])
    fused = fused_denoise_step(logits.clone(), temps, bounds, [GeneratorDraws(s, device) for s in (1, 2)], [0, 0], [3, 3],
                               keep_processed=False)
    return all(torch.equal(getattr(plain, n), getattr(fused, n)) for n in ("next_canvas", "argmax", "accept_mask",
                                                                          "mean_entropy"))


@torch.inference_mode()
def decoder_parity(model, device: torch.device, context: int) -> dict:
    """The fast decoder (grouped MoE, sliced attention) against the plain one: same canvas, same cache."""
    from letterpress.model.fast import apply_fast_path, apply_plain_path

    cache = random_cache(model, 2, context)
    vocab = model.text_config.vocab_size
    canvas = torch.randint(0, vocab, (2, model.config.canvas_length), device=device,
                           generator=torch.Generator(device=device).manual_seed(5))
    apply_plain_path(model)
    plain = model.denoise(canvas, cache)
    apply_fast_path(model)
    fast = model.denoise(canvas, cache)
    return {"max_abs_logit_diff": float((plain - fast).abs().max()),
            "argmax_agreement": float((plain.argmax(-1) == fast.argmax(-1)).float().mean())}


@torch.inference_mode()
def float32_decoder_parity(text_shape: dict, canvas: int, device: torch.device, context: int, layers: int = 6) -> dict:
    """`decoder_parity` in float32 (TF32 off) on the first `layers` layers at the same widths: separates a
    fast-path error from bf16 rounding, which a deep random model amplifies."""
    config = build_config({**text_shape, "num_hidden_layers": layers}, canvas)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model = random_model(config, "bf16", device, dtype=torch.float32)
        return {f"float32_{k}": v for k, v in decoder_parity(model, device, context).items()}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@torch.inference_mode()
def quantized_experts_parity(model, device: torch.device, tokens: int) -> dict:
    """Each quantized format's experts (the first layer's, quantized from its float weights): the grouped
    path the GPU takes against the per-expert one, on the same input. Max |difference| over max |output|."""
    from letterpress.quant import QuantExperts

    layer = model.layers[0]
    g = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(tokens, model.text_config.hidden_size, device=device, generator=g, dtype=model.dtype)
    weights, index = layer.router(x)
    out = {}
    for fmt in ("int8", "fp8", "int4"):
        experts = QuantExperts(layer.experts, fmt)
        sorted_out = experts(x, weights, index)
        experts.impl = "grouped"
        grouped_out = experts(x, weights, index)
        kernel = "scaled_grouped_mm" if fmt == "fp8" and experts.scaled_grouped_mm else "dequantize+grouped_mm"
        out[f"experts_{fmt}"] = {"kernel": kernel, "rel_diff": float((grouped_out - sorted_out).abs().max()
                                                                      / sorted_out.abs().max())}
        del experts
    return out


# -------------------------------------------------------------------------------------------------- main
def kv_bytes(text, batch: int, context: int) -> int:
    return sum(2 * s.num_kv_heads * s.head_dim * 2 * context * batch for s in text.layers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and contexts: the CPU dry run")
    parser.add_argument("--formats", nargs="+", default=["bf16", "fp8", "int4"], choices=list(FORMAT_BYTES))
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default 1 8 (tiny: 1 2)")
    parser.add_argument("--context", type=int, nargs="+", default=None, help="default 1024 32768 (tiny: 64 256)")
    parser.add_argument("--canvas", type=int, default=None, help="default 256 (tiny: 16)")
    parser.add_argument("--modes", nargs="+", default=None, choices=["plain", "fast", "compile", "cudagraphs"],
                        help="default: fast everywhere; plain at the first format, compile and cudagraphs at the first "
                             "two, each at the first batch and context (on CPU compile modes are skipped unless asked for)")
    parser.add_argument("--warmup", type=int, default=None, help="default 3 (tiny: 1)")
    parser.add_argument("--repeat", type=int, default=None, help="default 5 (tiny: 1)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip what would start after this many seconds")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    from letterpress.model.fast import apply_fast_path, apply_plain_path, compile_layers, uncompile_layers

    began = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --device cpu --tiny for the dry run)", file=sys.stderr)
        return 2
    text_shape = TINY if args.tiny else RELEASED
    contexts = args.context or ([64, 256] if args.tiny else [1024, 32768])
    canvas = args.canvas or (16 if args.tiny else 256)
    args.batch = args.batch or ([1, 2] if args.tiny else [1, 8])
    args.warmup = (1 if args.tiny else 3) if args.warmup is None else args.warmup
    args.repeat = (1 if args.tiny else 5) if args.repeat is None else args.repeat
    config = build_config(text_shape, canvas)
    text = config.text
    bw, bw_source = bandwidth(device)
    extra_modes = args.modes or (["plain", "compile", "cudagraphs"] if device.type == "cuda" else ["plain"])
    extra_modes = [m for m in extra_modes if m != "fast"]
    print(f"gpu_check: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch "
          f"{torch.__version__}, shape {'tiny' if args.tiny else 'released 26B-A4B'}, canvas {canvas}, "
          f"bandwidth {bw / 1e9:.0f} GB/s ({bw_source})", flush=True)

    if device.type == "cuda":
        warm_clocks(device)
    rows: list[dict] = []
    parity: dict = {"sampler_bitwise": sampler_parity(device, text.vocab_size, canvas)}
    header = (f"{'format':6s} {'batch':>5s} {'context':>7s} {'mode':10s} {'step ms':>9s} {'roofline ms':>11s} "
              f"{'% roofline':>10s} {'step peak GiB':>13s} {'total peak GiB':>14s}  note")

    def print_parity() -> None:
        print(f"parity on {device.type}: fused sampler == plain sampler bit for bit: {parity['sampler_bitwise']}; "
              f"fast vs plain decoder ({args.formats[0]}, context {contexts[0]}): max |logit diff| "
              f"{parity.get('max_abs_logit_diff', float('nan')):.3g}, argmax agreement "
              f"{parity.get('argmax_agreement', float('nan')):.4f}; in float32 (6 layers): "
              f"{parity.get('float32_max_abs_logit_diff', float('nan')):.3g}, "
              f"{parity.get('float32_argmax_agreement', float('nan')):.4f}", flush=True)
        for fmt in ("int8", "fp8", "int4"):
            if f"experts_{fmt}" in parity:
                row = parity[f"experts_{fmt}"]
                print(f"parity on {device.type}: {fmt} experts, grouped ({row['kernel']}) vs per-expert: "
                      f"max |diff| / max |out| {row['rel_diff']:.3g}", flush=True)

    def emit(row: dict) -> None:
        if not rows:
            print(header)
            print("-" * len(header))
        rows.append(row)
        if "ms" in row:
            print(f"{row['format']:6s} {row['batch']:5d} {row['context']:7d} {row['mode']:10s} {row['ms']:9.1f} "
                  f"{row['roofline_ms']:11.2f} {100 * row['roofline_ms'] / row['ms']:9.1f}% "
                  f"{row['step_peak_gib']:13.2f} {row['total_peak_gib']:14.2f}  {row.get('note', '')}", flush=True)
        else:
            print(f"{row['format']:6s} {row['batch']:5d} {row['context']:7d} {row['mode']:10s} {'-':>9s} {'-':>11s} "
                  f"{'-':>10s} {'-':>13s} {'-':>14s}  skipped: {row['skipped']}", flush=True)

    def run(model, fmt: str, batch: int, context: int, mode: str, note: str = "") -> None:
        base = {"format": fmt, "batch": batch, "context": context, "mode": mode}
        if time.perf_counter() - began > args.budget_s:
            emit({**base, "skipped": "time budget"})
            return
        need = kv_bytes(text, batch, context) + 3 * batch * canvas * text.vocab_size * 4
        if device.type == "cuda" and need > torch.cuda.mem_get_info(device)[0]:
            emit({**base, "skipped": f"needs ~{need / GIB:.0f} GiB for cache and step, "
                                     f"{torch.cuda.mem_get_info(device)[0] / GIB:.0f} free"})
            return
        compiled = mode in ("compile", "cudagraphs")
        try:
            (apply_plain_path if mode == "plain" else apply_fast_path)(model)
            if compiled:
                compile_layers(model, mode="reduce-overhead" if mode == "cudagraphs" else None)
            stepper = Stepper(model, random_cache(model, batch, context), batch, fast=mode != "plain")
            t1 = time.perf_counter()
            result = time_steps(stepper, device, args.warmup + (2 if compiled else 0), args.repeat)
            if compiled:
                note = f"warmup+compile {time.perf_counter() - t1:.0f}s"
            emit({**base, **result, "roofline_ms": 1e3 * step_bytes(text, fmt, batch, canvas, context) / bw, "note": note})
        except Exception as exc:  # keep the table going: one failing mode is a finding, not an end
            emit({**base, "skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"})
        finally:
            if compiled:
                uncompile_layers(model)
                torch._dynamo.reset()  # each compiled row starts clean: no recompile limit carried over
            apply_fast_path(model)
            stepper = None
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def build(fmt: str):
        t0 = time.perf_counter()
        model = random_model(config, fmt, device)
        apply_fast_path(model)
        return model, f"build {time.perf_counter() - t0:.0f}s"

    # every format on the fast path (plain once, at the first configuration); compile modes last, so that an
    # overrunning compile cannot cost the main table
    for fi, fmt in enumerate(args.formats):
        if time.perf_counter() - began > args.budget_s:
            for batch in args.batch:
                for context in contexts:
                    emit({"format": fmt, "batch": batch, "context": context, "mode": "fast", "skipped": "time budget"})
            continue
        model, note = build(fmt)
        if fi == 0:
            parity.update(decoder_parity(model, device, contexts[0]))
            parity.update(float32_decoder_parity(text_shape, canvas, device, contexts[0]))
            if fmt == "bf16":
                parity.update(quantized_experts_parity(model, device, canvas))
            print_parity()
        for batch in args.batch:
            for context in contexts:
                run(model, fmt, batch, context, "fast", note)
                note = ""
        if fi == 0 and "plain" in extra_modes:
            run(model, fmt, args.batch[0], contexts[0], "plain")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    compile_modes = [m for m in extra_modes if m in ("compile", "cudagraphs")]
    for fmt in (args.formats[:2] if compile_modes else []):  # bf16 and fp8 by default: the formats GPUs serve
        model, note = build(fmt)
        for mode in compile_modes:
            run(model, fmt, args.batch[0], contexts[0], mode)
        if "compile" in compile_modes and len(args.batch) > 1:
            run(model, fmt, args.batch[-1], contexts[0], "compile")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"gpu_check: done in {time.perf_counter() - began:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "parity": parity, "bandwidth": bw, "bandwidth_source": bw_source},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
