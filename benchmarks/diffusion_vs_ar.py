"""Block diffusion vs autoregressive decoding of the same weights, batch 1 and 8.

The autoregressive baseline is the encoder used causally: one token per forward (`model.encode` of the
last token, extending the KV cache) and `model.lm_logits` of its hidden state, greedy. Diffusion is
`LLM.generate` (fast path) with a fixed number of denoising steps per canvas.

Random weights accept few tokens per step, so several diffusion figures are printed, each labelled:
  - step latency: one denoising step (decoder pass over the canvas + sampler), measured;
  - tok/s measured, default sampler: the checkpoint's settings (early stop on, up to 48 steps), what this
    random model actually does;
  - tok/s measured, fixed steps: every canvas runs exactly --steps steps (canvas / steps tokens per step);
  - tok/s at A accepted tokens per step (default 16, the released model's ballpark is ~20): projected as
    canvas / (canvas / A x step latency + encode of one canvas), from the measured latencies.

    python benchmarks/diffusion_vs_ar.py [--shape embedded|tiny|medium] [--threads N] [--accepted 16]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import SHAPES, checkpoint_for, interleaved, machine, median, set_threads

from letterpress.fast_sampling import fused_denoise_step
from letterpress.sampling import GeneratorDraws


def ar_decode(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy autoregressive decode with the causal encoder: [B, P] -> [B, new_tokens]."""
    b = prompts.shape[0]
    cache = model.new_cache(b, prompts.shape[1] + new_tokens + 1)
    hidden = model.encode(prompts, cache)
    out = []
    token = model.lm_logits(hidden[:, -1]).argmax(-1)
    for _ in range(new_tokens):
        out.append(token)
        hidden = model.encode(token[:, None], cache)
        token = model.lm_logits(hidden[:, -1]).argmax(-1)
    return torch.stack(out, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["embedded", *SHAPES], default="embedded")
    parser.add_argument("--canvas", type=int, default=64, help="canvas length for tiny/medium (embedded: 64)")
    parser.add_argument("--steps", type=int, default=16, help="denoising steps per canvas (fixed, no early stop)")
    parser.add_argument("--canvases", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--accepted", type=int, default=16, help="accepted tokens per step for the projection")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--impl", default="fast", choices=["plain", "fast"])
    args = parser.parse_args()
    set_threads(args.threads)

    from letterpress import LLM, SamplingParams

    folder = checkpoint_for(args.shape, args.canvas)
    print(f"machine: {machine()}")
    llm = LLM(folder, max_num_seqs=8, max_model_len=args.prompt_len + (args.canvases + 1) * 256, impl=args.impl)
    model, canvas = llm.model, llm.runner.canvas_length
    vocab = model.text_config.vocab_size
    new_tokens = args.canvases * canvas
    print(f"shape={args.shape} canvas={canvas} steps/canvas={args.steps} canvases={args.canvases} "
          f"prompt={args.prompt_len} impl={args.impl} repeats={args.repeats} (interleaved)")
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, seed=0, max_denoising_steps=args.steps,
                            stability_threshold=args.steps + 1)

    for batch in (1, 8):
        prompts = torch.randint(3, vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
        steps_done: dict[str, list[int]] = {}

        def diffusion():
            llm.generate([p.tolist() for p in prompts], params)

        def diffusion_default():
            outs = llm.generate([p.tolist() for p in prompts],
                                [SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, seed=i) for i in range(batch)])
            steps_done["steps"] = [s for o in outs for s in o.steps_per_canvas]

        def autoregressive():
            with torch.inference_mode():
                ar_decode(model, prompts, new_tokens)

        # component latencies for the projection: one denoising step, one canvas encode
        cache = model.new_cache(batch, args.prompt_len + 2 * canvas)
        with torch.inference_mode():
            model.encode(prompts, cache)
        canvas_ids = torch.randint(0, vocab, (batch, canvas))

        def one_step():
            with torch.inference_mode():
                logits = model.denoise(canvas_ids, cache)
                fused_denoise_step(logits, torch.full((batch,), 0.8), torch.full((batch,), 0.1),
                                   [GeneratorDraws(i) for i in range(batch)], [0] * batch, [0] * batch)

        def one_encode():
            c = model.new_cache(batch, args.prompt_len + 2 * canvas)
            with torch.inference_mode():
                model.encode(prompts, c)
                start = time.perf_counter()
                model.encode(canvas_ids, c)
            return time.perf_counter() - start

        encode_times = []
        times = interleaved({"diffusion": diffusion, "default": diffusion_default, "autoregressive": autoregressive,
                             "step": one_step,
                             "encode": lambda: encode_times.append(one_encode())}, args.repeats)
        step = median(times["step"])
        enc = median(encode_times[-args.repeats:])
        diff_rate = batch * new_tokens / median(times["diffusion"])
        default_rate = batch * new_tokens / median(times["default"])
        mean_steps = sum(steps_done["steps"]) / len(steps_done["steps"])
        ar_rate = batch * new_tokens / median(times["autoregressive"])
        ar_latency = median(times["autoregressive"]) / new_tokens
        projected = batch * canvas / (canvas / args.accepted * step + enc)
        print(f"\nbatch {batch}:")
        print(f"  autoregressive (measured)         {ar_rate:9.1f} tok/s   ({ar_latency * 1e3:.2f} ms per forward)")
        print(f"  diffusion step latency (measured) {step * 1e3:9.2f} ms per step; canvas encode {enc * 1e3:.2f} ms")
        print(f"  diffusion tok/s, measured, default sampler {default_rate:9.1f} tok/s   "
              f"({mean_steps:.1f} steps per {canvas}-token canvas = {canvas / mean_steps:.1f} tokens/step)")
        print(f"  diffusion tok/s, measured, fixed steps {diff_rate:9.1f} tok/s   "
              f"({args.steps} steps per {canvas}-token canvas = {canvas / args.steps:.1f} tokens/step)")
        print(f"  diffusion tok/s, at {args.accepted} accepted/step {projected:9.1f} tok/s   (projected from the measured latencies)")
        print(f"  ratio diffusion/AR: default sampler {default_rate / ar_rate:.2f}x, fixed {args.steps} steps "
              f"{diff_rate / ar_rate:.2f}x, at {args.accepted} accepted/step {projected / ar_rate:.2f}x")


if __name__ == "__main__":
    main()
