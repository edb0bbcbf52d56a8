"""letterpress vs the Hugging Face reference (transformers 5.23 `DiffusionGemmaForBlockDiffusion.generate`).

Same random checkpoint (saved by transformers, loaded by both), same prompt, same number of canvases and
denoising steps (early stopping and EOS disabled so both do identical work). Runs are interleaved and
repeated in one process; the ratio is the figure to quote, the absolute tokens/s depend on the machine.
letterpress runs twice: the plain path (the tested reference) and the fast path (`impl="fast"`).

    python benchmarks/vs_reference.py [--shape tiny|medium] [--batch 1] [--repeats 5] [--threads N]
                                      [--dtype float32|bfloat16] [--compile]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from common import SHAPES, build_checkpoint, interleaved, machine, median, ratio, set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--canvas", type=int, default=64)
    parser.add_argument("--canvases", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16, help="denoising steps per canvas (no early stop)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true", help="also time the fast path with torch.compile")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain path")
    args = parser.parse_args()
    set_threads(args.threads)

    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    from letterpress import LLM, SamplingParams

    folder = tempfile.mkdtemp(prefix="lp-bench-")
    build_checkpoint(args.shape, args.canvas, folder)
    vocab = SHAPES[args.shape]["vocab_size"]
    prompts = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    new_tokens = args.canvases * args.canvas
    # stability_threshold above the step count: the canvas can never be "stable", so every canvas runs all steps
    never_stop = dict(max_denoising_steps=args.steps, stability_threshold=args.steps + 1)
    dtype = getattr(torch, args.dtype)

    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=dtype).eval()
    reference.generation_config.eos_token_id = None  # no EOS: every row produces all canvases
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, seed=0, **never_stop)
    engines = {}
    if not args.no_plain:
        engines["plain"] = LLM(folder, dtype=args.dtype, max_num_seqs=args.batch, max_model_len=args.prompt_len + new_tokens)
    engines["fast"] = LLM(folder, dtype=args.dtype, max_num_seqs=args.batch, max_model_len=args.prompt_len + new_tokens,
                          impl="fast")
    if args.compile:
        engines["fast+compile"] = LLM(folder, dtype=args.dtype, max_num_seqs=args.batch,
                                      max_model_len=args.prompt_len + new_tokens, impl="fast", compile=True)

    def run_reference() -> int:
        with torch.no_grad():
            out = reference.generate(prompts, max_new_tokens=new_tokens, sampler_config=EntropyBoundSamplerConfig(0.1),
                                     eos_token_id=None, **never_stop)
        assert out.sequences.shape[1] - args.prompt_len == new_tokens
        return new_tokens * args.batch

    def run(llm):
        def go() -> int:
            outs = llm.generate([p.tolist() for p in prompts], params)
            assert all(o.steps_per_canvas == [args.steps] * args.canvases for o in outs)
            return sum(len(o.token_ids) for o in outs)
        return go

    candidates = {"reference": run_reference, **{f"letterpress {k}": run(v) for k, v in engines.items()}}
    times = interleaved(candidates, args.repeats, warmup=1)
    tokens = new_tokens * args.batch

    print(f"machine: {machine()}")
    print(f"shape={args.shape} dtype={args.dtype} batch={args.batch} prompt={args.prompt_len} "
          f"canvases={args.canvases}x{args.canvas} steps={args.steps} repeats={args.repeats} (interleaved)")
    for name, ts in times.items():
        print(f"{name:24s} {tokens / median(ts):10.1f} tok/s   (median {median(ts) * 1e3:.0f} ms per generate)")
    for name in times:
        if name != "reference":
            print(f"ratio {name} / reference: {ratio(times, 'reference', name):6.2f}x")
    if "letterpress plain" in times:
        print(f"ratio fast / plain: {ratio(times, 'letterpress plain', 'letterpress fast'):6.2f}x")


if __name__ == "__main__":
    main()
