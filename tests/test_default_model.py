"""Which model runs when none is named: the first shipped of embedded.DEFAULT_MODELS, or the one
$LETTERPRESS_DEFAULT_MODEL names (tests/conftest.py sets it to tiny_code for the engine and server tests); the
shipped default, tiny-tasks, as the README's first command shows it; the assets' size budget; and
`recipes_tasks.ship`, which writes a trained tiny-tasks model into the assets."""

from __future__ import annotations

import filecmp
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from letterpress.embedded import ASSETS, DEFAULT_MODELS, TOKENIZER_FILES, default_model_dir, shipped_models
from letterpress.errors import CheckpointError

from .bench_fixtures import benchmark_main

ROOT = Path(__file__).resolve().parent.parent
TASKS = ASSETS / "tiny_tasks"
ASSETS_BUDGET = 25_000_000  # issue 16: every embedded model together within 25 MB
tasks_shipped = pytest.mark.skipif("tiny_tasks" not in shipped_models(), reason="tiny-tasks is not shipped")


def test_default_is_the_first_shipped_of_the_default_models(monkeypatch):
    monkeypatch.delenv("LETTERPRESS_DEFAULT_MODEL", raising=False)
    shipped = shipped_models()
    first = next((name for name in DEFAULT_MODELS if name in shipped), None)
    if first is None:
        pytest.skip("no default model is shipped (the placeholder is used)")
    assert default_model_dir() == ASSETS / first


def test_the_environment_variable_picks_a_shipped_model(monkeypatch):
    shipped = shipped_models()
    if "sudoku" not in shipped:
        pytest.skip("the Sudoku model is not shipped")
    monkeypatch.setenv("LETTERPRESS_DEFAULT_MODEL", "sudoku")
    assert default_model_dir() == ASSETS / "sudoku"
    monkeypatch.setenv("LETTERPRESS_DEFAULT_MODEL", "no_such_model")
    with pytest.raises(CheckpointError, match="LETTERPRESS_DEFAULT_MODEL=no_such_model: not a shipped model"):
        default_model_dir()


def test_everything_under_assets_fits_the_budget():
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total <= ASSETS_BUDGET, f"{total:,} bytes under {ASSETS}"


