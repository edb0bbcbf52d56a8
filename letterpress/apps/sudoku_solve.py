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
    model, tok, _ = _load(model_dir)
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


# --------------------------------------------------------------------------------------------- rule mask
# `--rule-mask`: both models' proposals pass through the Sudoku rules before they are accepted, and a dead end
# is backtracked (letterpress/apps/sudoku_rules.py), within a budget of forwards per puzzle. "Forwards" are
# the passes that produce a prediction: decoder passes for diffusion (the prompt's encoder pass is not
# counted), next-token predictions for the autoregressive model (the first comes with the prompt's pass).
DEFAULT_MAX_FORWARDS = 81  # what the autoregressive baseline needs without the mask: one per cell


def _load(model_dir: str | Path):
    from ..model import DiffusionGemma
    from ..tokenizer import Tokenizer

    model = DiffusionGemma.from_pretrained(model_dir)
    model.eval()
    tok = Tokenizer.from_dir(model_dir)
    digit_ids = [tok.encode(d, add_special_tokens=False)[0] for d in S.DIGITS]
    return model, tok, torch.tensor(digit_ids)


def sudoku_token_ids(tokenizer, canvas_length: int, puzzle: str) -> tuple[list[int], list[int]]:
    """(the prompt's token ids, the token ids of the digits 1-9) for `puzzle`, when the tokenizer and canvas are a
    Sudoku model's: each cell word of `sudoku.prompt_text` one token (no unknown), each digit 0-9 one token, and
    a canvas that holds the 81 cells and an EOS. Raises ValueError saying what does not fit otherwise."""
    digits = [tokenizer.encode(d, add_special_tokens=False) for d in "0" + S.DIGITS]
    if any(len(ids) != 1 or tokenizer.decode(ids) != d for ids, d in zip(digits, "0" + S.DIGITS)):
        raise ValueError("its tokenizer does not have one token per digit 0-9")
    ids = prompt_ids(tokenizer, puzzle)
    unk = tokenizer.token_to_id("<unk>")
    words = len(ids) - (tokenizer.bos_id is not None and ids[:1] == [tokenizer.bos_id])
    if words != 81 or (unk is not None and unk in ids):
        raise ValueError(f"its tokenizer does not have the 810 cell words of a Sudoku prompt (\"aa0\" .. \"ii9\"; "
                         f"the puzzle's 81 cells became {words} tokens)")
    if canvas_length < 82:
        raise ValueError(f"its canvas holds {canvas_length} tokens, fewer than the 81 cells and an EOS")
    return ids, [ids[0] for ids in digits[1:]]


def _ruled_canvas(boards: torch.Tensor, digit_ids: torch.Tensor, vocab: int, canvas_len: int, eos: int,
                  generator: torch.Generator) -> torch.Tensor:
    """[A, C] decoder input for boards [A, 81] (0 = not accepted): the accepted cells pinned, fresh uniform
    noise at the others (as in training), EOS after the 81 cells."""
    canvas = torch.randint(vocab, (len(boards), canvas_len), generator=generator)
    canvas[:, :81] = torch.where(boards > 0, digit_ids[(boards - 1).clamp(min=0)], canvas[:, :81])
    canvas[:, 81:] = eos
    return canvas


def _prompt_batches(model, tok, puzzles: list[str], batch: int, search_class, cells: int):
    """(first puzzle's index, a search per puzzle, prompt ids [n, P], a cache for P + `cells` tokens) per batch."""
    for i in range(0, len(puzzles), batch):
        chunk = puzzles[i:i + batch]
        ids = torch.tensor([prompt_ids(tok, p) for p in chunk])
        yield i, [search_class(p) for p in chunk], ids, model.new_cache(len(chunk), ids.shape[1] + cells)


def _summary(searches, forwards: list[int], seconds: float) -> dict:
    outputs = [s.text() if s.solved else "" for s in searches]
    solved = sum(S.is_solution(o, s.puzzle) for o, s in zip(outputs, searches))
    return {"solved": solved, "n": len(searches), "solve_rate": solved / len(searches),
            "mean_forwards": statistics.mean(forwards), "max_forwards": max(forwards),
            "mean_backtracks": statistics.mean(s.backtracks for s in searches),
            # per puzzle: the search undid every choice, so the givens admit no solution (a proof, not a miss)
            "no_solution": [s.failed for s in searches],
            "seconds": seconds, "outputs": outputs}


