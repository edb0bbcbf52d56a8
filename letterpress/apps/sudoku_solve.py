"""Solving Sudoku with a trained checkpoint: the diffusion model (one canvas holds the 81 cells) and the
autoregressive baseline (the same backbone read causally, one cell per forward). Used by `letterpress sudoku`,
`benchmarks/sudoku.py` and the training recipes' periodic solve-rate evaluation."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from . import sudoku as S


def prompt_ids(tokenizer, puzzle: str) -> list[int]:
    """<bos> + the puzzle's 81 cell words (`sudoku.prompt_text`): the prompt both models were trained on."""
    return tokenizer.encode(S.prompt_text(puzzle), add_special_tokens=True)


def solve_diffusion(model_dir: str | Path, puzzles: list[str], batch: int = 100, greedy: bool = True,
                    seed: int = 0, **params) -> dict:
    """Solve rate, denoising steps and tokens per forward of a diffusion checkpoint (`LLM.run` over batches)."""
    from ..engine.llm import LLM
    from ..engine.request import SamplingParams

    llm = LLM(model_dir, max_num_seqs=batch, max_model_len=256)
    solved, steps, tpf, tokens, passes, outputs = 0, [], [], 0, 0, []
    start = time.perf_counter()
    for i in range(0, len(puzzles), batch):
        chunk = puzzles[i:i + batch]
        requests = [llm.make_request(prompt_ids(llm.tokenizer, p),
                                     SamplingParams(seed=seed + i + k, greedy=greedy, **params))
                    for k, p in enumerate(chunk)]
        for p, out in zip(chunk, llm.run(requests)):
            solved += S.is_solution(out.text, p)
            steps.append(sum(out.steps_per_canvas))
            tpf.append(out.tokens_per_forward)
            tokens += len(out.token_ids) + (out.finish_reason == "stop")
            passes += out.decoder_passes
            outputs.append(out.text)
    return {"solved": solved, "n": len(puzzles), "solve_rate": solved / len(puzzles),
            "mean_steps": statistics.mean(steps), "median_steps": statistics.median(steps),
            "tokens_per_forward": statistics.mean(tpf), "tokens_per_forward_pooled": tokens / max(passes, 1),
            "seconds": time.perf_counter() - start, "outputs": outputs}


@torch.no_grad()
def solve_autoregressive(model_dir: str | Path, puzzles: list[str], batch: int = 100) -> dict:
    """Solve rate of the autoregressive baseline: greedy next-token decoding through the encoder, 81 forwards."""
    from ..model import DiffusionGemma
    from ..tokenizer import Tokenizer

    model = DiffusionGemma.from_pretrained(model_dir)
    model.eval()
    tok = Tokenizer.from_dir(model_dir)
    solved, outputs = 0, []
    start = time.perf_counter()
    for i in range(0, len(puzzles), batch):
        chunk = puzzles[i:i + batch]
        ids = torch.tensor([prompt_ids(tok, p) for p in chunk])  # every prompt is 82 tokens
        cache = model.new_cache(len(chunk), ids.shape[1] + 82)
        hidden = model.encode(ids, cache)[:, -1]
        out = []
        for _ in range(81):
            nxt = model.lm_logits(hidden).argmax(-1)
            out.append(nxt)
            hidden = model.encode(nxt[:, None], cache)[:, -1]
        for p, row in zip(chunk, torch.stack(out, 1).tolist()):
            text = tok.decode(row)
            solved += S.is_solution(text, p)
            outputs.append(text)
    return {"solved": solved, "n": len(puzzles), "solve_rate": solved / len(puzzles), "tokens_per_forward": 1.0,
            "forwards_per_puzzle": 81, "seconds": time.perf_counter() - start, "outputs": outputs}
