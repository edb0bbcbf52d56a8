"""Infilling (`suffix` on `/v1/completions`) and editing (`POST /v1/edits`) as server jobs.

Both are ordinary engine rows whose canvas carries a clamp (planned by `letterpress.infill`), so the engine
loop batches them with every other request.

- `suffix`: each (prompt, choice) is one infill. With the search strategy its candidate middle lengths are
  the rows of one `Job` group, and the choice's text is the middle of the row the model was surest of.
  `max_tokens` bounds the middle (default: half a canvas; at most one canvas), `stop` cuts it, and the text
  arrives whole (when streaming, in one chunk per choice once its rows have finished; no denoising
  previews). The prompt must be text; `ignore_eos` does not apply.
- edits: one row per choice; choice j uses seed + j, as everywhere.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict

from ..infill import (
    DEFAULT_STRATEGY,
    EditPlan,
    finish_edit,
    plan_edit,
    plan_infill,
    read_run,
    row_params,
)
from .core import Job, ServerContext
from .engine_loop import RequestStream
from .schemas import ApiError, CompletionRequest, EditRequest, usage
from .text import ChoiceText


log = logging.getLogger("letterpress.server")


def infill_job(server: ServerContext, body: CompletionRequest) -> Job:
    model = server.check_model(body.model)
    prefixes = text_prompts(body.prompt)
    if body.ignore_eos:
        raise ApiError(400, "ignore_eos does not apply to infilling (suffix)", param="ignore_eos")
    if body.stop_token_ids:  # vLLM's; the middle's end is where its free positions meet the suffix
        raise ApiError(400, "stop_token_ids do not apply to infilling (suffix): the middle ends where it meets "
                            "the suffix", param="stop_token_ids", code="unsupported")
    if body.skip_special_tokens is False:
        raise ApiError(400, "skip_special_tokens false does not apply to infilling (suffix): the middle is "
                            "read without special tokens", param="skip_special_tokens", code="unsupported")
    for name in ("response_format", "structured_outputs"):
        if getattr(body, name) is not None:
            raise ApiError(400, f"{name} does not apply to infilling (suffix): the clamped suffix is fixed text",
                           param=name, code="unsupported")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
    if body.wants_preview():
        raise ApiError(400, "denoising_preview is not available with suffix: candidate middles compete until "
                            "the end", param="stream_options", code="unsupported")
    for prefix in prefixes:  # the prefix is the context: it must fit in max_model_len
        server.check_chars(prefix, "the prompt", "prompt")
    codec = server.llm.infill_codec()
    if body.max_tokens is not None and body.max_tokens > codec.canvas_length:
        raise ApiError(400, f"with suffix, max_tokens bounds the middle: at most {codec.canvas_length} (one canvas)",
                       param="max_tokens")
    plans = [plan_infill(codec, prefix, body.suffix, body.max_tokens, body.infill_strategy or DEFAULT_STRATEGY)
             for prefix in prefixes]
    rows_wanted = sum(len(plan.rows) for plan in plans) * body.n
    if rows_wanted > server.engine.capacity:
        raise ApiError(400, f"{rows_wanted} rows (prompts x n x candidate lengths) can never fit: this server holds "
                            f"{server.engine.capacity} (--max-num-seqs + --max-queue)", param="n")
    job_id = "cmpl-" + uuid.uuid4().hex
    stream = RequestStream(server.loop)
    rows, texts, groups, row_prompts = [], [], [], []
    for p, plan in enumerate(plans):
        for j in range(body.n):
            params = row_params(server.sampling_params(body, None, j), codec.canvas_length)
            group = []
            for row in plan.rows:
                index = len(rows)
                request = server.llm.make_request(row.prompt_ids, params, listener=stream.listener(index),
                                                  request_id=f"{job_id}-{index}", clamps=[row.clamp])
                server.llm.scheduler.check(request)
                rows.append(request)
                row_prompts.append(p)
                group.append(index)
                run, limit = row.runs[0], plan.max_middle
                texts.append(ChoiceText(server.llm.tokenizer.decode, body.stop_strings(),
                                        select=lambda ids, run=run, limit=limit: read_run(ids, run, codec.end_ids)[:limit]))
            groups.append(group)
    log.info("%s: infill, %d row(s) for %d choice(s), user=%s", job_id, len(rows), len(groups), body.user)
    return Job(job_id, "completion", model, [plan.rows[0].prompt_ids for plan in plans], rows, texts, stream,
               groups=groups, row_prompts=row_prompts)


def text_prompts(prompt: str | list) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ApiError(400, "with suffix, the prompt must be text (a string or a list of strings)", param="prompt")


def edit_job(server: ServerContext, body: EditRequest) -> tuple[Job, EditPlan]:
    model = server.check_model(body.model)
    if body.n > server.engine.capacity:
        raise ApiError(400, f"{body.n} rows can never fit: this server holds {server.engine.capacity}", param="n")
    starts = [span[0] for span in body.spans if span]  # the schema made them ints; plan_edit checks the rest
    if starts:  # the instruction and the text before the first span are the context: they must fit
        context = (body.instruction or "") + body.input[:max(min(starts), 0)]
        server.check_chars(context, "the text before the first span (with the instruction)", "spans")
    codec = server.llm.infill_codec()
    plan = plan_edit(codec, body.input, body.spans, body.instruction, body.slack_tokens)  # RequestError -> 400
    job_id = "edit-" + uuid.uuid4().hex
    stream = RequestStream(server.loop)
    rows = []
    for j in range(body.n):
        request = server.llm.make_request(plan.row.prompt_ids,
                                          row_params(server.sampling_params(body, None, j), codec.canvas_length),
                                          listener=stream.listener(j), request_id=f"{job_id}-{j}",
                                          clamps=[plan.row.clamp])
        server.llm.scheduler.check(request)
        rows.append(request)
    texts = [ChoiceText(server.llm.tokenizer.decode, []) for _ in rows]
    log.info("%s: edit, %d span(s), %d choice(s), user=%s", job_id, len(plan.row.runs), body.n, body.user)
    return Job(job_id, "edit", model, [plan.row.prompt_ids], rows, texts, stream), plan


def edit_response(server: ServerContext, job: Job, plan: EditPlan) -> dict:
    """OpenAI's (retired) edit response shape, plus each choice's `replacements`."""
    codec = server.llm.infill_codec()
    results = [finish_edit(codec, plan, out) for out in job.outputs]
    written = sum(res.written_tokens for res in results)
    stats = job.usage()["letterpress"]
    stats["tokens_per_forward"] = written / max(stats["denoising_steps"], 1)
    choices = [{"index": j, "text": res.text, "replacements": [asdict(r) for r in res.replacements]}
               for j, res in enumerate(results)]
    return {"id": job.id, "object": "edit", "created": job.created, "model": job.model, "choices": choices,
            "usage": usage(len(job.prompts[0]), written, stats)}