@torch.no_grad()
def solve_diffusion_ruled(model_dir: str | Path, puzzles: list[str], batch: int = 100,
                          max_forwards: int = DEFAULT_MAX_FORWARDS, entropy_bound: float = 0.01, seed: int = 0,
                          on_step=None) -> dict:
    """The diffusion model with the rule mask: each decoder pass sees the givens and the accepted cells pinned
    in the canvas (fresh uniform noise elsewhere, as in training) and the previous pass's logits as
    self-conditioning; its digit distributions go to `RuleSearch.step`. Greedy: the seed only draws the noise.
    `on_step(k, search, forward)` after each pass of puzzle k (the CLI draws the board)."""
    from .sudoku_rules import RuleSearch

    model, tok, digit_ids = _load(model_dir)
    eos = model.text_config.eos_token_id[0]  # the canvas's 3 positions after the cells: EOS and EOS fill
    vocab, canvas_len = model.text_config.vocab_size, model.config.canvas_length
    searches, forwards = [], []
    start = time.perf_counter()
    for i, chunk, ids, cache in _prompt_batches(model, tok, puzzles, batch, RuleSearch, cells=0):
        count = [0] * len(chunk)
        model.encode(ids, cache)
        generator = torch.Generator().manual_seed(seed + i)
        sc = None  # [n, C, V] the previous pass's logits per puzzle
        while active := [k for k, s in enumerate(chunk) if not s.done and count[k] < max_forwards]:
            boards = torch.tensor([chunk[k].board for k in active])  # [A, 81], 0 = not accepted
            canvas = _ruled_canvas(boards, digit_ids, vocab, canvas_len, eos, generator)
            rows = torch.tensor(active)
            sc_in = None if sc is None else sc[rows]
            sc_mask = None if sc is None else torch.tensor([count[k] > 0 for k in active])
            logits = model.denoise(canvas, cache, rows, sc_in, sc_mask)  # [A, C, V]
            if sc is None:
                sc = torch.zeros(len(chunk), *logits.shape[1:])
            sc[rows] = logits
            logp = torch.log_softmax(logits[:, :81, digit_ids], dim=-1).tolist()  # [A, 81, 9]
            for row, k in enumerate(active):
                count[k] += 1
                chunk[k].step(logp[row], entropy_bound)
                if on_step is not None:
                    on_step(i + k, chunk[k], count[k])
        searches += chunk
        forwards += count
    return _summary(searches, forwards, time.perf_counter() - start)


class RuledDiffusionSearch:
    """One puzzle's search of `solve_diffusion_ruled` on a model that is already loaded, one decoder pass per
    `forward()`: what the server runs, a pass at a time between its engine's steps (server/sudoku.py). The
    same passes, noise and acceptances as `solve_diffusion_ruled(model_dir, [puzzle], batch=1, seed=seed)`.
    The prompt is encoded by the first `forward()` (into a cache of its own: the caller's engine cache is
    never touched)."""

    def __init__(self, model, prompt: list[int], digit_ids: list[int], puzzle: str, entropy_bound: float,
                 seed: int = 0, max_forwards: int = DEFAULT_MAX_FORWARDS):
        from .sudoku_rules import RuleSearch

        self.model, self.entropy_bound, self.max_forwards = model, entropy_bound, max_forwards
        self.prompt = torch.tensor([prompt])
        self.digit_ids = torch.tensor(digit_ids)
        self.search = RuleSearch(puzzle)
        self.generator = torch.Generator().manual_seed(seed)
        self.cache = None
        self.sc: torch.Tensor | None = None  # [1, C, V] the previous pass's logits
        self.forwards = 0

    @property
    def done(self) -> bool:
        """Solved, failed (no solution is left), or out of forwards."""
        return self.search.done or self.forwards >= self.max_forwards

    @torch.no_grad()
    def forward(self) -> list[int]:
        """One decoder pass and the search's step on it; returns the cells it accepted."""
        model, device = self.model, self.model.device
        if self.cache is None:
            self.cache = model.new_cache(1, self.prompt.shape[1])
            model.encode(self.prompt.to(device), self.cache)
        text = model.text_config
        canvas = _ruled_canvas(torch.tensor([self.search.board]), self.digit_ids, text.vocab_size,
                               model.config.canvas_length, text.eos_token_id[0], self.generator)
        sc_mask = None if self.sc is None else torch.tensor([True], device=device)
        logits = model.denoise(canvas.to(device), self.cache, torch.tensor([0], device=device), self.sc, sc_mask)
        self.sc = logits
        logp = torch.log_softmax(logits[0, :81, self.digit_ids.to(device)].float(), dim=-1).tolist()  # [81, 9]
        self.forwards += 1
        return self.search.step(logp, self.entropy_bound)


