"""Is the embedded default model right, and how parallel is its decoding? Exact match per task family on
held-out examples, tokens per forward, and the latency of one reply.

    python benchmarks/default_model.py [--model letterpress/assets/tiny_tasks] [--n 100] [--threads 1]
        [--phrasing train|held_out|both] [--values pooled|open|real|pieces] [--plain] [--greedy] [--json out.json] [--plot DIR]
        [--prompt TEXT --seeds N]

Examples: `letterpress.train.tasks.held_out_tasks`, a seed no training stream uses, and none whose prompt occurs
in the recipe's training stream (seed 0). `--phrasing held_out` asks in a wording of each family that training
never used (how far the model generalises beyond its templates). Each example is one chat request with the
checkpoint's sampler, seed = index, batches of `--batch`.

`--values open` draws the examples' names, cities, items, keys and numbers from `tasks.OPEN` (made-up words,
wide ranges) instead of the training pools: whether the model copies what it is given or recalls the values it
was trained on (the families whose tasks draw values: not arithmetic or units). Answers longer than one canvas
are kept and counted (`over_one_canvas`). `--values real` draws real names, cities and words outside every
pool (`tasks.REAL`: "Ada", "London", "walnut"), what a user types; `--values pieces` made-up words joined from
the tokenizer's pieces (`recipes_tasks.PIECES`, which the `tiny-tasks-copy` stage trains on).

Exact match: a text answer must equal the expected text exactly (the content `chat_output.parse_output` gives);
a tool call must come out as exactly one call of the expected name whose JSON arguments equal the expected ones
(what the agent API returns). `--plain` also scores the single-turn families without the chat template
(`letterpress generate "..."`, which the README's first command uses).

`--prompt TEXT --seeds N`: only that plain prompt (as `letterpress generate "TEXT" --seed S` runs it), seeds
0..N-1, and how many times each distinct answer came out (how the README's first command was checked).

Latency: `--latency N` single requests (batch 1) in turn, one per family in rotation, wall time from the call to
the decoded reply; median and 90th percentile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, set_threads  # noqa: E402
from letterpress.train import tasks as T  # noqa: E402
from letterpress.train.recipes_tasks import (OPEN_FAMILIES, PIECES, TASKS_CANVAS, TASKS_DIR, judge,  # noqa: E402
                                             render, training_prompts)

VALUES = {"pooled": T.POOLED, "open": T.OPEN, "real": T.REAL, "pieces": PIECES}


def run_family(llm, tasks: list[T.Task], batch: int, plain: bool = False, **sampler) -> dict:
    from letterpress import SamplingParams

    outs = []
    for start in range(0, len(tasks), batch):
        chunk = tasks[start:start + batch]
        params = [SamplingParams(seed=start + i, **sampler) for i in range(len(chunk))]
        if plain:
            outs += llm.generate([t.messages[0]["content"] for t in chunk], params)
        else:
            # tasks of a family share whether they declare tools, but not which: one request each if they do
            if chunk[0].tools is None:
                outs += llm.chat([t.messages for t in chunk], params)
            else:
                for t, p in zip(chunk, params):
                    outs += llm.chat(t.messages, p, tools=t.tools)
    raws = [llm.tokenizer.decode(o.token_ids, skip_special_tokens=False) for o in outs]
    right = [judge(t, r) for t, r in zip(tasks, raws)]
    wrong = [(t.messages[0]["content"], t.answer, r) for t, r, ok in zip(tasks, raws, right) if not ok]
    return {"exact": sum(right) / len(right), "n": len(right),
            "tokens_per_forward": statistics.mean(o.tokens_per_forward for o in outs),
            # all the family's tokens over all its passes (what "N tokens per forward" means for a server's load)
            "tokens_per_forward_pooled": sum(o.tokens_per_forward * sum(o.steps_per_canvas) for o in outs)
            / max(1, sum(sum(o.steps_per_canvas) for o in outs)),
            "steps": statistics.mean(sum(o.steps_per_canvas) for o in outs),
            "answer_tokens": statistics.mean(len(o.token_ids) for o in outs), "wrong_samples": wrong[:3],
            **({"by_kind": by_kind(tasks, right)} if tasks and tasks[0].family == "sort_dedup" else {}),
            **({"worked": worked_steps(tasks, raws, right)} if any("<channel|>" in r for r in raws) else {})}


def worked_steps(tasks: list[T.Task], raws: list[str], right: list[bool]) -> dict:
    """For a model that writes worked steps in its thought channel (the probes `arith-worked`, `arith-aligned`,
    `sort-padded`): which formulation of `tasks.THOUGHTS` its thoughts match most often, how often they are
    right (a task the formulation gives no thought counts as right when the model writes none), and the answer
    with them; for `aligned`, also how often the operands before '=' are copied right."""
    from letterpress.chat_output import parse_output

    family = tasks[0].family
    thoughts = [parse_output(raw, tool_calls=False).reasoning or None for raw in raws]
    formulations = {name: [want(t) for t in tasks] for name, (fam, want) in T.THOUGHTS.items() if fam == family}
    if not formulations:
        return {}
    name, wants = max(formulations.items(), key=lambda kv: sum(w == g for w, g in zip(kv[1], thoughts)))
    out = {"formulation": name, "steps_right": 0, "steps_and_answer_right": 0, "answer_right_steps_wrong": 0}
    for want, got, ok in zip(wants, thoughts, right):
        steps_ok = want == got
        out["steps_right"] += steps_ok
        out["steps_and_answer_right"] += steps_ok and ok
        out["answer_right_steps_wrong"] += ok and not steps_ok
    if name == "aligned":  # the copies before '=' apart from the computed result after it
        out["operands_right"] = sum(bool(got) and got.split("=")[0] == want.split("=")[0]
                                    for want, got in zip(wants, thoughts))
    return out


def by_kind(tasks: list[T.Task], right: list[bool]) -> dict[str, list[int]]:
    """sort_dedup split into lists of words and of numbers: kind -> [right, n]."""
    out: dict[str, list[int]] = {}
    for task, ok in zip(tasks, right):
        counts = out.setdefault("numbers" if task.answer[0].isdigit() else "words", [0, 0])
        counts[0] += ok
        counts[1] += 1
    return out


def latency(llm, families: list[str], n: int, **sampler) -> dict:
    from letterpress import SamplingParams

    tasks = [T.held_out_tasks(families[i % len(families)], i // len(families) + 1)[-1] for i in range(n)]
    llm.chat(tasks[0].messages, SamplingParams(seed=0, **sampler), tools=tasks[0].tools)  # warm-up
    seconds = []
    for i, task in enumerate(tasks):
        t0 = time.perf_counter()
        out = llm.chat(task.messages, SamplingParams(seed=i, **sampler), tools=task.tools)[0]
        llm.tokenizer.decode(out.token_ids, skip_special_tokens=False)
        seconds.append(time.perf_counter() - t0)
    seconds.sort()
    return {"median_s": statistics.median(seconds), "p90_s": seconds[int(0.9 * (len(seconds) - 1))], "n": n}


def prompt_seeds(llm, prompt: str, seeds: int, batch: int, **sampler) -> None:
    from collections import Counter

    from letterpress import SamplingParams

    answers: Counter = Counter()
    for start in range(0, seeds, batch):
        n = min(batch, seeds - start)
        outs = llm.generate([prompt] * n, [SamplingParams(seed=start + i, **sampler) for i in range(n)])
        answers.update(o.text for o in outs)
    print(f"{prompt!r}, plain, seeds 0-{seeds - 1}:")
    for text, count in answers.most_common():
        print(f"  {count:4d} x {text!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TASKS_DIR))
    ap.add_argument("--n", type=int, default=100, help="held-out examples per family")
    ap.add_argument("--families", default=None, help="comma-separated (default: all; with --values other than "
                    "pooled, those that draw values)")
    ap.add_argument("--values", choices=tuple(VALUES), default="pooled",
                    help="draw names, numbers and the like from the training pools, made up of syllables "
                    "(tasks.OPEN), real words outside the pools (tasks.REAL) or made up of tokenizer pieces")
    ap.add_argument("--phrasing", choices=("train", "held_out", "both"), default="train")
    ap.add_argument("--plain", action="store_true", help="also score single-turn families without the template")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--latency", type=int, default=22, help="single requests timed (0: none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="as the CLI's --device (cuda, cuda:1, ...)")
    ap.add_argument("--dtype", default="float32", help="as the CLI's --dtype (bfloat16 for the GPU fast path)")
    ap.add_argument("--impl", choices=("plain", "fast"), default="plain")
    ap.add_argument("--quantization", choices=("int8", "int4", "fp8"), default=None,
                    help="quantize the (int8-shipped, float-loaded) weights again at load")
    ap.add_argument("--entropy-bound", type=float, default=None, help="sampler setting (default: the checkpoint's)")
    ap.add_argument("--max-denoising-steps", type=int, default=None)
    ap.add_argument("--stability-threshold", type=int, default=None,
                    help="sampler setting: 0 lets a confident canvas stop after one pass (default: the checkpoint's)")
    ap.add_argument("--confidence-threshold", type=float, default=None, help="sampler setting")
    ap.add_argument("--t-min", type=float, default=None, help="sampler setting: the last step's temperature")
    ap.add_argument("--t-max", type=float, default=None, help="sampler setting: the first step's temperature")
    ap.add_argument("--greedy", action="store_true",
                    help="propose each position's most likely token instead of sampling (the server's temperature 0)")
    ap.add_argument("--validation", action="store_true",
                    help="examples of the validation seed (for choosing sampler settings), not the held-out ones")
    ap.add_argument("--prompt", default=None, help="only this plain prompt, over --seeds seeds")
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="folder for the charts (exact match, tokens per forward by family)")
    args = ap.parse_args()
    set_threads(args.threads)
    from letterpress import LLM, SamplingParams
    from letterpress.errors import LetterpressError

    values = VALUES[args.values]
    families = (args.families or ",".join(OPEN_FAMILIES if values.open else T.FAMILIES)).split(",")
    unknown = [f for f in families if f not in T.FAMILIES]
    if unknown:
        ap.error(f"--families: unknown {', '.join(map(repr, unknown))}; choose from {','.join(T.FAMILIES)}")
    if min(args.n, args.seeds, args.batch) < 1:
        ap.error("--n, --seeds and --batch must be at least 1")
    sampler = {k: v for k, v in (("entropy_bound", args.entropy_bound),
                                 ("max_denoising_steps", args.max_denoising_steps),
                                 ("stability_threshold", args.stability_threshold),
                                 ("confidence_threshold", args.confidence_threshold),
                                 ("t_min", args.t_min), ("t_max", args.t_max)) if v is not None}
    if args.greedy:
        sampler["greedy"] = True
    seed = T.VALIDATION_SEED if args.validation else T.HELD_OUT_SEED
    try:  # a bad model folder or sampler override: one line, exit 2
        llm = LLM(args.model, max_num_seqs=args.batch, device=args.device, dtype=args.dtype, impl=args.impl,
                  quantization=args.quantization)
        SamplingParams(**sampler).resolve(llm.defaults)
    except LetterpressError as e:
        ap.error(str(e))
    if args.prompt is not None:
        prompt_seeds(llm, args.prompt, args.seeds, args.batch, **sampler)
        return
    seen = training_prompts()
    phrasings = ("train", "held_out") if args.phrasing == "both" else (args.phrasing,)
    result = {"model": args.model, "machine": machine(), "n": args.n, "sampler": sampler,
              "examples": "validation" if args.validation else "held-out", "values": args.values, "families": {}}
    for phrasing in phrasings:
        for family in families:
            tasks = T.held_out_tasks(family, args.n, phrasing, exclude=seen, seed=seed, values=values)
            r = run_family(llm, tasks, args.batch, **sampler)
            r["over_one_canvas"] = sum(len(llm.tokenizer.encode(render(t, llm.tokenizer)[1])) >= TASKS_CANVAS
                                       for t in tasks)
            result["families"].setdefault(family, {})[phrasing] = r
            print(f"{family:12s} {phrasing:8s} exact {100 * r['exact']:5.1f}%  tokens/forward "
                  f"{r['tokens_per_forward']:5.2f}  steps {r['steps']:4.2f}  answer tokens {r['answer_tokens']:5.1f}"
                  + (f"  ({r['over_one_canvas']} answers longer than a canvas)" if r["over_one_canvas"] else ""),
                  flush=True)
            if "worked" in r:
                print("    " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in r["worked"].items()), flush=True)
            if "by_kind" in r:
                print("    " + ", ".join(f"{kind} {k} of {n}" for kind, (k, n) in r["by_kind"].items()), flush=True)
            for prompt, want, got in r["wrong_samples"][:1]:
                print(f"    e.g. {prompt!r}: want {want!r}, got {got!r}", flush=True)
    if args.plain:
        for family in families:
            tasks = T.held_out_tasks(family, args.n, exclude=seen, seed=seed, values=values)
            if tasks[0].tools is None and len(tasks[0].messages) == 1:
                r = run_family(llm, tasks, args.batch, plain=True, **sampler)
                result["families"][family]["plain"] = r
                print(f"{family:12s} plain    exact {100 * r['exact']:5.1f}%  tokens/forward "
                      f"{r['tokens_per_forward']:5.2f}", flush=True)
    main_runs = [result["families"][f][phrasings[0]] for f in families]
    result["mean_exact"] = statistics.mean(r["exact"] for r in main_runs)
    result["min_exact"] = min(r["exact"] for r in main_runs)
    result["tokens_per_forward"] = statistics.mean(r["tokens_per_forward"] for r in main_runs)
    result["tokens_per_forward_pooled"] = statistics.mean(r["tokens_per_forward_pooled"] for r in main_runs)
    print(f"mean exact {100 * result['mean_exact']:.1f}%, worst family {100 * result['min_exact']:.1f}%, "
          f"tokens per forward {result['tokens_per_forward']:.2f} (mean over families of the mean over replies; "
          f"{result['tokens_per_forward_pooled']:.2f} with each family's tokens pooled over its passes)")
    if args.latency:
        result["latency"] = latency(llm, families, args.latency, **sampler)
        print(f"reply latency ({args.device}, batch 1, {args.threads} thread): median {result['latency']['median_s']:.3f} s, "
              f"p90 {result['latency']['p90_s']:.3f} s over {args.latency} requests")
    print(result["machine"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.plot:
        from letterpress.plots import bar_chart

        out = Path(args.plot)
        # eleven long names side by side: one word a line, and a long word broken ("arith-\nmetic")
        labels = ["\n".join(w if len(w) <= 8 else f"{w[:5]}-\n{w[5:]}" for w in f.split("_")) for f in families]
        series = {p: [result["families"][f][p]["exact"] for f in families] for p in phrasings}
        print("chart:", bar_chart(labels, series, out / "default_model_exact.png", percent=True,
                                  title=f"Exact match by task family ({Path(args.model).name}, held-out)",
                                  xlabel="task family", ylabel="exact match"))
        tpf = {p: [result["families"][f][p]["tokens_per_forward"] for f in families] for p in phrasings}
        print("chart:", bar_chart(labels, tpf, out / "default_model_tokens_per_forward.png",
                                  title="Tokens per forward by task family", xlabel="task family",
                                  ylabel="tokens per decoder pass"))


if __name__ == "__main__":
    main()
