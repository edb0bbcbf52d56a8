"""What a request asks for (`StructuredOutputsParams`, vLLM's fields) and the per-request state that
constrains its canvases (`Constraint`).

How a constrained row is denoised (runner.py calls `Constraint.paths` after every sampler step):
- the canvas it would commit if it stopped now (its "argmax") is the most probable canvas the automaton
  accepts under the step's log-probabilities (dp.py), so every committed canvas is a valid prefix that can
  still complete within the token budget;
- the proposals the sampler keeps at the positions the entropy bound accepts come from the same DP over the
  log-probabilities plus Gumbel noise (a perturb-and-MAP sample; the argmax path for greedy rows), so the
  next step's input is also valid text where it is not noise. Re-noised positions stay noise: the
  uniform-state model is trained to read them as gaps.
- which positions keep their proposals (the entropy bound) and when the canvas stops (stable and confident)
  read the constrained distribution: at each position of the committed path, the entropy of the step's
  distribution renormalised over the tokens the automaton allows there (`entropy`; 0 after the path's EOS).
  The model's own entropy counts forbidden tokens too, so a constrained canvas rarely passed the threshold
  and ran to the step limit (47.8 of 48 steps on tiny_code; BENCHMARKS.md);
- the automaton state carries over from one canvas to the next (`commit`), so the constraint holds across
  canvases; the last canvas the budget allows must end in an accepted text.

The Gumbel noise comes from a generator seeded by (seed, canvas, step), not from the row's own draws, so a
constrained row's unconstrained random stream is unchanged and a retried step draws the same noise.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import torch

from .automaton import TokenAutomaton
from .dp import best_path
from .regex import SchemaError, choice_regex, json_object_regex, schema_regex


@dataclass
class StructuredOutputsParams:
    """vLLM's `StructuredOutputsParams`: exactly one of json (a JSON schema, as a dict or its JSON text),
    regex, choice (a list of strings), grammar (refused: a context-free grammar has no finite automaton for
    the DP) or json_object (any JSON object). `special_tokens` (letterpress): special tokens the output may
    contain, spelled by their text (the server allows the Gemma chat markers for tool calls)."""

    json: dict | str | bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    special_tokens: tuple[str, ...] = ()

    def to_regex(self) -> str:
        given = [k for k in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise SchemaError("structured output needs exactly one of json, regex, choice, grammar or json_object"
                              + (f" (got {', '.join(given)})" if given else ""))
        kind = given[0]
        if kind == "grammar":
            raise SchemaError("structured output by grammar is not supported: letterpress constrains canvases by "
                              "dynamic programming over a finite automaton, which a context-free grammar does not "
                              "have; use json (a JSON schema), regex or choice")
        if kind == "json_object":
            return json_object_regex()
        if kind == "choice":
            return choice_regex(self.choice)
        if kind == "regex":
            if not isinstance(self.regex, str) or not self.regex:
                raise SchemaError("regex must be a non-empty string")
            return self.regex
        schema = self.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise SchemaError(f"the JSON schema is not valid JSON: {e}") from None
        return schema_regex(schema)


class Constraint:
    """One request's automaton and where its committed text has left it."""

    def __init__(self, automaton: TokenAutomaton, eos_token_ids: list[int], seed: int | None):
        self.automaton = automaton
        self.eos_token_ids = list(eos_token_ids)
        self.state = 0
        self.seed = random.getrandbits(63) if seed is None else seed

    def shortest(self) -> int:
        """The fewest tokens of an accepted text from here."""
        return int(self.automaton.distance[self.state])

    def paths(self, logp: torch.Tensor, budget: int, canvas: int, step: int,
              greedy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logp [C, V] (log-softmax of the step's temperature-scaled logits); `budget`: tokens the request may
        still write. Returns (the canvas to commit, the proposals, the constrained entropy), all [C] on
        logp's device. The canvas to commit holds EOS at every position after its first EOS (those are never
        committed; a fixed token there lets the stopping rule see the canvas as unchanged)."""
        length = logp.shape[0]
        writable = min(length, budget)
        room = None if budget <= length else budget - length
        best = self._fill(best_path(logp[:writable], self.automaton, self.state, self.eos_token_ids, room).tokens,
                          logp)
        best, entropy = self._after_eos(best), self.entropy(logp, best, writable)
        if greedy:
            return best, best, entropy
        noisy = logp + self._gumbel(logp.shape, canvas, step).to(logp.device)
        sample = best_path(noisy[:writable], self.automaton, self.state, self.eos_token_ids, room).tokens
        return best, self._fill(sample, noisy), entropy

    def entropy(self, logp: torch.Tensor, tokens: torch.Tensor, writable: int) -> torch.Tensor:
        """[C] float32: at each position the path `tokens` reaches, the entropy of the step's distribution
        renormalised over the tokens the automaton allows there (and EOS where the text may end). Positions
        after the path's EOS or past the budget are never committed: 0, as certain as a clamp. This is what
        the stopping rule and the entropy bound read for a constrained row: the model's own entropy counts
        tokens the automaton forbids, so a constrained row would otherwise rarely pass the threshold."""
        out = torch.zeros(logp.shape[0], dtype=torch.float32, device=logp.device)
        a = self.automaton.to(logp.device)
        eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=logp.device)
        state: int | None = self.state
        for i, token in enumerate(tokens[:writable].tolist()):
            if state is None:
                break
            allowed = a.allowed(state)
            if bool(self.automaton.accepting[state]) and eos.numel():
                allowed = torch.cat([allowed, eos])
            if allowed.numel() > 1:
                scores = logp[i].index_select(0, allowed).float()
                scores = scores - torch.logsumexp(scores, 0)
                out[i] = -(scores.exp() * scores).sum()
            state = self.automaton.next_state(state, token)  # None after EOS
        return out

    def noise(self, length: int, vocab_size: int, canvas: int, step: int) -> torch.Tensor:
        """Fresh noise [C] for positions the unconstrained step kept but the constrained bound re-noises
        (from the constraint's own generator: the row's draws stay as they were)."""
        # A tuple of ints hashes the same in every process; a str in it would not (PYTHONHASHSEED), and a seeded
        # request must give the same answer in every process. The trailing 1 keeps these draws apart from _gumbel's.
        generator = torch.Generator(device="cpu").manual_seed(hash((self.seed, canvas, step, 1)) & (2**63 - 1))
        return torch.randint(0, vocab_size, (length,), generator=generator)

    def _gumbel(self, shape: torch.Size, canvas: int, step: int) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(hash((self.seed, canvas, step)) & (2**63 - 1))
        return -torch.empty(shape, dtype=torch.float32).exponential_(generator=generator).log_()

    def _after_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        """`tokens` with every position after the first EOS set to that EOS."""
        if not self.eos_token_ids:
            return tokens
        is_eos = torch.isin(tokens, torch.tensor(self.eos_token_ids, device=tokens.device))
        if not bool(is_eos.any()):
            return tokens
        first = int(is_eos.int().argmax())
        tokens = tokens.clone()
        tokens[first + 1:] = tokens[first]
        return tokens

    @staticmethod
    def _fill(tokens: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        """Positions past the budget are cut by the runner: they take their own best token."""
        if tokens.numel() == logp.shape[0]:
            return tokens
        return torch.cat([tokens, logp[tokens.numel():].argmax(-1)])

    def commit(self, tokens: list[int]) -> None:
        """The committed canvas (cut at EOS): move the automaton along it."""
        state = self.automaton.walk(self.state, tokens)
        if state is None:
            raise RuntimeError("a committed canvas left the structured-output automaton (a bug: the DP only "
                               "returns accepted paths)")
        self.state = state
