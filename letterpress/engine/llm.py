"""`LLM`: the Python API. Loads a checkpoint (or the embedded default), tokenizes, runs the scheduler to
completion and detokenizes."""

from __future__ import annotations

import logging
import math
import numbers
import threading
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..cache import kv_cache_budget
from ..checkpoint import resolve
from ..config import load_generation_defaults, vision_config_of
from ..embedded import default_model_dir
from ..errors import CheckpointError, ConfigError, NotSupportedError, RequestError
from ..infill import (DEFAULT_STRATEGY, Codec, EditResult, InfillResult, RowPlan, finish_edit, finish_infill,
                      finish_prompt_infill, plan_edit, plan_infill, prompt_for_infill, prompt_infill_params, row_params)
from ..media.messages import PLACEHOLDER, MediaPart, split_media
from ..media.prompt import MediaRun, MediaTokens, expand_prompt
from ..media.sources import IMAGE, VIDEO, MediaLimits, as_file, open_source
from ..model import DiffusionGemma
from ..model.fast import prepare
from ..model.vision import load_vision_model
from ..sampling import Clamp, Draws, GeneratorDraws
from ..structured import Constraint, compile_regex
from ..structured.size import MAX_EDGES
from ..tokenizer import Tokenizer
from .request import CanvasEvent, Request, RequestOutput, SamplingParams
from .runner import Runner
from .scheduler import Scheduler

