"""Prefix caching on two request traces with the shipped tiny-code model: time to first canvas and total time
per request, with and without the cache.

    python benchmarks/prefix_cache.py [--model letterpress/assets/tiny_code] [--trace chat|agent|both]

- chat: a 10-turn conversation; each request is the whole conversation so far (chat template) plus a new
  user message, and the model's reply joins the conversation.
- agent: one ~2,000-token system prompt (standard-library source as "documentation"), a task, then 20
  requests; after each, the reply and a ~30-token tool output (more source lines) join the conversation.

Each request runs on two engines in one process, one with prefix caching and one without, alternating which
goes first (benchmarks/common.py's timing rule); both see the same prompts because a seeded request gives
the same tokens with and without the cache (checked here and in tests/test_paged_cache.py). Figures: the
sum over the trace of time to first canvas (arrival to the first committed canvas) and of total time, the
ratio off/on of each, and the prompt tokens the cache supplied.
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
from letterpress import LLM, SamplingParams  # noqa: E402

DEFAULT_MODEL = ROOT / "letterpress" / "assets" / "tiny_code"


def source_text(module: str) -> str:
    import importlib

    return Path(importlib.import_module(module).__file__).read_text()


def take_tokens(llm: LLM, text: str, n: int) -> str:
    """The longest whole-line prefix of `text` that is at most `n` tokens."""
    lines, out = text.splitlines(keepends=True), ""
    for line in lines:
        if len(llm.tokenizer.encode(out + line)) > n:
            break
        out += line
    return out


def run_request(llm: LLM, prompt: list[int], params: SamplingParams) -> dict:
    start = time.perf_counter()
    first: list[float] = []

    def listener(event):
        if event.final and not first:
            first.append(time.perf_counter() - start)

    out = llm.generate(prompt, params, listener=listener)[0]
    return {"ttfc": first[0], "total": time.perf_counter() - start, "cached": out.num_cached_tokens,
            "prompt": len(prompt), "text": out.text, "token_ids": out.token_ids}


def run_trace(name: str, engines: dict[str, LLM], first_messages: list[dict], follow_ups: list[str],
              params: SamplingParams) -> dict:
    """Send len(follow_ups) + 1 requests; after each, the reply (as the assistant) and the next follow-up (as
    the user) join the conversation."""
    messages = list(first_messages)
    totals = {k: {"ttfc": 0.0, "total": 0.0, "cached": 0} for k in engines}
    prompt_tokens, same = 0, True
    for i in range(len(follow_ups) + 1):
        prompt = engines["on"].tokenizer.encode_chat(messages)
        prompt_tokens += len(prompt)
        order = list(engines) if i % 2 == 0 else list(engines)[::-1]
        results = {k: run_request(engines[k], prompt, params) for k in order}
        same &= results["on"]["token_ids"] == results["off"]["token_ids"]
        for k, r in results.items():
            for field in ("ttfc", "total", "cached"):
                totals[k][field] += r[field]
        if i < len(follow_ups):
            messages += [{"role": "assistant", "content": results["on"]["text"]},
                         {"role": "user", "content": follow_ups[i]}]
    return {"trace": name, "requests": len(follow_ups) + 1, "prompt_tokens": prompt_tokens,
            "last_prompt_tokens": len(prompt), "identical_outputs": same, **{
                k: {"ttfc_s": round(v["ttfc"], 3), "total_s": round(v["total"], 3), "cached_tokens": v["cached"]}
                for k, v in totals.items()},
            "ttfc_speedup": round(totals["off"]["ttfc"] / totals["on"]["ttfc"], 2),
            "total_speedup": round(totals["off"]["total"] / totals["on"]["total"], 2)}


def chat_trace(engines, params) -> dict:
    questions = ["Write a function that reverses a string.", "Now make it skip whitespace.",
                 "Add a docstring.", "Write a test for it.", "Rename it to flip.", "Handle None input.",
                 "Make it a method of a class Text.", "Add type hints.", "Write a second test.", "Sum it up."]
    return run_trace("chat (10 turns)", engines, [{"role": "user", "content": questions[0]}], questions[1:], params)


def agent_trace(engines, params, system_tokens: int = 2000, tool_tokens: int = 30, requests: int = 20) -> dict:
    llm = engines["on"]
    system = take_tokens(llm, source_text("json.decoder"), system_tokens)
    tool_source = source_text("textwrap").splitlines(keepends=True)
    outputs, line = [], 0
    for _ in range(requests - 1):
        chunk = ""
        while line < len(tool_source) and len(llm.tokenizer.encode(chunk + tool_source[line])) <= tool_tokens:
            chunk += tool_source[line]
            line += 1
        outputs.append("tool output:\n" + chunk)
    first = [{"role": "system", "content": system}, {"role": "user", "content": "Find the bug in scanstring."}]
    return run_trace(f"agent ({requests} requests, {system_tokens}-token system prompt)", engines, first, outputs,
                     params)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--trace", choices=["chat", "agent", "both"], default="both")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: one canvas")
    p.add_argument("--prefill-chunk", type=int, default=512, help="as the server's default")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    set_threads(args.threads)
    engines = {k: LLM(args.model, max_num_seqs=1, max_model_len=4096, prefill_chunk=args.prefill_chunk,
                      enable_prefix_caching=k == "on") for k in ("on", "off")}
    canvas = engines["on"].runner.canvas_length
    params = SamplingParams(max_new_tokens=args.max_new_tokens or canvas, seed=0)
    print(json.dumps({"machine": machine(), "model": args.model, "block_size": engines["on"].runner.cache.block_size}))
    if args.trace in ("chat", "both"):
        print(json.dumps(chat_trace(engines, params)))
    if args.trace in ("agent", "both"):
        print(json.dumps(agent_trace(engines, params)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
