"""`LLM`: the Python API. Loads a checkpoint (or the embedded default), tokenizes, runs the scheduler to
completion and detokenizes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..cache import kv_cache_budget
from ..checkpoint import resolve
from ..config import load_generation_defaults
from ..errors import ConfigError, RequestError
from ..infill import DEFAULT_STRATEGY, EditResult, InfillResult, run_edit, run_infill
from ..model import DiffusionGemma
from ..model.fast import prepare
from ..sampling import Clamp, Draws, GeneratorDraws
from ..tokenizer import Tokenizer
from .request import CanvasEvent, Request, RequestOutput, SamplingParams
from .runner import Runner
from .scheduler import Scheduler

Prompt = str | Sequence[int]


def start_parallel(folder: Path, size: int, expert_parallel: bool, dtype, device, quantization: str | None,
                   impl: str, compile: bool | str):
    """The ranks of a tensor-parallel engine (letterpress.parallel); returns rank 0's driver."""
    from ..config import load_model_config
    from ..model.fast import IMPLS
    from ..parallel import LoadSpec, ParallelConfig, check_shardable, launch
    from ..quant import check_format

    config = ParallelConfig(size, expert_parallel)
    if compile:
        raise ConfigError("--compile is not supported with --tensor-parallel-size > 1 yet (the layers' collectives "
                          "would have to be traced); drop one of them")
    if impl not in IMPLS:
        raise RequestError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    check_shardable(load_model_config(folder).text, config)  # before any process starts
    return launch(config, LoadSpec(str(folder), dtype, str(device), check_format(quantization), impl))
Messages = list[dict]


