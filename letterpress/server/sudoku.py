"""`"rule_mask": "sudoku"` on /v1/completions: solve the prompt's Sudoku with the rule-mask search of
`letterpress sudoku --rule-mask` (apps/sudoku_rules.py) instead of the plain sampler.

The request is a completion of a Sudoku model (`letterpress serve letterpress/assets/sudoku`) whose prompt is the
puzzle: the model's own prompt (81 cell words, `apps.sudoku.prompt_text`, what the playground sends) or a grid
(81 digits, 0 or . for blanks). It is validated here, on a preparation thread: a malformed grid, givens that
break a rule, a model that is not a Sudoku model, or a field the search cannot honour is a 400 before anything
runs. The search runs on the engine thread as an `EngineTask` (server/engine_loop.py), one decoder pass per turn
of the engine loop, into a KV cache of its own; each pass becomes a `denoising_preview` event (the board: the
givens and the cells accepted so far, "0" elsewhere; `accepted_mask` marks this pass's cells). The answer is the
81 digits of a solution, or "" when no valid solution was found in the budget (`finish_reason` "length") or none
exists (`"stop"`); `usage.letterpress.rule_mask` says which, with the passes and backtracks.

A puzzle with fewer givens than the served model was trained on (`sudoku_trained_givens` in its
generation_config.json) gets `usage.letterpress.harder_than_trained`, as `letterpress sudoku` prints its note:
with the rule mask and in a plain completion of the same puzzle alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..apps.sudoku import harder_than_trained, is_solution, parse_prompt
from ..apps.sudoku_solve import DEFAULT_MAX_FORWARDS, RuledDiffusionSearch, sudoku_token_ids
from ..engine.request import CanvasEvent, Request, RequestOutput
from . import vllm_compat
from .core import Job, ServerContext
from .schemas import ApiError, CompletionRequest

GREEDY_BELOW = 1e-5  # as app.GREEDY_BELOW (vLLM's _SAMPLING_EPS)


@dataclass
class RuledOutput(RequestOutput):
    """A RequestOutput with the search's figures, for `usage.letterpress.rule_mask`."""

    rule_mask: dict = field(default_factory=dict)


class SudokuTask:
    """One request's search, advanced by the engine thread one decoder pass at a time."""

    def __init__(self, model, prompt: list[int], digit_ids: list[int], zero_id: int, puzzle: str,
                 entropy_bound: float, seed: int, max_forwards: int):
        self.puzzle = puzzle
        self.cell_ids = [zero_id, *digit_ids]  # token id of each cell value 0-9 (0: no digit accepted yet)
        self.search = RuledDiffusionSearch(model, prompt, digit_ids, puzzle, entropy_bound, seed, max_forwards)

    @property
    def decoder_passes(self) -> int:
        """The search's decoder passes so far (its prompt's encoder pass is not one), for /metrics."""
        return self.search.forwards

    def board_ids(self, board: list[int]) -> list[int]:
        return [self.cell_ids[v] for v in board]

    def advance(self, request: Request) -> RequestOutput | None:
        accepted = self.search.forward()
        s, forwards = self.search.search, self.search.forwards
        if request.want_drafts and request.listener is not None:
            cells = set(accepted)
            request.listener(CanvasEvent(request.request_id, 0, forwards, self.board_ids(s.board), False,
                                         accepted=len(accepted), accepted_mask=[i in cells for i in range(81)]))
        if not self.search.done:
            return None
        answer = s.text() if s.solved else ""
        solved = is_solution(answer, self.puzzle)  # valid by construction; checked all the same
        token_ids = self.board_ids(s.board) if solved else []
        # the finished canvas, empty without a solution: its passes count in /metrics' steps per canvas all the
        # same, as a plain canvas's that ran out of steps
        if request.listener is not None:
            request.listener(CanvasEvent(request.request_id, 0, forwards, token_ids, True, accepted=len(accepted)))
        blanks = self.puzzle.count("0")
        stats = {"name": "sudoku", "solved": solved, "forwards": forwards, "max_forwards": self.search.max_forwards,
                 "backtracks": s.backtracks, "cells_per_forward": blanks / forwards if solved else 0.0}
        # finish: "stop" with a solution, or when the search ran out of options (no solution exists);
        # "length" when the budget of passes ran out first
        reason = "stop" if solved or s.failed else "length"
        return RuledOutput(request.request_id, request.prompt_token_ids, token_ids, reason, int(solved),
                           [forwards], forwards, (len(token_ids) + solved) / forwards,  # + its EOS, as the plain path
                           time.perf_counter() - request.arrival, rule_mask=stats)