log = logging.getLogger("letterpress.engine")
Prompt = str | Sequence[int] | dict  # dict: vLLM's {"prompt" | "prompt_token_ids", "multi_modal_data", ...}


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
                 enable_prefix_caching: bool = True, limit_mm_per_prompt: dict[str, int] | None = None,
                 mm_processor_kwargs: dict | None = None, tensor_parallel_size: int = 1,
                 enable_expert_parallel: bool = False, max_constraint_edges: int | None = None):
        """`quantization`: None, "int8", "int4" or "fp8" (letterpress.quant). `impl`: "plain" (the reference
        path) or "fast" (grouped MoE, sliced attention, fused sampler; letterpress.model.fast). `compile`:
        torch.compile each layer (True, or a torch.compile mode). The paged KV cache (letterpress.cache) is
        sized by `kv_cache_memory` (bytes or "4GiB"), else on CUDA by `gpu_memory_utilization` (vLLM's
        fraction of device memory), else for `max_num_seqs` rows of `max_model_len` tokens; `block_size`
        positions per block; `enable_prefix_caching` shares the blocks of equal prompt prefixes.
        Images (a checkpoint with a vision tower): `limit_mm_per_prompt` ({"image": 2, "video": 1}, vLLM's) caps
        the media of one prompt; `mm_processor_kwargs` ({"max_soft_tokens": 560}) sets the default tier.
        `tensor_parallel_size` N > 1: N processes (this one is rank 0) each hold a slice of the model and of
        the KV cache; `enable_expert_parallel` splits the experts by id (letterpress.parallel).
        `max_constraint_edges`: the largest structured-output automaton a request may compile (default
        letterpress.structured.size.MAX_EDGES; 12 bytes and a few microseconds of CPU per edge)."""
        for name, value in (("max_num_seqs", max_num_seqs), ("prefill_chunk", prefill_chunk),
                            ("max_model_len", max_model_len)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if max_constraint_edges is None:
            max_constraint_edges = MAX_EDGES
        if isinstance(max_constraint_edges, bool) or not isinstance(max_constraint_edges, int) \
                or max_constraint_edges < 1:
            raise ConfigError(f"max_constraint_edges must be a positive integer, got {max_constraint_edges!r}")
        self.max_constraint_edges = max_constraint_edges
        if model is None:
            model = default_model_dir(DiffusionGemma)
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
        if max_model_len > text.max_position_embeddings:  # vLLM refuses this too: positions it never learned
            raise ConfigError(f"max_model_len {max_model_len} is longer than the {text.max_position_embeddings} "
                              "positions this model was trained for (max_position_embeddings in its config.json)")
        if max_model_len <= self.model.config.canvas_length:
            raise RequestError(f"max_model_len {max_model_len} cannot hold one canvas ({self.model.config.canvas_length} "
                               f"tokens) and a prompt: use at least {self.model.config.canvas_length + 1}")
        self.max_model_len = max_model_len
        if not isinstance(block_size, int) or not 1 <= block_size <= max_model_len:
            raise ConfigError(f"block_size must be a positive integer no larger than max_model_len ({max_model_len}), "
                              f"got {block_size!r}")
        budget = kv_cache_budget(self.model.device, kv_cache_memory, gpu_memory_utilization)
        self._init_media(dtype, device, limit_mm_per_prompt, mm_processor_kwargs)
        try:
            self.runner = Runner(self.model, max_num_seqs, max_model_len, prefill_chunk, self.defaults.pad_token_id,
                                 impl=impl, block_size=block_size, kv_cache_bytes=budget,
                                 enable_prefix_caching=enable_prefix_caching and self.model.text_config.encoder_is_causal,
                                 vision=self.vision)
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError, or the CPU allocator's refusal
            if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "alloc" not in str(e):
                raise
            size = f"{budget / 2**30:.1f} GiB" if budget else f"{max_num_seqs} rows of {max_model_len} tokens"
            raise ConfigError(f"the KV cache ({size}) does not fit in this device's memory: lower --kv-cache-memory, "
                              "--max-num-seqs or --max-model-len") from None
        self.scheduler = Scheduler(self.runner, max_num_seqs, max_model_len)
        self._run_lock = threading.Lock()
        self._run_owner: int | None = None  # the thread inside `run`, if any

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix (vLLM's `LLM.reset_prefix_cache`). Loading an adapter with
        `letterpress.train.load_adapter(llm.model, ...)` or quantizing `llm.model` does this by itself."""
        self.runner.cache.reset_prefix_cache()
        return True

    def close(self) -> None:
        """Stop the tensor-parallel workers now (they also stop when this process exits)."""
        if self.parallel is not None:
            self.parallel.close()

    # ------------------------------------------------------------------------------------------- media
    def _init_media(self, dtype, device, limit_mm_per_prompt: dict[str, int] | None,
                    mm_processor_kwargs: dict | None) -> None:
        """The vision tower and processors, when the checkpoint has a tower (else `self.vision` is None)."""
        from ..media.image import ImageProcessor
        from ..media.video import VideoProcessor

        config = vision_config_of(self.model.config)
        self.limit_mm_per_prompt = check_mm_limits(limit_mm_per_prompt)
        self.vision, self.vision_error = None, None
        if config is not None and not all(self.limit_mm_per_prompt.get(k) == 0 for k in (IMAGE, VIDEO)):
            try:  # (vLLM: limits of 0 for every kind skip the tower)
                self.vision = load_vision_model(self.folder, dtype=self.model.dtype, device=device)
            except CheckpointError as e:
                # a checkpoint saved without its tower (a text-only fine-tune, say) still serves text
                self.vision_error = str(e)
                log.warning("images are disabled: the vision tower does not load: %s", e)
                config = None
        self.default_soft_tokens = soft_tokens_of(mm_processor_kwargs, "mm_processor_kwargs")
        self.media_tokens = None
        if self.vision is not None:
            self.image_processor = ImageProcessor.from_config(config)
            self.video_processor = VideoProcessor(self.image_processor)
            cfg = self.model.config
            video = self.tokenizer.token_to_id(PLACEHOLDER[VIDEO]) if self.tokenizer is not None else None
            if None in (cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id):
                raise ConfigError(f"{self.folder}: a vision tower needs image_token_id, boi_token_id and eoi_token_id "
                                  "in config.json")
            self.media_tokens = MediaTokens(cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id, video)

    def check_media_counts(self, counts: dict[str, int]) -> None:
        """A text-only model refuses media; `limit_mm_per_prompt` caps each kind (vLLM's message)."""
        if not any(counts.values()):
            return
        for kind, n in counts.items():  # first: limits of 0 also skip loading the tower
            limit = self.limit_mm_per_prompt.get(kind)
            if limit is not None and n > limit:
                raise RequestError(f"At most {limit} {kind}(s) may be provided in one prompt, got {n} "
                                   "(limit_mm_per_prompt, --limit-mm-per-prompt)")
        if self.vision is None:
            why = f" (its vision tower did not load: {self.vision_error})" if self.vision_error else ""
            raise NotSupportedError(f"this model has no vision tower: it takes text only, not images or video{why}")
        if counts.get(VIDEO) and self.media_tokens.video is None:
            raise NotSupportedError("this model's tokenizer has no <|video|> token: it does not take video")

    def process_media(self, parts: list[MediaPart], limits: MediaLimits | None = None,
                      soft_tokens: int | None = None) -> tuple[list, list]:
        """Open, decode and process media parts: (images, videos) for `expand_prompt`. `limits`: a server
        request's (URLs fetched with size and time limits, local files only under the allowed folder); None:
        the caller's own files. Errors name the part."""
        self.check_media_counts({k: sum(p.kind == k for p in parts) for k in (IMAGE, VIDEO)})
        tier = soft_tokens or self.default_soft_tokens
        images, videos = [], []
        for part in parts:
            try:
                if part.kind == IMAGE and isinstance(part.source, torch.Tensor):
                    images.append(part.source)  # precomputed soft tokens [N, hidden]
                    continue
                source = open_source(part.source, part.kind, limits, part.where)
                if part.kind == IMAGE:
                    images.append(self.image_processor(source, soft_tokens=tier))
                else:
                    videos.append(self.video_processor(as_file(source), max_tokens=self.max_model_len))
            except RequestError as e:
                message = str(e)
                raise RequestError(message if message.startswith(part.where) else f"{part.where}: {message}") from None
        return images, videos

    def media_prompt(self, ids: list[int], parts: list[MediaPart], limits: MediaLimits | None = None,
                     soft_tokens: int | None = None) -> tuple[list[int], list[MediaRun]]:
        """`ids` with each image / video placeholder expanded, and the media runs for `make_request`."""
        if not parts:
            self.check_placeholders(ids)
            return ids, []
        images, videos = self.process_media(parts, limits, soft_tokens)
        return expand_prompt(ids, images, videos, self.media_tokens, self.tokenizer)

    def check_placeholders(self, ids: list[int]) -> None:
        """A prompt without media may not hold image placeholders (there would be nothing to fill them)."""
        tokens = self.media_tokens
        if tokens is not None and any(t in tokens.soft for t in ids):
            raise RequestError("the prompt holds an image or video placeholder token but no media were given")

    def chat_prompt(self, messages: Messages, render, limits: MediaLimits | None = None,
                    soft_tokens: int | None = None):
        """Render a conversation whose messages may hold media parts: `render(messages)` -> (text, extra) with
        the media parts as placeholders the template writes; a template that drops them gets the placeholders
        as text instead. Returns (prompt ids, media runs, extra)."""
        split = split_media(messages)
        self.check_media_counts(split.counts())
        text, extra = render(split.messages)
        if split.parts and any(text.count(PLACEHOLDER[k]) < n for k, n in split.counts().items()):
            text, extra = render(split.flat)  # the template ignores media parts
        ids, runs = self.media_prompt(self.tokenizer.encode(text), split.parts, limits, soft_tokens)
        return ids, runs, extra

    # ------------------------------------------------------------------------------------------- requests
    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this checkpoint has no tokenizer.json: pass token ids instead of text")
            ids = self.tokenizer.encode(prompt)
            bos = self.tokenizer.bos_id
            return ids if bos is None or ids[:1] == [bos] else [bos] + ids
        ids = as_token_ids(prompt)
        if ids is None:
            raise RequestError("a prompt must be a string or a list of token ids")
        return ids

    def make_request(self, prompt_ids: list[int], params: SamplingParams | None = None, draws: Draws | None = None,
                     listener: Callable[[CanvasEvent], None] | None = None, want_drafts: bool = False,
                     request_id: str | None = None, clamps: list[Clamp | None] | None = None,
                     timeout: float | None = None, media: list[MediaRun] | None = None) -> Request:
        """`clamps[k]`: known tokens pinned in canvas k (infill, edit; see letterpress.infill). `timeout`:
        seconds from now after which the request is stopped (finish_reason "timeout")."""
        resolved = (params or SamplingParams()).resolve(self.defaults)
        draws = draws or GeneratorDraws(resolved.seed, self.model.device)
        request = Request(prompt_ids, resolved, draws, listener=listener, want_drafts=want_drafts,
                          clamps=list(clamps or []), media=list(media or []))
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
                raise RequestError(f"timeout must be a number of seconds > 0, got {timeout!r}")
            request.deadline = request.arrival + timeout
        request.check_clamps(self.runner.canvas_length, self.runner.vocab_size)
        if resolved.structured_outputs is not None:
            request.constraint = self.constraint(resolved)
            if request.clamps:
                raise RequestError("structured output cannot be combined with clamps (infill, edit)")
        if request_id is not None:
            request.request_id = request_id
        return request

    def constraint(self, params: SamplingParams) -> Constraint:
        """The automaton of `params.structured_outputs` over this model's vocabulary (compiled once per
        constraint and cached), checked against the token budget."""
        if self.tokenizer is None:
            raise RequestError("structured output needs a checkpoint with a tokenizer.json")
        spec = params.structured_outputs
        automaton = compile_regex(spec.to_regex(), self.tokenizer, params.eos_token_ids,
                                  frozenset(spec.special_tokens), limit=self.max_constraint_edges)
        constraint = Constraint(automaton, params.eos_token_ids, params.seed)
        if constraint.shortest() > params.max_new_tokens:
            # the server's field (a library caller's max_new_tokens is the same number)
            raise RequestError(f"max_tokens {params.max_new_tokens} is too few for this structured output: its "
                               f"shortest valid answer takes {constraint.shortest()} tokens (max_new_tokens in "
                               "SamplingParams)", param="max_tokens")
        return constraint

    def detokenize(self, output: RequestOutput) -> RequestOutput:
        if self.tokenizer is not None:
            output.text = self.tokenizer.decode(output.token_ids)
        return output

    # ------------------------------------------------------------------------------------------- generation
    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 draws: list[Draws] | None = None, listener: Callable[[CanvasEvent], None] | None = None,
                 timeout: float | None = None, *,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for one prompt or a batch; all rows run together through the scheduler.

        A row that fails in an engine step comes back with finish_reason "error" and the exception in
        `error`; the other rows are unaffected (if every row failed, the first error is raised). `timeout`: seconds per request, after which it comes back
        with finish_reason "timeout" and the canvases it had committed."""
        single = isinstance(prompts, (str, dict)) or bool(as_token_ids(prompts))
        batch = [prompts] if single else list(prompts)
        if not batch:
            raise RequestError("no prompts given")
        param_list = per_row_params(params, sampling_params, len(batch))
        requests = []
        for i, (p, sp) in enumerate(zip(batch, param_list)):
            ids, media = self.prompt_with_media(p)
            requests.append(self.make_request(ids, sp, draws[i] if draws else None, listener, timeout=timeout,
                                              media=media))
        for request in requests:
            self.scheduler.check(request)
        return self.run(requests)

    def prompt_with_media(self, prompt: Prompt) -> tuple[list[int], list[MediaRun]]:
        """Token ids and media runs of a prompt: a string or ids, or vLLM's dict {"prompt" (text with one
        <|image|> / <|video|> per item) or "prompt_token_ids", "multi_modal_data": {"image": x or [x, ...],
        "video": ...}, "mm_processor_kwargs": {"max_soft_tokens": T}}; items are PIL images, paths, URLs, bytes,
        or (images) precomputed soft tokens [N, hidden]."""
        if not isinstance(prompt, dict):
            ids = self.tokenize(prompt)
            self.check_placeholders(ids)
            return ids, []
        unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data", "mm_processor_kwargs"}
        if unknown or ("prompt" in prompt) == ("prompt_token_ids" in prompt):
            raise RequestError('a dict prompt is {"prompt": text} or {"prompt_token_ids": ids}, with optional '
                               f'"multi_modal_data" and "mm_processor_kwargs"{f"; unknown {sorted(unknown)}" if unknown else ""}')
        ids = self.tokenize(prompt.get("prompt", prompt.get("prompt_token_ids")))
        data = prompt.get("multi_modal_data") or {}
        if not isinstance(data, dict) or set(data) - {IMAGE, VIDEO}:
            raise RequestError('multi_modal_data must be {"image": ..., "video": ...}')
        parts = []
        for kind in (IMAGE, VIDEO):
            items = data.get(kind, [])
            items = items if isinstance(items, list) else [items]
            parts += [MediaPart(kind, item, f"multi_modal_data[{kind!r}][{i}]") for i, item in enumerate(items)]
        return self.media_prompt(ids, parts, None, soft_tokens_of(prompt.get("mm_processor_kwargs")))

    def chat(self, conversations: Messages | list[Messages], params: SamplingParams | list[SamplingParams] | None = None,
             listener: Callable[[CanvasEvent], None] | None = None, timeout: float | None = None,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
             mm_processor_kwargs: dict | None = None, *,
             sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a batch of them; renders the chat template with
        `tools` and `chat_template_kwargs` (e.g. {"enable_thinking": True}), as vLLM's LLM.chat. To split the
        answer into reasoning, content and tool calls, decode `token_ids` with skip_special_tokens=False and
        pass the text to letterpress.chat_output.parse_output.

        Content parts may be images and videos (README, "Images and video"): {"type": "image", "image": PIL
        image or path}, {"type": "image_url", "image_url": {"url": ...}}, {"type": "video", "video": path}, ...;
        `mm_processor_kwargs` {"max_soft_tokens": T} picks the image tier."""
        if self.tokenizer is None:
            raise RequestError("this checkpoint has no tokenizer, so no chat template")
        batch = [conversations] if conversations and isinstance(conversations[0], dict) else conversations
        if not batch:
            raise RequestError("no conversations given")  # as generate's "no prompts given"
        kwargs = {**(chat_template_kwargs or {}), **({"tools": tools} if tools is not None else {})}
        tier = soft_tokens_of(mm_processor_kwargs)
        requests = []
        param_list = per_row_params(params, sampling_params, len(batch), "conversation")
        for conversation, sp in zip(batch, param_list):
            ids, media, _ = self.chat_prompt(
                conversation, lambda m: (self.tokenizer.apply_chat_template(m, **kwargs), None), soft_tokens=tier)
            requests.append(self.make_request(ids, sp, None, listener, timeout=timeout, media=media))
        for request in requests:
            self.scheduler.check(request)
        return self.run(requests)

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
        codec = self.infill_codec()
        if isinstance(prefixes, str) or isinstance(suffixes, str):  # list("ab") would be two one-letter prefixes
            raise RequestError("infill_batch takes lists of prefixes and suffixes; infill takes one of each")
        prefixes, suffixes = list(prefixes), list(suffixes)
        if len(prefixes) != len(suffixes):
            raise RequestError("pass one suffix per prefix")
        if strategy == "prompt":
            gen = prompt_infill_params(codec, prefixes, suffixes, max_middle_tokens, params, lengths)
            outputs = self.generate([prompt_for_infill(p, s) for p, s in zip(prefixes, suffixes)], gen)
            return [finish_prompt_infill(codec, p, s, out, gen.max_new_tokens)
                    for p, s, out in zip(prefixes, suffixes, outputs)]
        plans = [plan_infill(codec, p, s, max_middle_tokens, strategy, lengths) for p, s in zip(prefixes, suffixes)]
        outputs = self.run_clamped([row for plan in plans for row in plan.rows], params)
        results, at = [], 0
        for plan in plans:  # each plan's candidate rows, in order
            results.append(finish_infill(codec, plan, outputs[at:at + len(plan.rows)]))
            at += len(plan.rows)
        return results

    def edit(self, text: str, spans: Sequence[tuple[int, int]], instruction: str | None = None,
             params: SamplingParams | None = None, slack_tokens: int = 0) -> EditResult:
        """Rewrite the character spans [start, end) of `text` (widened to whole tokens) and keep every other
        character. `instruction` goes into the context before the text; `slack_tokens` extra free positions
        after each span let the replacement be longer than the original."""
        return self.edit_batch([text], [spans], [instruction], params, slack_tokens)[0]

    def edit_batch(self, texts: list[str], spans: list[Sequence[tuple[int, int]]],
                   instructions: list[str | None] | None = None, params: SamplingParams | None = None,
                   slack_tokens: int = 0) -> list[EditResult]:
        codec = self.infill_codec()
        if isinstance(texts, str):  # each character would be a text of its own
            raise RequestError("edit_batch takes a list of texts; edit takes one")
        instructions = [None] * len(texts) if instructions is None else list(instructions)
        if not (len(texts) == len(spans) == len(instructions)):
            raise RequestError("pass one list of spans (and one instruction) per text")
        plans = [plan_edit(codec, t, s, i, slack_tokens) for t, s, i in zip(texts, spans, instructions)]
        outputs = self.run_clamped([plan.row for plan in plans], params)
        return [finish_edit(codec, plan, out) for plan, out in zip(plans, outputs)]

    def infill_codec(self) -> Codec:
        """What infill and edit planning (letterpress.infill) needs to know about this model."""
        if self.tokenizer is None:
            raise RequestError("infilling and editing need a checkpoint with a tokenizer.json")
        eos = list(self.defaults.eos_token_ids)
        return Codec(self.tokenizer, self.runner.canvas_length, eos[0], frozenset(eos) | {self.defaults.pad_token_id},
                     max_context=self.max_model_len - self.runner.canvas_length)

    def clamped_rows(self, plans: list[RowPlan], params: SamplingParams | None) -> list[Request]:
        """One request per planned row: its context, and its canvas's clamp over one whole canvas."""
        canvas = self.runner.canvas_length
        return [self.make_request(plan.prompt_ids, row_params(params, canvas), clamps=[plan.clamp]) for plan in plans]

    def run_clamped(self, plans: list[RowPlan], params: SamplingParams | None) -> list[RequestOutput]:
        requests = self.clamped_rows(plans, params)
        for request in requests:
            self.scheduler.check(request)
        return self.run(requests)

    def run(self, requests: list[Request]) -> list[RequestOutput]:
        """Run requests to completion. A request that failed in an engine step comes back with finish_reason
        "error" (its batch-mates are unaffected); when every request failed there is nothing to return, so
        the first one's exception is raised, as a single request's failure always was.

        Calls from several threads run one after another (the engine steps one batch at a time; vLLM's `LLM`
        is not thread-safe either, the server is the way to share one model). A call interrupted by Ctrl-C
        leaves nothing behind: its requests are dropped, so the next call does not finish them first."""
        if self._run_owner == threading.get_ident():
            raise RequestError("the engine is already running a call in this thread: a listener cannot start "
                               "another generate / chat (abort from it with llm.scheduler.abort)")
        with self._run_lock:
            self._run_owner = threading.get_ident()
            try:
                return self._run(requests)
            finally:
                self._run_owner = None

    def _run(self, requests: list[Request]) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        try:
            for request in requests:
                self.scheduler.add(request)
            while self.scheduler.has_work():
                for out in self.scheduler.step():
                    results[out.request_id] = self.detokenize(out)
        except BaseException:
            self.scheduler.drop({r.request_id for r in requests})
            raise
        outputs = [results[r.request_id] for r in requests]
        if outputs and all(out.finish_reason == "error" for out in outputs):
            raise outputs[0].error
        return outputs


def as_token_ids(x) -> list[int] | None:
    """`x` as a list of ints when it is a list, tuple or 1-D numpy / torch array of integers (bools are not
    token ids, though Python counts them as ints), else None."""
    if isinstance(x, (str, bytes, dict)) or not hasattr(x, "__len__"):
        return None
    if hasattr(x, "tolist") and hasattr(x, "ndim"):  # numpy / torch: .tolist() gives Python ints (or bools)
        if x.ndim != 1:
            return None
        x = x.tolist()
    if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in x):
        return None
    return [int(t) for t in x]


