"""Quantized weights (letterpress.quant) against the float model: memory, speed and drift, same inputs.

For each dtype the float model is the reference; every format is loaded from the same checkpoint and
quantized. Printed per format:
  - weights: bytes of parameters + buffers as stored;
  - step: median time of one generate with fixed steps (fast path), interleaved, and the ratio to float;
  - max |logit error| and argmax agreement on one denoise of the same canvas over the same prompt;
  - canvas token agreement: the same seeded generation (same draws), fraction of equal tokens.
The bf16-vs-float32 row gives the drift that rounding alone causes on these random models: random weights
amplify any perturbation (near-one-hot attention, top-k routing flips), so drift here overstates what a
trained model sees.

    python benchmarks/quantization.py [--shape embedded|tiny|medium] [--threads N] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch

from common import SHAPES, checkpoint_for, interleaved, machine, median, ratio, set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["embedded", *SHAPES], default="embedded")
    parser.add_argument("--canvas", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    set_threads(args.threads)

    from letterpress import LLM, SamplingParams
    from letterpress.quant import drift, model_bytes

    folder = checkpoint_for(args.shape, args.canvas)
    print(f"machine: {machine()}")
    print(f"shape={args.shape} steps={args.steps} repeats={args.repeats} impl=fast")
    first = None
    for dtype in args.dtypes.split(","):
        engines = {fmt or "float": LLM(folder, dtype=dtype, max_num_seqs=2, max_model_len=512, impl="fast",
                                       quantization=fmt) for fmt in (None, "int8", "int4", "fp8")}
        model = engines["float"].model
        vocab, canvas = model.text_config.vocab_size, engines["float"].runner.canvas_length
        prompts = torch.randint(3, vocab, (2, 48), generator=torch.Generator().manual_seed(0))
        canvas_ids = torch.randint(0, vocab, (2, canvas), generator=torch.Generator().manual_seed(1))

        def logits(m):
            with torch.inference_mode():
                cache = m.new_cache(2, 48 + canvas)
                m.encode(prompts, cache)
                return m.denoise(canvas_ids, cache)

        params = SamplingParams(max_new_tokens=2 * canvas, ignore_eos=True, seed=0, max_denoising_steps=args.steps,
                                stability_threshold=args.steps + 1)

        def run(llm):
            return lambda: llm.generate([p.tolist() for p in prompts], params)

        tokens = {name: [o.token_ids for o in run(llm)()] for name, llm in engines.items()}
        times = interleaved({name: run(llm) for name, llm in engines.items()}, args.repeats)
        ref_logits = logits(model)
        if first is None:
            first = (dtype, ref_logits, tokens["float"])
        print(f"\n{dtype}:")
        print(f"  {'format':6s} {'weights':>10s} {'step':>9s} {'vs float':>8s} {'max|dlogit|':>11s} {'argmax':>7s} "
              f"{'tokens':>7s}   (|logit| max {ref_logits.abs().max():.2f})")
        for name, llm in engines.items():
            d = drift(ref_logits, logits(llm.model))
            agree = sum(a == b for ra, rb in zip(tokens["float"], tokens[name]) for a, b in zip(ra, rb))
            agree /= sum(len(r) for r in tokens["float"])
            speed = ratio(times, "float", name)
            print(f"  {name:6s} {model_bytes(llm.model) / 2**20:8.2f}MB {median(times[name]) / (2 * args.steps) * 1e3:7.1f}ms "
                  f"{speed:7.2f}x {d['max_abs_logit_error']:11.4f} {d['argmax_agreement']:7.1%} {agree:7.1%}")
        if first[0] != dtype:
            d = drift(first[1], ref_logits)
            agree = sum(a == b for ra, rb in zip(first[2], tokens["float"]) for a, b in zip(ra, rb))
            agree /= sum(len(r) for r in first[2])
            print(f"  {dtype} float vs {first[0]} float (rounding alone): max|dlogit| {d['max_abs_logit_error']:.4f}, "
                  f"argmax {d['argmax_agreement']:.1%}, tokens {agree:.1%}")
    print("\n(step = generate time / (2 canvases x steps): per decoder step including the sampler; "
          "'vs float' = float time / format time, median of interleaved rounds)")


if __name__ == "__main__":
    main()