def harder_puzzle_note(trained: tuple[int, int] | None, prompt) -> dict:
    """`{"harder_than_trained": {"givens", "trained_givens", "message"}}` for `usage.letterpress` when `prompt` is
    a Sudoku (the model's prompt or a grid) with fewer givens than the served Sudoku model was trained on
    (`trained`, None for any other model), else {}."""
    if trained is None or not isinstance(prompt, str):
        return {}
    try:
        puzzle = parse_prompt(prompt)
    except ValueError:  # not a puzzle: nothing to say
        return {}
    note = harder_than_trained(puzzle, trained)
    if note is None:
        return {}
    return {"harder_than_trained": {"givens": note.givens, "trained_givens": list(note.trained_givens),
                                    "message": note.message}}


def refuse(message: str, param: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def sudoku_job(server: ServerContext, body: CompletionRequest) -> Job:
    """Validate a `rule_mask: "sudoku"` completion and plan its job (one row, run as a SudokuTask)."""
    llm = server.llm
    if not isinstance(body.prompt, str):
        raise refuse("rule_mask 'sudoku' takes one puzzle as a string prompt: the Sudoku model's prompt (81 cell "
                     "words) or a grid of 81 digits (0 or . for blanks)", "prompt")
    for name, value, off in (("suffix", body.suffix, (None, "")), ("n", body.n, (1,)),
                             ("structured_outputs", body.structured_outputs, (None,)),
                             ("response_format", body.response_format, (None,)),
                             ("stop", body.stop, (None, "", [])),  # a stop cut the 81 digits short: "7945"
                             ("stop_token_ids", body.stop_token_ids, (None, []))):
        if value not in off:
            raise refuse(f"'{name}' cannot be combined with rule_mask 'sudoku' (one puzzle, one answer: the 81 "
                         "digits of a solution or nothing)", name, "unsupported")
    if body.temperature is not None and body.temperature >= GREEDY_BELOW:
        raise refuse("rule_mask 'sudoku' decodes greedily (the model's surest allowed digits first): leave "
                     "temperature unset or 0", "temperature", "unsupported")
    for name, value, off in (("t_min", body.t_min, (None,)), ("t_max", body.t_max, (None,)),
                             ("top_k", body.top_k, (None, 0, -1))):
        if value not in off:
            raise refuse(f"'{name}' is a sampler setting, and rule_mask 'sudoku' does not sample (greedy search)",
                         name, "unsupported")
    if body.max_tokens is not None and body.max_tokens < 81:
        raise refuse(f"max_tokens {body.max_tokens} cannot hold a Sudoku's 81 cells", "max_tokens")
    if llm.parallel is not None:
        raise refuse("rule_mask 'sudoku' does not run with tensor parallel", "rule_mask", "unsupported")
    server.check_chars(body.prompt, "the prompt", "prompt")
    try:
        puzzle = parse_prompt(body.prompt)
    except ValueError as e:
        raise refuse(f"the prompt is not a Sudoku: {e}", "prompt") from None
    try:
        prompt, digit_ids = sudoku_token_ids(llm.tokenizer, llm.model.config.canvas_length, puzzle)
    except ValueError as e:
        raise refuse(f"rule_mask 'sudoku' needs a Sudoku model (letterpress serve letterpress/assets/sudoku), and "
                     f"the served model is not one: {e}", "rule_mask", "unsupported") from None
    # the budget of decoder passes: max_denoising_steps (or vLLM's diffusion_max_steps), else 81, as the CLI
    ceiling = getattr(server, "step_ceiling", None)
    budget = body.max_denoising_steps or vllm_compat.diffusion_xargs(body.vllm_xargs) or DEFAULT_MAX_FORWARDS
    if ceiling is not None:
        if body.max_denoising_steps is not None and body.max_denoising_steps > ceiling:
            raise refuse(f"max_denoising_steps {body.max_denoising_steps} exceeds this server's limit of {ceiling} "
                         "(--max-denoising-steps)", "max_denoising_steps")
        budget = min(budget, ceiling)
    bound = body.entropy_bound or server.config.entropy_bound or llm.defaults.entropy_bound
    seed = body.seed if body.seed is not None else 0
    plain = body.model_copy(update={"max_denoising_steps": None, "vllm_xargs": None})
    job = server.make_job("completion", plain, [prompt], 81)
    zero_id = llm.tokenizer.encode("0", add_special_tokens=False)[0]
    job.tasks = [SudokuTask(llm.model, prompt, digit_ids, zero_id, puzzle, bound, seed, budget)]
    job.usage_notes.update(harder_puzzle_note(server.sudoku_trained_givens, puzzle))
    return job
