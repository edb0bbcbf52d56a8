"""Has a tiny-tasks model learned to copy? One decoder pass per example, on the validation examples of every family:
how many of the answer's noised tokens its argmax gets right, split into *copy* tokens (answer tokens that occur
in the prompt, other than spaces and punctuation: the values a reformatting job moves), *other* answer tokens
(format, computed values) and the EOS *fill*. Cheaper than generating, and it moves long before exact match does.

    python benchmarks/tiny_tasks_tokens.py --model runs/tiny-tasks3/model [--t 0.5 0.999] [--n 16]
    python benchmarks/tiny_tasks_tokens.py --checkpoint runs/x/checkpoints/step-0002000 --base runs/x/model

`--checkpoint`: a resume checkpoint of `letterpress train` (torch.distributed.checkpoint), read into the model of
`--base` (a model folder of the same shape: config, tokenizer). `--t`: the noised fraction of the canvas.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, model_from_resume_checkpoint, set_threads  # noqa: E402
from letterpress.model import DiffusionGemma  # noqa: E402
from letterpress.tokenizer import Tokenizer  # noqa: E402
from letterpress.train import recipes_tasks as RT  # noqa: E402
from letterpress.train import tasks as T  # noqa: E402
from letterpress.train.loss import LossConfig, make_batch  # noqa: E402

# shared by prompt and answer without being copied (byte-level forms: "Ġ" is a space, "Ċ" a newline)
NOT_VALUES = ("Ġ", "Ċ", ":", '"', ",", "{", "}", "-", "[", "]")


def load(model: str | None, checkpoint: str | None, base: str | None) -> tuple[DiffusionGemma, Tokenizer]:
    if checkpoint is None:
        return DiffusionGemma.from_pretrained(model).eval(), Tokenizer.from_dir(model)
    net, _ = model_from_resume_checkpoint(checkpoint, base)
    return net.eval(), Tokenizer.from_dir(base)


@torch.no_grad()
def token_rows(net: DiffusionGemma, tok: Tokenizer, family: str, n: int, t: float) -> list[tuple[str, bool]]:
    """(class, argmax right) per noised canvas position of `n` validation examples of `family`."""
    examples = RT.task_examples(T.held_out_tasks(family, n, seed=T.VALIDATION_SEED), tok)
    canvas = net.config.canvas_length
    cfg = LossConfig(canvas_length=canvas, eos_id=tok.eos_id, encoder_loss_weight=0, self_conditioning_prob=0)
    vocab = net.config.text.vocab_size
    batch = make_batch(examples, cfg, vocab, [torch.Generator().manual_seed(i) for i in range(len(examples))])
    noised = torch.rand(batch.clean.shape, generator=torch.Generator().manual_seed(1)) < t
    noise = torch.randint(vocab, batch.clean.shape, generator=torch.Generator().manual_seed(2))
    cache = net.new_cache(len(examples), int(batch.context_lengths.max()))
    net.encode(batch.context_ids, cache, input_lengths=batch.context_lengths)
    right = net.denoise(torch.where(noised, noise, batch.clean), cache).argmax(-1) == batch.clean  # [B, C]
    not_values = {tok.token_to_id(s) for s in NOT_VALUES} - {None}
    rows = []
    for i, ex in enumerate(examples):
        prompt = set(ex.prompt) - not_values
        for j in noised[i].nonzero().flatten().tolist():
            kind = "fill" if j > len(ex.target) else "copy" if int(batch.clean[i, j]) in prompt else "other"
            rows.append((kind, bool(right[i, j])))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(RT.TASKS_DIR))
    ap.add_argument("--checkpoint", default=None, help="a resume checkpoint folder (with --base)")
    ap.add_argument("--base", default=None, help="the model folder whose shape and tokenizer --checkpoint has")
    ap.add_argument("--n", type=int, default=16, help="validation examples per family")
    ap.add_argument("--t", type=float, nargs="+", default=[0.5, 0.999])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    net, tok = load(args.model, args.checkpoint, args.base)
    print(args.checkpoint or args.model)
    for t in args.t:
        rows = {f: token_rows(net, tok, f, args.n, t) for f in T.FAMILIES}
        every = [r for rs in rows.values() for r in rs]
        print(f"t = {t}: " + ", ".join(
            f"{kind} {100 * statistics.mean(ok for k, ok in every if k == kind):.1f}% right "
            f"(n={sum(k == kind for k, _ in every)})" for kind in ("copy", "other", "fill")))
        for f, rs in rows.items():
            cells = [f"{kind} {100 * statistics.mean(ok for k, ok in rs if k == kind):5.1f}%"
                     for kind in ("copy", "other") if any(k == kind for k, _ in rs)]
            print(f"    {f:12s} " + "  ".join(cells))
    print(machine())


if __name__ == "__main__":
    main()