class LLM:
    """Generate with a DiffusionGemma checkpoint.

    >>> llm = LLM()                      # the embedded default model
    >>> out = llm.generate("def fib(n):", SamplingParams(max_new_tokens=64, seed=0))[0]
    >>> out.text, out.tokens_per_forward
    """

    def __init__(self, model: str | Path | None = None, dtype: torch.dtype | str = "float32",
                 device: str | torch.device = "cpu", max_num_seqs: int = 8, max_model_len: int | None = None,
                 offline: bool | None = None, prefill_chunk: int = 2048, quantization: str | None = None,
                 impl: str = "plain", compile: bool | str = False, kv_cache_memory: str | int | None = None,
                 gpu_memory_utilization: float | None = None, block_size: int = 16,
                 enable_prefix_caching: bool = True, tensor_parallel_size: int = 1,
                 enable_expert_parallel: bool = False):
        """`quantization`: None, "int8", "int4" or "fp8" (letterpress.quant). `impl`: "plain" (the reference
        path) or "fast" (grouped MoE, sliced attention, fused sampler; letterpress.model.fast). `compile`:
        torch.compile each layer (True, or a torch.compile mode). The paged KV cache (letterpress.cache) is
        sized by `kv_cache_memory` (bytes or "4GiB"), else on CUDA by `gpu_memory_utilization` (vLLM's
        fraction of device memory), else for `max_num_seqs` rows of `max_model_len` tokens; `block_size`
        positions per block; `enable_prefix_caching` shares the blocks of equal prompt prefixes.
        `tensor_parallel_size` N > 1: N processes (this one is rank 0) each hold a slice of the model and of
        the KV cache; `enable_expert_parallel` splits the experts by id (letterpress.parallel)."""
        if model is None:
            from ..embedded import default_model_dir

            model = default_model_dir()
        self.model_name = str(model)
        self.folder = resolve(model, offline=offline)
        self.parallel = None
        if tensor_parallel_size != 1:  # expert parallel splits over the TP ranks: nothing to split with one
            self.parallel = start_parallel(self.folder, tensor_parallel_size, enable_expert_parallel, dtype, device,
                                           quantization, impl, compile)
            self.model = self.parallel.model
        else:
            self.model = DiffusionGemma.from_pretrained(self.folder, dtype=dtype, device=device,
                                                        quantization=quantization)  # quantized while loading
            prepare(self.model, impl=impl, quantization=quantization, compile=compile)
        self.tokenizer = Tokenizer.from_dir(self.folder) if (self.folder / "tokenizer.json").is_file() else None
        self.defaults = load_generation_defaults(self.folder, self.model.config)
        text = self.model.text_config
        if max_model_len is None:
            max_model_len = min(text.max_position_embeddings, 4096)
        if max_model_len <= self.model.config.canvas_length:
            raise RequestError(f"max_model_len {max_model_len} cannot hold one canvas ({self.model.config.canvas_length} "
                               f"tokens) and a prompt: use at least {self.model.config.canvas_length + 1}")
        self.max_model_len = max_model_len
        if not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"block_size must be a positive integer, got {block_size!r}")
        budget = kv_cache_budget(self.model.device, kv_cache_memory, gpu_memory_utilization)
        self.runner = Runner(self.model, max_num_seqs, max_model_len, prefill_chunk, self.defaults.pad_token_id,
                             impl=impl, block_size=block_size, kv_cache_bytes=budget,
                             enable_prefix_caching=enable_prefix_caching and self.model.text_config.encoder_is_causal)
        self.scheduler = Scheduler(self.runner, max_num_seqs, max_model_len)

    def close(self) -> None:
        """Stop the tensor-parallel workers now (they also stop when this process exits)."""
        if self.parallel is not None:
            self.parallel.close()

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
                     request_id: str | None = None, clamps: list[Clamp | None] | None = None,
                     timeout: float | None = None) -> Request:
        """`clamps[k]`: known tokens pinned in canvas k (infill, edit; see letterpress.infill). `timeout`:
        seconds from now after which the request is stopped (finish_reason "timeout")."""
        resolved = (params or SamplingParams()).resolve(self.defaults)
        draws = draws or GeneratorDraws(resolved.seed, self.model.device)
        request = Request(prompt_ids, resolved, draws, listener=listener, want_drafts=want_drafts,
                          clamps=list(clamps or []))
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
                raise RequestError(f"timeout must be a number of seconds > 0, got {timeout!r}")
            request.deadline = request.arrival + timeout
        request.check_clamps(self.runner.canvas_length, self.runner.vocab_size)
        if request_id is not None:
            request.request_id = request_id
        return request

    def detokenize(self, output: RequestOutput) -> RequestOutput:
        if self.tokenizer is not None:
            output.text = self.tokenizer.decode(output.token_ids)
        return output

    # ------------------------------------------------------------------------------------------- generation
    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 draws: list[Draws] | None = None, listener: Callable[[CanvasEvent], None] | None = None,
                 timeout: float | None = None) -> list[RequestOutput]:
        """Generate for one prompt or a batch; all rows run together through the scheduler.

        A row that fails in an engine step comes back with finish_reason "error" and the exception in
        `error`; the other rows are unaffected (if every row failed, the first error is raised). `timeout`: seconds per request, after which it comes back
        with finish_reason "timeout" and the canvases it had committed."""
        single = isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int))
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise RequestError("no prompts given")
        param_list = params if isinstance(params, list) else [params] * len(batch)
        if len(param_list) != len(batch):
            raise RequestError("pass one SamplingParams, or one per prompt")
        requests = [self.make_request(self.tokenize(p), sp, draws[i] if draws else None, listener, timeout=timeout)
                    for i, (p, sp) in enumerate(zip(batch, param_list))]
        for request in requests:
            self.scheduler.check(request)
        return self.run(requests)

    def chat(self, conversations: Messages | list[Messages], params: SamplingParams | list[SamplingParams] | None = None,
             listener: Callable[[CanvasEvent], None] | None = None, timeout: float | None = None,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a batch of them; renders the chat template with
        `tools` and `chat_template_kwargs` (e.g. {"enable_thinking": True}), as vLLM's LLM.chat. To split the
        answer into reasoning, content and tool calls, decode `token_ids` with skip_special_tokens=False and
        pass the text to letterpress.chat_output.parse_output."""
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer, so no chat template")
        batch = [conversations] if conversations and isinstance(conversations[0], dict) else conversations
        kwargs = {**(chat_template_kwargs or {}), **({"tools": tools} if tools is not None else {})}
        prompts = [self.tokenizer.encode_chat(c, **kwargs) for c in batch]
        return self.generate(prompts, params, listener=listener, timeout=timeout)

    # ------------------------------------------------------------------------------------ infill and edit
    def infill(self, prefix: str, suffix: str, max_middle_tokens: int | None = None,
               params: SamplingParams | None = None, strategy: str = DEFAULT_STRATEGY,
               lengths: Sequence[int] | None = None) -> InfillResult:
        """Write the text between `prefix` and `suffix` (README, "Infilling and editing"). The prefix is the
        context; the canvas holds up to `max_middle_tokens` (default: half a canvas) free positions and then
        as much of the suffix as fits, clamped. `strategy`: "search" (default: several middle lengths as
        rows of one batch, the most confident wins; `lengths` overrides the candidates), "slack" (one row,
        suffix at the end of the canvas) or "prompt" (plain generation, for comparison)."""
        return self.infill_batch([prefix], [suffix], max_middle_tokens, params, strategy, lengths)[0]

    def infill_batch(self, prefixes: list[str], suffixes: list[str], max_middle_tokens: int | None = None,
                     params: SamplingParams | None = None, strategy: str = DEFAULT_STRATEGY,
                     lengths: Sequence[int] | None = None) -> list[InfillResult]:
        """`infill` for many (prefix, suffix) pairs; all their rows run as one batch."""
        return run_infill(self, list(prefixes), list(suffixes), max_middle_tokens, params, strategy, lengths)

    def edit(self, text: str, spans: Sequence[tuple[int, int]], instruction: str | None = None,
             params: SamplingParams | None = None, slack_tokens: int = 0) -> EditResult:
        """Rewrite the character spans [start, end) of `text` (widened to whole tokens) and keep every other
        character. `instruction` goes into the context before the text; `slack_tokens` extra free positions
        after each span let the replacement be longer than the original."""
        return self.edit_batch([text], [spans], [instruction], params, slack_tokens)[0]

    def edit_batch(self, texts: list[str], spans: list[Sequence[tuple[int, int]]],
                   instructions: list[str | None] | None = None, params: SamplingParams | None = None,
                   slack_tokens: int = 0) -> list[EditResult]:
        instructions = [None] * len(texts) if instructions is None else list(instructions)
        return run_edit(self, list(texts), list(spans), instructions, params, slack_tokens)

    def run(self, requests: list[Request]) -> list[RequestOutput]:
        """Run requests to completion. A request that failed in an engine step comes back with finish_reason
        "error" (its batch-mates are unaffected); when every request failed there is nothing to return, so
        the first one's exception is raised, as a single request's failure always was."""
        for request in requests:
            self.scheduler.add(request)
        results: dict[str, RequestOutput] = {}
        while self.scheduler.has_work():
            for out in self.scheduler.step():
                results[out.request_id] = self.detokenize(out)
        outputs = [results[r.request_id] for r in requests]
        if outputs and all(out.finish_reason == "error" for out in outputs):
            raise outputs[0].error
        return outputs
