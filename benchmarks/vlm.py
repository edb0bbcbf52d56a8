"""Does the shipped tiny vision-language model read its pictures? Exact match per kind of question on held-out
rendered images.

    python benchmarks/vlm.py [--model letterpress/assets/tiny_vlm] [--n 200] [--chat] [--threads 1]
        [--json out.json] [--plot benchmarks/charts/tiny_vlm_accuracy.png]
        [--validation] [--entropy-bound B] [--max-denoising-steps N] [--t-min T] [--t-max T]
        [--confidence-threshold H]

Images: `letterpress.train.vlm_data.held_out_samples`, drawn with fonts no training image uses
(vlm_data.HELD_OUT_FONTS), a seed no training stream uses, a wider range of image sizes (88-200 px wide
against 96-192) and more pixel noise (std up to 10 levels against 8); positions, colours and sizes are fresh
draws. Each image is one greedy request as `letterpress generate --image IMG "question"` sends it (a plain
prompt), or with `--chat` as one chat turn. Exact match: the decoded answer, stripped, equals the expected one.
`--validation` draws the same kind of images from another seed (vlm_data.VALIDATION_SEED): sampler settings
(the overrides below) are chosen there, so that the held-out figures are not tuned on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, set_threads  # noqa: E402
from letterpress.errors import LetterpressError  # noqa: E402
from letterpress.train import vlm_data as V  # noqa: E402
from letterpress.train.vlm import VLM_DIR, exact_match  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(VLM_DIR))
    p.add_argument("--n", type=int, default=200, help="held-out images per kind")
    p.add_argument("--kinds", default=",".join(V.KINDS))
    p.add_argument("--chat", action="store_true", help="ask as one chat turn instead of a plain prompt")
    p.add_argument("--validation", action="store_true",
                   help="images of the validation seed instead of the held-out ones: for choosing settings")
    p.add_argument("--entropy-bound", type=float, default=None, help="sampler override (default: the checkpoint's)")
    p.add_argument("--max-denoising-steps", type=int, default=None, help="sampler override")
    p.add_argument("--t-min", type=float, default=None, help="sampler override")
    p.add_argument("--t-max", type=float, default=None, help="sampler override")
    p.add_argument("--confidence-threshold", type=float, default=None, help="sampler override")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="draw the per-kind accuracy as a bar chart (PNG)")
    args = p.parse_args()
    set_threads(args.threads)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = [k for k in kinds if k not in V.KINDS]
    if unknown or not kinds:
        p.error(f"--kinds: unknown {', '.join(map(repr, unknown)) or 'none given'}; choose from {','.join(V.KINDS)}")
    start = time.perf_counter()
    sampler = {name: getattr(args, name) for name in ("entropy_bound", "max_denoising_steps", "t_min", "t_max",
                                                      "confidence_threshold") if getattr(args, name) is not None}
    try:
        result = exact_match(args.model, kinds, n=args.n, chat=args.chat, batch=args.batch,
                             validation=args.validation, sampler=sampler)
    except LetterpressError as e:  # a bad model folder or sampler override: one line, exit 2
        p.error(str(e))
    seconds = time.perf_counter() - start
    mean = sum(r["exact"] for r in result.values()) / len(result)
    images = "validation" if args.validation else "held-out"
    print(f"# {machine()}")
    print(f"# model {args.model}, {args.n} {images} images per kind, {'chat' if args.chat else 'plain prompt'}, "
          f"greedy{''.join(f', {k} {v}' for k, v in sampler.items())}; {seconds:.0f} s")
    print("| question | exact match | n | wrong (expected -> got), first 3 |")
    print("|---|---|---|---|")
    for kind, r in result.items():
        wrong = ", ".join(f"{e} -> {g!r}" for e, g in r["wrong"]) or "-"
        print(f"| {kind}: \"{V.QUESTIONS[kind]}\" | {100 * r['exact']:.1f}% | {r['n']} | {wrong} |")
    print(f"| **all** | **{100 * mean:.1f}%** | {args.n * len(result)} | |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "n": args.n, "chat": args.chat, "images": images,
                                               "sampler": sampler, "mean": mean,
                                               "kinds": result, "machine": machine()}, indent=2) + "\n")
    if args.plot:
        from letterpress.plots import bar_chart

        bar_chart(list(result), {"exact match": [r["exact"] for r in result.values()]}, args.plot,
                  title=f"tiny-vlm on held-out rendered images ({args.n} per kind)", xlabel="question",
                  ylabel="exact match", percent=True)


if __name__ == "__main__":
    main()
