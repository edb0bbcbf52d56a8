"""`LLM`: the Python API. Loads a checkpoint (or the embedded default), tokenizes, runs the scheduler to
completion and detokenizes."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from ..checkpoint import parse_dtype, resolve
from ..config import load_generation_defaults
from ..errors import RequestError
from ..model import DiffusionGemma
from ..sampling import Draws, GeneratorDraws
from ..tokenizer import Tokenizer
from .request import CanvasEvent, Request, RequestOutput, SamplingParams
from .runner import Runner
from .scheduler import Scheduler

Prompt = str | Sequence[int]
Messages = list[dict]


class LLM:
    """Generate with a DiffusionGemma checkpoint.

    >>> llm = LLM()                      # the embedded default model
    >>> out = llm.generate("def fib(n):", SamplingParams(max_new_tokens=64, seed=0))[0]
    >>> out.text, out.tokens_per_forward
    """

    def __init__(self, model: str | Path | None = None, dtype: torch.dtype | str = "float32",
                 device: str | torch.device = "cpu", max_num_seqs: int = 8, max_model_len: int | None = None,
                 offline: bool | None = None, prefill_chunk: int = 2048):
        if model is None:
            from ..embedded import default_model_dir

            model = default_model_dir()
        self.model_name = str(model)
        self.folder = resolve(model, offline=offline)
        self.model = DiffusionGemma.from_pretrained(self.folder, dtype=parse_dtype(dtype), device=device)
        self.tokenizer = Tokenizer.from_dir(self.folder) if (self.folder / "tokenizer.json").is_file() else None
        self.defaults = load_generation_defaults(self.folder, self.model.config)
        text = self.model.text_config
        if max_model_len is None:
            max_model_len = min(text.max_position_embeddings, 4096)
        self.max_model_len = max_model_len
        self.runner = Runner(self.model, max_num_seqs, max_model_len, prefill_chunk, self.defaults.pad_token_id)
        self.scheduler = Scheduler(self.runner, max_num_seqs, max_model_len)

    # ------------------------------------------------------------------------------------------- requests
    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this checkpoint has no tokenizer.json: pass token ids instead of text")
            ids = self.tokenizer.encode(prompt)
            bos = self.tokenizer.bos_id
            return ids if bos is None or ids[:1] == [bos] else [bos] + ids
        if not all(isinstance(t, int) for t in prompt):
            raise RequestError("a prompt must be a string or a list of token ids")
        return list(prompt)

    def make_request(self, prompt_ids: list[int], params: SamplingParams | None = None, draws: Draws | None = None,
                     listener: Callable[[CanvasEvent], None] | None = None, want_drafts: bool = False,
                     request_id: str | None = None) -> Request:
        resolved = (params or SamplingParams()).resolve(self.defaults)
        draws = draws or GeneratorDraws(resolved.seed, self.model.device)
        request = Request(prompt_ids, resolved, draws, listener=listener, want_drafts=want_drafts)
        if request_id is not None:
            request.request_id = request_id
        return request

    def detokenize(self, output: RequestOutput) -> RequestOutput:
        if self.tokenizer is not None:
            output.text = self.tokenizer.decode(output.token_ids)
        return output

    # ------------------------------------------------------------------------------------------- generation
    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 draws: list[Draws] | None = None,
                 listener: Callable[[CanvasEvent], None] | None = None) -> list[RequestOutput]:
        """Generate for one prompt or a batch; all rows run together through the scheduler."""
        single = isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise RequestError("no prompts given")
        param_list = params if isinstance(params, list) else [params] * len(batch)
        if len(param_list) != len(batch):
            raise RequestError("pass one SamplingParams, or one per prompt")
        requests = [self.make_request(self.tokenize(p), sp, draws[i] if draws else None, listener)
                    for i, (p, sp) in enumerate(zip(batch, param_list))]
        for request in requests:
            self.scheduler.check(request)
        return self.run(requests)

    def chat(self, conversations: Messages | list[Messages], params: SamplingParams | list[SamplingParams] | None = None,
             listener: Callable[[CanvasEvent], None] | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a batch of them; renders the chat template."""
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer, so no chat template")
        batch = [conversations] if conversations and isinstance(conversations[0], dict) else conversations
        return self.generate([self.tokenizer.encode_chat(c) for c in batch], params, listener=listener)

    def run(self, requests: list[Request]) -> list[RequestOutput]:
        for request in requests:
            self.scheduler.add(request)
        results: dict[str, RequestOutput] = {}
        while self.scheduler.has_work():
            for out in self.scheduler.step():
                results[out.request_id] = self.detokenize(out)
        return [results[r.request_id] for r in requests]