def per_row_params(params, sampling_params, rows: int, row: str = "prompt") -> list[SamplingParams | None]:
    """One SamplingParams per row, from one for all or a list / tuple of one each. `sampling_params` is vLLM's
    name for the same argument, taken so that vLLM code runs as written."""
    if sampling_params is not None:
        if params is not None:
            raise RequestError("pass params or sampling_params (the same argument under vLLM's name), not both")
        params = sampling_params
    param_list = list(params) if isinstance(params, (list, tuple)) else [params] * rows
    if len(param_list) != rows:
        raise RequestError(f"pass one SamplingParams, or one per {row}")
    bad = next((p for p in param_list if p is not None and not isinstance(p, SamplingParams)), None)
    if bad is not None:
        raise RequestError(f"params must be SamplingParams, got {type(bad).__name__}")
    return param_list


def check_mm_limits(limits: dict[str, int] | None) -> dict[str, int]:
    """vLLM's `limit_mm_per_prompt`: {"image": N, "video": M}, non-negative integers."""
    if limits is None:
        return {}
    if not isinstance(limits, dict) or any(k not in (IMAGE, VIDEO) for k in limits) or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in limits.values()):
        raise ConfigError(f'limit_mm_per_prompt must map "image" / "video" to counts >= 0, got {limits!r}')
    return dict(limits)


def soft_tokens_of(kwargs: dict | None, name: str = "mm_processor_kwargs") -> int | None:
    """The image tier from vLLM-style processor kwargs {"max_soft_tokens": T} (None: the config's default)."""
    from ..config import IMAGE_TIERS

    if kwargs is None:
        return None
    if not isinstance(kwargs, dict) or set(kwargs) - {"max_soft_tokens"}:
        raise RequestError(f'{name} takes only {{"max_soft_tokens": T}} with T one of {list(IMAGE_TIERS)}, got {kwargs!r}')
    tier = kwargs.get("max_soft_tokens")
    if tier is not None and (isinstance(tier, bool) or tier not in IMAGE_TIERS):
        raise RequestError(f"{name}.max_soft_tokens must be one of {list(IMAGE_TIERS)}, got {tier!r}")
    return tier