# ------------------------------------------------------------------------------------- the shipped default
def readme_first_command() -> tuple[list[str], str]:
    """(the arguments of the README's first command after `letterpress`, the output block printed under it)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = readme[readme.index("## Set-up"):]
    command = re.search(r"```bash\n(.*?)\n```", setup, re.S)
    output = re.search(r"```text\n(.*?)\n```", setup[command.end():], re.S)
    args = shlex.split(command.group(1).split("&&")[-1])
    assert args[0] == "letterpress", command.group(1)
    return args[1:], output.group(1)


def without_default_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "LETTERPRESS_DEFAULT_MODEL"}


@tasks_shipped
def test_the_readme_first_command_prints_the_documented_answer():
    """Run as written (a real process, the real default: no LETTERPRESS_DEFAULT_MODEL), a plain prompt without
    the chat template, and the output is exactly the README's; it is tiny-tasks' answer."""
    from letterpress import LLM, SamplingParams

    args, documented = readme_first_command()
    assert args[0] == "generate" and "--chat-template" not in args and not args[1].startswith("-")
    run = subprocess.run([sys.executable, "-m", "letterpress.cli", *args], env=without_default_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == documented + "\n"
    assert "finish: stop" in run.stderr  # the model ended its answer itself
    seed = int(args[args.index("--seed") + 1]) if "--seed" in args else 0
    assert LLM(str(TASKS)).generate(args[1], SamplingParams(seed=seed))[0].text == documented


@tasks_shipped
def test_chat_with_no_model_runs_tiny_tasks(monkeypatch, capsys):
    from letterpress import LLM, SamplingParams
    from letterpress.cli import main

    args, _ = readme_first_command()
    request = args[1]
    monkeypatch.delenv("LETTERPRESS_DEFAULT_MODEL", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(request + "\n"))
    assert main(["chat", "--seed", "0"]) == 0
    reply = LLM(str(TASKS)).chat([{"role": "user", "content": request}], SamplingParams(seed=0))[0].text
    assert capsys.readouterr().out == f"you> {request}\nmodel> {reply}\n\n"


@tasks_shipped
def test_the_shipped_default_is_stored_quantized():
    from letterpress.model import load_model
    from letterpress.quant import QuantLinear

    config = json.loads((TASKS / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    model = load_model(TASKS)
    assert isinstance(model.layers[0].self_attn.q_proj, QuantLinear)
    assert model.layers[0].self_attn.q_proj.qweight.fmt == "int8"
    assert model.dtype == torch.float32  # the engine's dtype; the bfloat16 embedding is cast on load
    for name in TOKENIZER_FILES:
        assert (TASKS / name).is_file(), name


# ------------------------------------------------------------------------------------------------- ship
def logits_of(model) -> torch.Tensor:
    """One prompt encoded, one canvas denoised: logits [1, 8, vocab]."""
    cache = model.new_cache(1, 64)
    model.encode(torch.arange(3, 19)[None], cache)
    return model.denoise(torch.arange(20, 28)[None], cache)


def test_ship_writes_what_quantizing_while_loading_gives(tmp_path, capsys):
    """`python -m letterpress.train.recipes_tasks ship RUN/model --out DIR`: int8 weights that are exactly the
    float model (embedding rounded to bfloat16) quantized while loading, its generation config, its tokenizer;
    its logits are as close to the float model's as int8 alone makes them."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from letterpress import LLM, SamplingParams
    from letterpress.model import load_model
    from letterpress.quant import drift
    from letterpress.train.recipes_tasks import EMBEDDING, main
    from .fast_fixtures import assert_same_tensors
    from .train_fixtures import make_checkpoint, make_tokenizer

    src = make_checkpoint(tmp_path / "model", make_tokenizer(tmp_path / "tokenizer"))
    out = tmp_path / "shipped"
    main(["ship", str(src), "--out", str(out)])
    assert f"into {out} (int8" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"
    for name in TOKENIZER_FILES:
        assert filecmp.cmp(src / name, out / name, shallow=False), name
    from letterpress.train.recipes_tasks import TASKS_DECODING

    generation = json.loads((src / "generation_config.json").read_text())
    assert json.loads((out / "generation_config.json").read_text()) == {**generation, **TASKS_DECODING}
    assert TASKS_DECODING["stability_threshold"] == 0  # the shipped sampler's one-pass stop
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_slice(EMBEDDING).get_dtype() == "BF16"
        assert f.get_slice("model.decoder.layers.0.self_attn.q_proj.weight").get_dtype() == "I8"
    assert (out / "model.safetensors").stat().st_size < 0.4 * (src / "model.safetensors").stat().st_size

    rounded = tmp_path / "rounded"  # the float checkpoint with its embedding as stored by ship
    rounded.mkdir()
    for f in src.iterdir():
        (rounded / f.name).write_bytes(f.read_bytes())
    state = load_file(str(src / "model.safetensors"))
    state[EMBEDDING] = state[EMBEDDING].to(torch.bfloat16).float()
    save_file(state, str(rounded / "model.safetensors"), metadata={"format": "pt"})
    assert_same_tensors(load_model(out), load_model(rounded, quantization="int8"))

    # int8 is the only error: the bfloat16 embedding moves the logits no further than quantizing does alone
    with torch.no_grad():
        reference = logits_of(load_model(src))
        shipped, int8_only = drift(reference, logits_of(load_model(out))), \
            drift(reference, logits_of(load_model(src, quantization="int8")))
    assert shipped["max_abs_logit_error"] <= 1.1 * int8_only["max_abs_logit_error"] + 0.02, (shipped, int8_only)
    assert shipped["argmax_agreement"] >= int8_only["argmax_agreement"] - 1 / 16, (shipped, int8_only)

    prompts = ["1 + 2 =", "the quick brown fox"]  # and the engine runs it as it runs the model it stands for
    params = SamplingParams(greedy=True, seed=0, max_new_tokens=8)
    assert [o.token_ids for o in LLM(str(out)).generate(prompts, params)] == \
        [o.token_ids for o in LLM(str(rounded), quantization="int8").generate(prompts, params)]


