"""Bulk reformatting with `letterpress run-batch`: how much do batched rows buy on a CPU? A batch file of held-out
tiny-tasks requests (every family, chat format, tools declared where the family has them, seed = line), run as
a user runs it (`letterpress run-batch`, one process per run, one thread) at several --max-num-seqs, the runs
interleaved; the batch's own seconds from its stats line (model loading excluded), medians over the repeats,
and each run's exact match (a chat answer's content, or its one tool call, against the task's answer).

    python benchmarks/run_batch.py [--model letterpress/assets/tiny_tasks] [--per-family 20] \
        [--max-num-seqs 1,8,32] [--repeats 3] [--json out.json]

--max-num-seqs 1 is one request at a time: a loop of single requests without the per-call start-up.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from letterpress.train.recipes_tasks import TASKS_DIR  # noqa: E402
from letterpress.train.tasks import FAMILIES, Task, held_out_tasks  # noqa: E402

STATS = re.compile(r"\[(\d+) answered, (\d+) failed -> .*; (\d+) completion tokens in ([\d.]+) s .*?, "
                   r"(\d+) canvas\(es\), (\d+) denoising steps")


def openai_messages(messages: list[dict]) -> list[dict]:
    """The task's conversation as an OpenAI client sends it: a tool call's arguments as a JSON string."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                     for c in m["tool_calls"]]
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def batch_lines(tasks: list[Task]) -> list[str]:
    lines = []
    for i, task in enumerate(tasks):
        body = {"messages": openai_messages(task.messages), "seed": i}
        if task.tools is not None:
            body["tools"] = task.tools
        lines.append(json.dumps({"custom_id": f"{task.family}-{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": body}))
    return lines


def correct(task: Task, output: dict) -> bool:
    body = output["response"]["body"]
    if body is None:
        return False
    message = body["choices"][0]["message"]
    if task.kind == "tool_call":
        calls = message.get("tool_calls") or []
        return (len(calls) == 1 and calls[0]["function"]["name"] == task.call["name"]
                and json.loads(calls[0]["function"]["arguments"]) == task.call["arguments"])
    return not message.get("tool_calls") and message.get("content") == task.answer


def run(model: str, src: Path, out: Path, seqs: int, tasks: list[Task]) -> dict:
    cmd = [sys.executable, "-m", "letterpress.cli", "run-batch", "-i", str(src), "-o", str(out), "--model", model,
           "--max-num-seqs", str(seqs), "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"run-batch failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    answered, failed, tokens, seconds, canvases, steps = STATS.search(done.stderr).groups()
    outputs = [json.loads(line) for line in out.read_text().splitlines()]
    return {"seconds": float(seconds), "answered": int(answered), "failed": int(failed),
            "completion_tokens": int(tokens), "canvases": int(canvases), "denoising_steps": int(steps),
            "exact": sum(correct(t, o) for t, o in zip(tasks, outputs)) / len(tasks)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(TASKS_DIR))
    ap.add_argument("--per-family", type=int, default=20, help="held-out requests per family (11 families)")
    ap.add_argument("--max-num-seqs", default="1,8,32", help="comma-separated values to compare")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        seqs = [int(s) for s in args.max_num_seqs.split(",")]
    except ValueError:
        ap.error(f"--max-num-seqs: expected comma-separated integers, got {args.max_num_seqs!r}")
    if args.per_family < 1 or args.repeats < 1 or min(seqs) < 1:
        ap.error("--per-family, --repeats and every --max-num-seqs must be positive")

    tasks = [t for family in sorted(FAMILIES) for t in held_out_tasks(family, args.per_family)]
    runs: dict[int, list[dict]] = {s: [] for s in seqs}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "requests.jsonl"
        src.write_text("\n".join(batch_lines(tasks)) + "\n")
        for r in range(args.repeats):  # interleaved, rotating the order, as benchmarks/common.interleaved
            for s in seqs[r % len(seqs):] + seqs[:r % len(seqs)]:
                runs[s].append(run(args.model, src, Path(tmp) / f"out-{s}.jsonl", s, tasks))
                print(f"  round {r + 1}, --max-num-seqs {s}: {runs[s][-1]['seconds']:.1f} s", file=sys.stderr)

    from benchmarks.common import machine, set_threads

    set_threads(1)
    base = statistics.median(r["seconds"] for r in runs[seqs[0]])
    rows = []
    print(f"{len(tasks)} requests ({args.per_family} per family), {args.repeats} interleaved runs each; "
          f"{machine()}")
    print(f"{'--max-num-seqs':>14} {'seconds':>8} {'requests/s':>10} {'tokens/s':>9} {'speed-up':>8} "
          f"{'tok/forward':>11} {'exact':>6}")
    for s in seqs:
        seconds = statistics.median(r["seconds"] for r in runs[s])
        last = runs[s][-1]
        row = {"max_num_seqs": s, "seconds_median": seconds, "seconds": [r["seconds"] for r in runs[s]],
               "requests_per_s": len(tasks) / seconds, "tokens_per_s": last["completion_tokens"] / seconds,
               "speedup": base / seconds, "tokens_per_forward": last["completion_tokens"] / last["denoising_steps"],
               "exact": [r["exact"] for r in runs[s]], "failed": last["failed"]}
        rows.append(row)
        print(f"{s:>14} {seconds:>8.1f} {row['requests_per_s']:>10.1f} {row['tokens_per_s']:>9.0f} "
              f"{row['speedup']:>7.2f}x {row['tokens_per_forward']:>11.2f} {100 * last['exact']:>5.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "machine": machine(), "requests": len(tasks),
                                               "per_family": args.per_family, "repeats": args.repeats,
                                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