@torch.no_grad()
def solve_autoregressive_ruled(model_dir: str | Path, puzzles: list[str], batch: int = 100,
                               max_forwards: int = DEFAULT_MAX_FORWARDS) -> dict:
    """The autoregressive baseline with the same rule mask: cells in reading order, the givens fed without a
    prediction (a run of them rides along with the next forward), each blank cell the most likely allowed
    digit. At a dead end it goes back to the latest blank cell that still has an allowed digit (its stored
    distribution: no forward) and truncates the cache there: depth-first search in reading order."""
    from .sudoku_rules import OrderedSearch

    model, tok, digit_ids = _load(model_dir)
    searches, forwards = [], []
    start = time.perf_counter()
    for _, chunk, ids, cache in _prompt_batches(model, tok, puzzles, batch, OrderedSearch, cells=81):
        count = [0] * len(chunk)
        prompt_len = ids.shape[1]
        first = model.encode(ids, cache)[:, -1]  # [n, hidden]: predicts cell 1
        fed = [0] * len(chunk)  # cells whose tokens are in the cache
        while active := [k for k, s in enumerate(chunk) if not s.done and count[k] < max_forwards]:
            feeds = []
            for k in active:
                s = chunk[k]
                fed[k] = min(fed[k], s.changed_from)
                s.changed_from = 81
                feeds.append([int(digit_ids[d - 1]) for d in s.board[fed[k]:s.next_cell]])
            rows = torch.tensor(active)
            cache.lengths[rows] = torch.tensor([prompt_len + fed[k] for k in active])
            lengths = torch.tensor([len(f) for f in feeds])
            if int(lengths.max()) == 0:  # only the prompt's own prediction is needed (cell 1 is blank)
                hidden = None
            else:
                width = int(lengths.max())
                batch_ids = torch.zeros(len(active), width, dtype=torch.long)
                for row, f in enumerate(feeds):
                    batch_ids[row, :len(f)] = torch.tensor(f, dtype=torch.long)
                hidden = model.encode(batch_ids, cache, rows, lengths)
            for row, k in enumerate(active):
                if lengths[row] == 0:  # cell 1 is blank and nothing is chosen yet: the prompt's pass predicts it
                    h = first[k]
                else:
                    h = hidden[row, lengths[row] - 1]
                fed[k] += int(lengths[row])
                logp = torch.log_softmax(model.lm_logits(h)[digit_ids], dim=-1).tolist()
                count[k] += 1
                chunk[k].choose(logp)
        searches += chunk
        forwards += count
    return _summary(searches, forwards, time.perf_counter() - start)


def solve_rules_only(puzzles: list[str], max_forwards: int = DEFAULT_MAX_FORWARDS,
                     entropy_bound: float = 0.01) -> dict:
    """The control for `--rule-mask`: the same search fed uniform proposals instead of a model's (every allowed
    digit equally likely; ties go to the lowest cell, digit). What the rules and the backtracking solve alone
    within the same budget of "forwards" (here: search steps, no model runs)."""
    from .sudoku_rules import RuleSearch

    uniform = [[0.0] * 9] * 81
    searches, forwards = [], []
    start = time.perf_counter()
    for p in puzzles:
        s, n = RuleSearch(p), 0
        while not s.done and n < max_forwards:
            s.step(uniform, entropy_bound)
            n += 1
        searches.append(s)
        forwards.append(n)
    return _summary(searches, forwards, time.perf_counter() - start)