@tasks_shipped
def test_unship_writes_the_shipped_default_as_a_float_model_that_answers_the_same(tmp_path, capsys):
    """`python -m letterpress.train.recipes_tasks unship DIR`: the shipped int8 default as a float32 folder a
    later stage trains from (--model): no quantization_config, its tokenizer and sampler defaults, and the same
    logits and replies as what ships."""
    from letterpress import LLM, SamplingParams
    from letterpress.model import load_model
    from letterpress.train.recipes_tasks import main

    out = tmp_path / "float"
    main(["unship", str(out)])
    assert "float32" in capsys.readouterr().out
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    for name in TOKENIZER_FILES + ("generation_config.json",):
        assert filecmp.cmp(TASKS / name, out / name, shallow=False), name
    with torch.no_grad():
        assert float((logits_of(load_model(out)) - logits_of(load_model(TASKS))).abs().max()) < 1e-3
    prompts = ["Convert to JSON: name=Maria, city=Lisbon, age=34", "Sort ascending and dedupe: pear, fig, pear"]
    params = SamplingParams(seed=0)
    assert [o.text for o in LLM(str(out)).generate(prompts, params)] == \
        [o.text for o in LLM(str(TASKS)).generate(prompts, params)]


def test_ship_refuses_a_model_trained_with_another_tokenizer(tmp_path):
    from letterpress.train.recipes_tasks import ship

    from .train_fixtures import make_checkpoint, make_tokenizer

    src = make_checkpoint(tmp_path / "model", make_tokenizer(tmp_path / "tokenizer"))
    out = tmp_path / "shipped"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="another tokenizer"):
        ship(src, out)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]  # nothing written


@tasks_shipped
@pytest.mark.parametrize("args, message", [
    (["--families", "case,nosuch"], "--families: unknown 'nosuch'"),
    (["--stability-threshold", "-1"], "stability_threshold must be an integer >= 0"),
    (["--t-min", "1.2", "--t-max", "1.0"], "need t_min <= t_max"),
    (["--prompt", "x", "--seeds", "0"], "--n, --seeds and --batch must be at least 1"),
])
def test_the_benchmark_refuses_bad_arguments_in_one_line(args, message, monkeypatch, capsys):
    code, err = benchmark_main("default_model", ["--n", "1", "--latency", "0", *args], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert message in err.strip().splitlines()[-1]


def test_the_times_table_benchmark_refuses_a_missing_model_in_one_line(tmp_path, monkeypatch, capsys):
    code, err = benchmark_main("times_table", ["--model", str(tmp_path / "no")], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert "no such checkpoint folder" in err.strip().splitlines()[-1]


@tasks_shipped
def test_the_benchmark_scores_real_words_outside_the_pools(tmp_path):
    """`--values real`: the held-out examples carry real names and words no training stream has."""
    out = tmp_path / "real.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "default_model.py"), "--values", "real",
                          "--families", "kv_to_json", "--n", "3", "--latency", "0", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["values"] == "real" and list(result["families"]) == ["kv_to_json"]
    assert "kv_to_json   train    exact" in run.stdout


def test_unship_into_a_folder_it_must_not_replace_is_one_line_and_exit_2(tmp_path, capsys):
    from letterpress.train.recipes_tasks import main

    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "todo.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        main(["unship", str(keep)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not replacing it" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in keep.iterdir()] == ["todo.txt"] and (keep / "todo.txt").read_text() == "mine"


def test_the_benchmark_scores_the_worked_thought_a_model_writes():
    """`worked` in the benchmark's JSON: the formulation of tasks.THOUGHTS the thoughts match most, and how often
    they and the answer are right."""
    import importlib.util

    from letterpress.train import tasks as T

    spec = importlib.util.spec_from_file_location("default_model_bench", ROOT / "benchmarks" / "default_model.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tasks = T.held_out_tasks("arithmetic", 4)
    raws = [f"<|channel>thought\n{T.aligned_steps(*T.arithmetic_operands(t))}<channel|>{t.answer}" for t in tasks]
    raws[0] = raws[0].replace("<channel|>", "9<channel|>")  # a wrong thought, the answer right
    right = [True, True, True, False]
    assert bench.worked_steps(tasks, raws, right) == {"formulation": "aligned", "steps_right": 3,
                                                      "steps_and_answer_right": 2, "answer_right_steps_wrong": 1,
                                                      "operands_right": 4}
