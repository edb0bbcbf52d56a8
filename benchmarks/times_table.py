"""Does a tiny-tasks model know the times table? Every one of the arithmetic family's 88 products (2-12 x 2-9,
`tasks.TIMES_TABLE`), asked as a chat turn in two of the family's wordings, the checkpoint's sampler, seed = index.

    python benchmarks/times_table.py [--model letterpress/assets/tiny_tasks] [--json out.json]

The arithmetic family's held-out figure mixes these 88 facts with ~15,000 sums and differences; this separates
recall (a fixed table) from computing (BENCHMARKS.md, "Times-table probe").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, set_threads  # noqa: E402
from letterpress.train.recipes_tasks import TASKS_DIR  # noqa: E402
from letterpress.train.tasks import TIMES_TABLE  # noqa: E402

WORDINGS = ("What is {a} * {b}?", "{a} * {b} =")


def score(llm, wording: str) -> dict:
    from letterpress import SamplingParams
    from letterpress.chat_output import parse_output

    messages = [[{"role": "user", "content": wording.format(a=a, b=b)}] for a, b in TIMES_TABLE]
    outs = llm.chat(messages, [SamplingParams(seed=i) for i in range(len(messages))])
    # the reply's content: a model that writes a thought first (the `arith-aligned` probes) is judged on its answer
    got = [parse_output(llm.tokenizer.decode(o.token_ids, skip_special_tokens=False), tool_calls=False).content.strip()
           for o in outs]
    want = [str(a * b) for a, b in TIMES_TABLE]
    return {"exact": sum(g == w for g, w in zip(got, want)), "last_digit": sum(g[-1:] == w[-1] for g, w in zip(got, want)),
            "n": len(want), "wrong": [(m[0]["content"], w, g) for m, w, g in zip(messages, want, got) if g != w][:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(TASKS_DIR))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cpu", help="as the CLI's --device (cuda, cuda:1, ...)")
    args = parser.parse_args()
    set_threads(args.threads)
    from letterpress import LLM
    from letterpress.errors import LetterpressError

    try:  # a bad model folder: one line, exit 2 (as default_model.py)
        llm = LLM(args.model, max_num_seqs=16, device=args.device)
    except LetterpressError as e:
        parser.error(str(e))
    result = {"model": args.model, "machine": machine(), "wordings": {w: score(llm, w) for w in WORDINGS}}
    for wording, r in result["wordings"].items():
        print(f"{wording!r:24} exact {r['exact']}/{r['n']}, last digit right {r['last_digit']}/{r['n']}; "
              f"e.g. {r['wrong'][:3]}")
    print(result["machine"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
