"""Structured output: which grammar library, and what constraining the canvas costs.

    python benchmarks/structured.py libraries [--repeats 5]        # compile + per-step cost per library
    python benchmarks/structured.py engine [--seeds 3] [--puzzles 50]
    python benchmarks/structured.py size                           # size estimate vs compiled automata
    python benchmarks/structured.py vocab [--vocab-size 262144]    # json_object + schema suite, synthetic vocab

`libraries`: on the shipped tokenizers (letterpress/assets/tiny_code: byte-level BPE, 4,096 tokens;
letterpress/assets/sudoku: 827 word tokens), for the JSON-schema suite of benchmarks/schema_suite.py (the one
tests/test_structured.py checks; tiny_code) and regexes (both):
- outlines-core (what letterpress uses): regex -> token-level DFA, whole (`compile_regex`: our schema->regex,
  outlines-core's Index, the edge tensors and distances); per step: our DP over one canvas (dp.best_path);
- xgrammar and llguidance: grammar compile and one next-token mask. They give masks, not a state graph: a DP
  over their states would first have to explore every (state, token) pair through the matcher, which neither
  exposes as state ids. They are timed only if installed (`pip install --no-deps xgrammar apache-tvm-ffi
  llguidance`; xgrammar's own requirements pull triton).

`engine`: the shipped models, unconstrained vs constrained, same seeds and sampler settings:
- tiny_code: the schema suite (a JSON prompt), sampled; validity = parses and validates (jsonschema);
- sudoku: held-out puzzles, greedy; the constraint is a regex of 81 digits 1-9 with the givens fixed
  (a pinned scaffold as an automaton); validity = a complete grid consistent with the givens, and the solve rate.
Reports denoising steps per canvas, tokens per forward and seconds per step.

`size`: on tiny_code's tokenizer, regexes of growing size: the edge estimate that refuses oversized
constraints before compiling (structured/size.py), the compiled automaton's edges, compile seconds and the
process's peak memory after it (growing order, so each peak is that compile's), compiled with the
limit off to show what it prevents.

`vocab`: the released model's vocabulary size (262,144) without its tokenizer (no Hub here): a synthetic
byte-level BPE-like vocabulary (`synthetic_tokenizer`: all 256 bytes, whitespace runs, punctuation pairs,
numbers, Latin word pieces with and without a leading space, words in seven other scripts, code fragments,
cut UTF-8), deterministic for a size. For json_object and the schema suite: the size estimate, states,
edges, the distinct token spellings and how many of them outlines-core's Index walks (one per sequence of
byte classes: automaton.py), compile seconds (of which outlines-core's two Indexes), the compile's peak memory increase,
the automaton's resident bytes (per edge), and the DP's time per canvas position (CPU, 1 thread). Each constraint is compiled
in a fresh child process so each peak is its own.
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

import torch  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from benchmarks.schema_suite import SUITE  # noqa: E402
from letterpress.structured import best_path, compile_regex, schema_regex  # noqa: E402
from letterpress.structured import automaton as automaton_module  # noqa: E402
from letterpress.tokenizer import Tokenizer  # noqa: E402

ASSETS = ROOT / "letterpress" / "assets"
REGEXES = {"tiny_code": {"identifier_list": r"[a-z_]+(?:, [a-z_]+){2,5}", "date": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"},
           "sudoku": {"grid": "[1-9]{81}", "first_row_given": "123456789[1-9]{72}"}}


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def libraries(repeats: int) -> None:
    print(f"machine: {machine()}")
    print("| tokenizer | constraint | library | compile (ms) | per-step (ms) | what per-step is |")
    print("|---|---|---|---|---|---|")
    for name in ("tiny_code", "sudoku"):
        tokenizer = Tokenizer.from_dir(ASSETS / name)
        canvas = json.loads((ASSETS / name / "config.json").read_text())["canvas_length"]
        eos = [1]
        jobs = {f"schema:{k}": ("json", v) for k, v in SUITE.items()} if name == "tiny_code" else {}
        jobs.update({f"regex:{k}": ("regex", v) for k, v in REGEXES[name].items()})
        for label, (kind, value) in jobs.items():
            regex = schema_regex(value) if kind == "json" else value

            def ours():
                automaton_module._cache.clear()  # time a cold compile (the vocabulary stays cached)
                return compile_regex(regex, tokenizer, eos)

            ms, automaton = _timed(ours, repeats)
            logp = torch.log_softmax(3 * torch.randn(canvas, tokenizer.vocab_size), -1)
            step, _ = _timed(lambda: best_path(logp, automaton, 0, eos, None), repeats)
            print(f"| {name} | {label} | outlines-core + DP | {1e3 * ms:.1f} | {1e3 * step:.1f} | DP over a "
                  f"{canvas}-token canvas ({automaton.num_states} states, {automaton.src.numel():,} edges) |")
            for row in _others(name, tokenizer, kind, value, repeats):
                print(f"| {name} | {label} | {row[0]} | {row[1]} | {row[2]} | one next-token mask |")


def _others(name: str, tokenizer: Tokenizer, kind: str, value, repeats: int) -> list[tuple[str, str, str]]:
    rows = []
    text = json.dumps(value) if kind == "json" else value
    try:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_file=str(ASSETS / name / "tokenizer.json"))
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tokenizer.vocab_size)
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        ms, grammar = _timed(lambda: compiler.compile_json_schema(text) if kind == "json" else
                             compiler.compile_regex(text), repeats)
        matcher = xgr.GrammarMatcher(grammar)
        mask = xgr.allocate_token_bitmask(1, info.vocab_size)
        step, _ = _timed(lambda: matcher.fill_next_token_bitmask(mask), repeats)
        rows.append(("xgrammar", f"{1e3 * ms:.1f}", f"{1e3 * step:.3f}"))
    except ImportError:
        pass
    except Exception as e:  # a grammar xgrammar cannot take
        rows.append(("xgrammar", f"error: {type(e).__name__}", "-"))
    try:
        import llguidance
        import llguidance.hf
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_file=str(ASSETS / name / "tokenizer.json"))
        ll_tok = llguidance.hf.from_tokenizer(hf)
        grammar = (llguidance.LLMatcher.grammar_from_json_schema(text) if kind == "json" else
                   llguidance.LLMatcher.grammar_from_regex(text))
        ms, matcher = _timed(lambda: llguidance.LLMatcher(ll_tok, grammar), repeats)
        step, _ = _timed(matcher.compute_bitmask, repeats)
        rows.append(("llguidance", f"{1e3 * ms:.1f}", f"{1e3 * step:.3f}"))
    except ImportError:
        pass
    except Exception as e:
        rows.append(("llguidance", f"error: {type(e).__name__}", "-"))
    return rows


# ------------------------------------------------------------------------------------------------ engine
def engine(seeds: int, puzzles: int, models: list[str]) -> None:
    print(f"machine: {machine()}")
    print("| model | run | rows | valid | solved | steps/canvas | canvases/row | tokens/forward | s/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    if "tiny_code" in models:
        _tiny_code(seeds)
    if "sudoku" in models:
        _sudoku(puzzles)


def _tiny_code(seeds: int) -> None:
    import jsonschema

    from letterpress import LLM
    from letterpress.engine.request import SamplingParams
    from letterpress.structured import StructuredOutputsParams

    llm = LLM(ASSETS / "tiny_code", max_num_seqs=len(SUITE) * seeds, max_model_len=512)
    names = [n for n in SUITE for _ in range(seeds)]
    prompt = "# a JSON value:\n"

    def valid(text: str, schema: dict) -> bool:
        try:
            jsonschema.validate(json.loads(text), schema)
            return True
        except (ValueError, jsonschema.ValidationError):
            return False

    for run in ("unconstrained", "constrained"):
        params = [SamplingParams(max_new_tokens=128, seed=i, structured_outputs=None if run == "unconstrained" else
                                 StructuredOutputsParams(json=SUITE[n])) for i, n in enumerate(names)]
        _report("tiny_code", run, llm, [prompt] * len(names), params,
                lambda outs: (sum(valid(o.text, SUITE[n]) for o, n in zip(outs, names)), "-"))


def _sudoku(puzzles: int) -> None:
    from letterpress import LLM
    from letterpress.apps import sudoku as S
    from letterpress.apps.sudoku_solve import prompt_ids
    from letterpress.engine.request import SamplingParams
    from letterpress.structured import StructuredOutputsParams
    from letterpress.train import recipes_builtin as RB

    llm = LLM(ASSETS / "sudoku", max_num_seqs=puzzles, max_model_len=256)
    held = [puzzle for puzzle, _ in RB.held_out_puzzles(1000)[:puzzles]]  # benchmarks/sudoku.py's set
    prompts = [prompt_ids(llm.tokenizer, p) for p in held]
    for run in ("unconstrained", "constrained"):
        params = [SamplingParams(seed=i, greedy=True, structured_outputs=None if run == "unconstrained" else
                                 StructuredOutputsParams(regex="".join("[1-9]" if c == "0" else c for c in p)))
                  for i, p in enumerate(held)]
        _report("sudoku", run, llm, prompts, params, lambda outs: (
            sum(len(o.text) == 81 and all(c in "123456789" for c in o.text)
                and all(g in ("0", c) for g, c in zip(p, o.text)) for o, p in zip(outs, held)),
            sum(S.is_solution(o.text, p) for o, p in zip(outs, held))))


def _report(model: str, run: str, llm, prompts, params, score) -> None:
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    valid, solved = score(outs)
    steps = [s for o in outs for s in o.steps_per_canvas]
    passes = sum(o.decoder_passes for o in outs)
    tpf = sum(o.tokens_per_forward * o.decoder_passes for o in outs) / max(passes, 1)
    batched_steps = max(sum(o.steps_per_canvas) for o in outs)  # the batch steps together
    print(f"| {model} | {run} | {len(outs)} | {valid}/{len(outs)} ({100 * valid / len(outs):.0f}%) | {solved} | "
          f"{statistics.mean(steps):.1f} | {statistics.mean(o.canvases for o in outs):.2f} | {tpf:.2f} | "
          f"{seconds / max(batched_steps, 1):.3f} |", flush=True)


# ------------------------------------------------------------------------------------------------ size
SIZES = [r"[a-z]{0,128}", r'"[^"\\]{0,128}"', r'(?:"[^"\\]{0,64}",){0,6}', r'(?:"[^"\\]{0,64}",){0,12}',
         r'(?:"[^"\\]{0,64}",){0,32}', r"(?:(?:[a-z]{0,100},){0,100};){0,30}"]


def size() -> None:
    """Compiled here with the limit off (up to 10 M estimated edges), to show what the limit prevents."""
    import resource

    from letterpress.structured.automaton import _vocabulary
    from letterpress.structured.size import MAX_EDGES, estimate_edges

    print(f"machine: {machine()}")
    tokenizer = Tokenizer.from_dir(ASSETS / "tiny_code")
    first = _vocabulary(tokenizer, 1, frozenset())[1]
    automaton_module.check_size = lambda *a, **k: None  # measure what compiling would cost
    print(f"| regex | estimated edges | served (limit {MAX_EDGES:,}) | compiled edges | compile s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for regex in SIZES:
        estimate = estimate_edges(regex, first)
        served = "yes" if estimate <= MAX_EDGES else "400"
        if estimate > 10_000_000:
            print(f"| `{regex}` | {estimate:,} | {served} | - | - | - |")
            continue
        start = time.perf_counter()
        automaton = compile_regex(regex, tokenizer, [1])
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(f"| `{regex}` | {estimate:,} | {served} | {automaton.src.numel():,} | {seconds:.2f} | {peak} |", flush=True)


# ------------------------------------------------------------------------------------------------ vocab
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|tool_call>", "<tool_call|>"]
_SCRIPTS = [(0x00C0, 0x017F), (0x0400, 0x04FF), (0x0900, 0x097F), (0x4E00, 0x9FFF), (0x3040, 0x30FF),
            (0xAC00, 0xD7A3), (0x0600, 0x06FF)]  # Latin accents, Cyrillic, Devanagari, CJK, kana, Hangul, Arabic


def synthetic_tokenizer(size: int, seed: int = 0) -> Tokenizer:
    """A byte-level BPE-like tokenizer of `size` ids (specials first, eos = 1), for measuring automata at a
    vocabulary size whose real tokenizer is not at hand. Only its vocabulary is realistic (no merges)."""
    import random
    import string

    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from letterpress.structured.automaton import _byte_level_map

    to_char = {b: c for c, b in _byte_level_map().items()}
    rng = random.Random(seed)
    room = size - len(SPECIALS)
    spellings: dict[bytes, None] = {}

    def add(b: bytes) -> None:
        if b and len(spellings) < room:
            spellings.setdefault(b)

    for b in range(256):
        add(bytes([b]))
    for n in range(1, 33):
        add(b" " * n), add(b"\n" + b" " * n), add(b"\t" * min(n, 8))
    punctuation = "{}[]()<>:;,.\"'`!?-_=+*/\\|&^%$#@~"
    for a in punctuation:
        for b in punctuation + " \n":
            add((a + b).encode())
    for n in range(1000):
        add(str(n).encode()), add(b" " + str(n).encode())
    consonants, vowels = "bcdfghjklmnpqrstvwxyz", "aeiou"
    while len(spellings) < room:
        r = rng.random()
        if r < 0.6:  # a Latin word piece, a leading space half the time, some capitalised
            w = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(5))[: rng.randint(2, 10)]
            w = w.capitalize() if rng.random() < 0.2 else w
            add(((" " if rng.random() < 0.5 else "") + w).encode())
        elif r < 0.85:  # 1-4 characters of another script (multi-byte UTF-8)
            lo, hi = rng.choice(_SCRIPTS)
            w = "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 4)))
            add(((" " if rng.random() < 0.3 else "") + w).encode())
        elif r < 0.95:  # code: punctuation then an identifier
            add((rng.choice(["_", ".", "(", "::", "->", '"', "='", "</", "${"]) +
                 "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 6)))).encode())
        else:  # a CJK character cut after 2 bytes, alone or with a stray continuation byte
            c = chr(rng.randint(0x4E00, 0x9FFF)).encode()[:2]
            add(c + bytes([rng.randint(0x80, 0xBF)]) if rng.random() < 0.5 else c)
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for b in spellings:
        vocab["".join(to_char[x] for x in b)] = len(vocab)
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    return Tokenizer(backend, {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>"}, {})


def vocab_constraints() -> dict[str, str]:
    from letterpress.structured import json_object_regex

    return {"json_object": json_object_regex(), **{f"schema:{k}": schema_regex(v) for k, v in SUITE.items()}}


def vocab(size: int, positions: int) -> None:
    import subprocess

    print(f"machine: {machine()}")
    print(f"synthetic byte-level vocabulary of {size:,} tokens; DP over {positions} positions")
    print("| constraint | estimated edges | states | edges | spellings -> walked | compile s | of which Index s (one-byte + full) | "
          "peak +MB | automaton MB | bytes/edge | DP ms/position |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in vocab_constraints():
        out = subprocess.run([sys.executable, __file__, "_vocab_one", name, str(size), str(positions)],
                             capture_output=True, text=True)
        print(out.stdout.strip() or f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} |", flush=True)


def _vocab_one(name: str, size: int, positions: int) -> None:
    """One constraint in this (fresh) process: the row of `vocab`."""
    import outlines_core

    from letterpress.structured.automaton import _vocabulary
    from letterpress.structured.size import estimate_edges

    tokenizer = synthetic_tokenizer(size)
    regex = vocab_constraints()[name]
    first = _vocabulary(tokenizer, 1, frozenset())[1]
    estimate = estimate_edges(regex, first)
    index_seconds = []
    real_index = outlines_core.Index

    def timed_index(*args):
        start = time.perf_counter()
        index = real_index(*args)
        index_seconds.append(time.perf_counter() - start)
        return index

    outlines_core.Index = timed_index
    automaton_module.check_size = lambda *a, **k: None  # measure whatever it costs
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) restarts from the current RSS
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    automaton = compile_regex(regex, tokenizer, [1])
    seconds = time.perf_counter() - start
    peak = (_status_kb("VmHWM") - before) / 1024
    one_byte, full = index_seconds  # the compile's two outlines-core Indexes
    edges = automaton.src.numel()
    resident = sum(t.numel() * t.element_size() for t in (automaton.src, automaton.token, automaton.dst,
                                                         automaton.offsets, automaton.accepting, automaton.distance))
    from letterpress.structured.regex import narrow

    spelled = _vocabulary(tokenizer, 1, frozenset())[0]
    table = automaton_module._byte_classes(automaton_module.SENTINEL + f"(?:{narrow(regex, automaton_module.SENTINEL)})",
                                           1, 10**15)
    walked = len({spelling.translate(table) for spelling in spelled})  # what the full Index walks per state
    logp = torch.log_softmax(torch.randn(positions, tokenizer.vocab_size), -1)
    best_path(logp[:1], automaton, 0, [1], None if positions == 1 else 10**6)  # warm up
    start = time.perf_counter()
    best_path(logp, automaton, 0, [1], 10**6)
    step = (time.perf_counter() - start) / positions
    print(f"| {name} | {estimate:,} | {automaton.num_states:,} | {edges:,} | {len(spelled):,} -> {walked:,} | "
          f"{seconds:.1f} | {one_byte:.2f} + {full:.1f} | "
          f"{peak:.0f} | {resident / 2**20:.1f} | {resident / max(edges, 1):.1f} | {1e3 * step:.1f} |")


def _status_kb(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    lib = sub.add_parser("libraries")
    lib.add_argument("--repeats", type=int, default=5)
    eng = sub.add_parser("engine")
    eng.add_argument("--seeds", type=int, default=3)
    eng.add_argument("--puzzles", type=int, default=50)
    eng.add_argument("--models", default="tiny_code,sudoku", help="comma-separated: tiny_code, sudoku")
    sub.add_parser("size")
    voc = sub.add_parser("vocab")
    voc.add_argument("--vocab-size", type=int, default=262_144)
    voc.add_argument("--positions", type=int, default=8, help="canvas positions the timed DP runs over")
    if len(sys.argv) == 5 and sys.argv[1] == "_vocab_one":  # one row of `vocab`, in a child process
        torch.manual_seed(0)
        return _vocab_one(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.what == "libraries":
        libraries(args.repeats)
    elif args.what == "size":
        size()
    elif args.what == "vocab":
        vocab(args.vocab_size, args.positions)
    else:
        engine(args.seeds, args.puzzles, args.models.split(","))


if __name__ == "__main__":
    main()
