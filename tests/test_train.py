"""The diffusion SFT loss piece by piece, the trainer (steps lower the loss, exact resume, outputs that load in
letterpress and transformers), LoRA in PEFT's format, data errors and the command line. Tiny models, CPU."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from letterpress.cli import main as cli_main
from letterpress.errors import DataError, LetterpressError, TrainError
from letterpress.model import DiffusionGemma
from letterpress.tokenizer import Tokenizer
from letterpress.train import lora as L
from letterpress.train.data import DataFormat, ExampleOrder, TokenizedDataset, read_jsonl
from letterpress.train.loss import (Example, LossConfig, LossModule, loss_sums, make_batch, time_weight,
                                    total_loss)
from letterpress.train.recipes import RECIPES, Recipe, get_recipe, register
from letterpress.train.trainer import TrainConfig, Trainer, lr_factor

from .train_fixtures import (CANVAS, addition_lines, decoder_logits, make_checkpoint, make_tokenizer, our_logits,
                             tiny_config, tiny_model, write_jsonl)

V = 512


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("base") / "ckpt", tokenizer_dir)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", addition_lines(32))


def gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]


# ------------------------------------------------------------------------------------------------ loss pieces
def test_corruption_rate_is_t():
    """Each position is kept with probability 1 - t, else replaced by a uniform token (which may be the original)."""
    cfg = LossConfig(canvas_length=4096)
    examples = [Example(prompt=[2], target=[7] * 4095)] * 40
    batch = make_batch(examples, cfg, V, gens(40))
    changed = (batch.noisy != batch.clean).float().mean(1)
    expected = batch.t * (1 - 1 / V)  # a replacement equal to the original is not a change
    assert (changed - expected).abs().max() < 0.04
    assert batch.t.min() >= cfg.t_eps and batch.t.max() <= 1 - cfg.t_eps
    assert batch.t.std() > 0.2  # one t per example, spread over (0, 1)
    assert (batch.noisy[batch.noisy != batch.clean] != 7).all()
    assert batch.noisy.max() < V and len(batch.noisy.unique()) > V // 2  # replacements span the vocabulary


def test_suffix_noise_keeps_a_prefix_of_the_answer_and_leaves_other_draws_alone():
    """--suffix-noise-share: such a canvas keeps the first floor((1 - t) * answer tokens) clean and noises the
    rest, EOS fill included; the other examples (and every example at share 0) draw exactly as before."""
    examples = [Example(prompt=[2], target=list(range(20, 50)))] * 200  # 30 tokens + EOS in a canvas of 40
    before = make_batch(examples, LossConfig(canvas_length=40), V, gens(200))
    zero = make_batch(examples, LossConfig(canvas_length=40, suffix_noise_share=0.0), V, gens(200))
    assert torch.equal(before.noisy, zero.noisy) and torch.equal(before.t, zero.t)
    half = make_batch(examples, LossConfig(canvas_length=40, suffix_noise_share=0.5), V, gens(200))
    assert torch.equal(before.t, half.t) and torch.equal(before.self_conditioning, half.self_conditioning)
    suffixed = 0
    for row in range(200):
        cut = math.floor((1 - float(half.t[row])) * 31)
        if torch.equal(half.noisy[row], before.noisy[row]):
            continue
        suffixed += 1
        assert torch.equal(half.noisy[row, :cut], half.clean[row, :cut])
        changed = (half.noisy[row, cut:] != half.clean[row, cut:]).float().mean()
        assert changed > 0.9 or 40 - cut < 10  # the rest is noise (a uniform draw may equal the clean token)
    assert 70 < suffixed < 130
    with pytest.raises(TrainError, match="suffix_noise_share"):
        LossConfig(suffix_noise_share=1.5)


def test_canvases_context_scored_positions_and_eos_fill():
    """Target + EOS split into canvases of C; the scored canvas is drawn uniformly; earlier canvases join the
    context; the last canvas is filled with EOS, scored by default and unscored on request."""
    eos, c = 1, 4
    ex = Example(prompt=[2, 40, 41], target=[10, 11, 12, 13, 14])  # + EOS = 6 tokens -> canvases of 4 and 2
    seen = {}
    for score_fill in (True, False):
        cfg = LossConfig(canvas_length=c, eos_id=eos, score_eos_fill=score_fill)
        batch = make_batch([ex] * 64, cfg, V, gens(64))
        for row in range(64):
            length = int(batch.context_lengths[row])
            context = batch.context_ids[row, :length].tolist()
            clean, scored = batch.clean[row].tolist(), batch.scored[row].tolist()
            if length == 3:  # first canvas
                assert context == [2, 40, 41] and clean == [10, 11, 12, 13] and scored == [True] * 4
            else:  # second canvas: last answer token, the terminating EOS, then the EOS fill
                assert context == [2, 40, 41, 10, 11, 12, 13]
                assert clean == [14, eos, eos, eos] and scored == [True, True, score_fill, score_fill]
            seen[length] = seen.get(length, 0) + 1
    assert seen[3] > 30 and seen[7] > 30  # both canvases drawn, about equally often


def test_encoder_next_token_positions():
    cfg = LossConfig(canvas_length=4, eos_id=1)
    batch = make_batch([Example([2, 40], [10, 11, 12]), Example([2], [13])], cfg, V, gens(2))
    assert batch.sequence_ids.tolist() == [[2, 40, 10, 11, 12, 1], [2, 13, 1, 0, 0, 0]]
    rows, pos = batch.next_token_scored.nonzero(as_tuple=True)
    labels = batch.sequence_ids[rows, pos + 1]
    assert labels.tolist() == [10, 11, 12, 1, 13, 1]  # every target token and the EOS, never the prompt
    assert batch.num_next_token_scored == 6


def test_draws_are_per_example():
    """An example's draws depend on its generator only, not on its batch neighbours."""
    cfg = LossConfig(canvas_length=CANVAS)
    a, b = Example([2, 3], list(range(10, 30))), Example([2], [5, 6])
    g = gens(3, seed=7)
    together = make_batch([a, b, a], cfg, V, g)
    alone = make_batch([b], cfg, V, [torch.Generator().manual_seed(7001)])
    assert torch.equal(together.noisy[1], alone.noisy[0]) and together.t[1] == alone.t[0]


def test_time_weights():
    t = torch.tensor([0.001, 0.5, 0.8, 0.95, 0.999])
    assert torch.equal(time_weight(t, LossConfig()), torch.ones(5))
    w = time_weight(t, LossConfig(objective="reweighted-ce", reweight_max=10.0))
    torch.testing.assert_close(w, torch.tensor([1 / 0.999, 2.0, 5.0, 10.0, 10.0]))
    with pytest.raises(TrainError, match="unknown loss objective"):
        LossConfig(objective="elbo")


class RecordingModel:
    """Wraps a model and records every denoise call: grad mode, inputs, output."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def denoise(self, canvas, cache, slots=None, self_conditioning_logits=None, self_conditioning_mask=None):
        out = self.model.denoise(canvas, cache, slots, self_conditioning_logits, self_conditioning_mask)
        self.calls.append(dict(grad=torch.is_grad_enabled(), logits=self_conditioning_logits,
                               mask=self_conditioning_mask, out=out))
        return out


def test_self_conditioning_second_pass_gets_detached_first_pass():
    model = tiny_model().requires_grad_(True)
    cfg = LossConfig(canvas_length=CANVAS, encoder_loss_weight=0.0)
    batch = make_batch([Example([2, 9, 9], list(range(20, 30)))] * 6, cfg, V, gens(6, seed=1))
    assert 0 < int(batch.self_conditioning.sum()) < 6  # p = 0.5 per example
    rec = RecordingModel(model)
    loss = total_loss(loss_sums(rec, batch, cfg), cfg)
    first, second = rec.calls
    assert not first["grad"] and first["logits"] is None and first["mask"] is None  # no signal, no gradient
    assert second["grad"]
    assert torch.equal(second["logits"], first["out"]) and not second["logits"].requires_grad
    assert torch.equal(second["mask"], batch.self_conditioning)
    loss.backward()  # gradient reaches the weights through pass 2 only
    assert model.self_conditioning.gate_proj.weight.grad.abs().sum() > 0

    # Rows that do not use it get exactly what a pass without any signal gives.
    cache = model.new_cache(6, int(batch.context_lengths.max()))
    with torch.no_grad():
        model.encode(batch.context_ids, cache, input_lengths=batch.context_lengths)
        plain = model.denoise(batch.noisy, cache)
        masked = model.denoise(batch.noisy, cache, None, first["out"], batch.self_conditioning)
    off = ~batch.self_conditioning
    assert torch.equal(masked[off], plain[off]) and not torch.equal(masked[~off], plain[~off])

    rec.calls.clear()  # p = 0: one pass, no signal at all
    loss_sums(rec, batch, replace(cfg, self_conditioning_prob=0.0))
    assert len(rec.calls) == 1 and rec.calls[0]["logits"] is None


def test_loss_sums_split_into_micro_batches_add_up():
    """Sums over a batch = sums over its halves: what gradient accumulation and data parallelism rely on."""
    model = tiny_model()
    cfg = LossConfig(canvas_length=CANVAS)
    examples = [Example([2, 30 + i], list(range(40, 40 + 3 * i + 2))) for i in range(4)]
    g = lambda: gens(4, seed=3)  # noqa: E731
    whole = loss_sums(model, make_batch(examples, cfg, V, g()), cfg)
    halves = [loss_sums(model, make_batch(examples[i:i + 2], cfg, V, g()[i:i + 2]), cfg) for i in (0, 2)]
    torch.testing.assert_close(whole.diffusion, halves[0].diffusion + halves[1].diffusion, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(whole.encoder, halves[0].encoder + halves[1].encoder, rtol=1e-5, atol=1e-4)
    assert whole.diffusion_count == halves[0].diffusion_count + halves[1].diffusion_count


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = tiny_model().requires_grad_(True)
    cfg = LossConfig(canvas_length=CANVAS)
    batch = make_batch([Example([2, 50 + i], [60 + i, 61, 62 + i]) for i in range(4)], cfg, V, gens(4))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(8):
        loss = total_loss(LossModule(model, cfg)(batch), cfg)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_lr_schedule():
    assert lr_factor(0, 4, 20, 0.1) == 0.25 and lr_factor(3, 4, 20, 0.1) == 1.0
    assert lr_factor(4, 4, 20, 0.1) == pytest.approx(1.0) and lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert 0.1 < lr_factor(12, 4, 20, 0.1) < 1.0


# ----------------------------------------------------------------------------------------------------- data
def test_data_lines_and_chat_messages(tmp_path, tokenizer_dir):
    tok = Tokenizer.from_dir(tokenizer_dir)
    messages = [{"role": "system", "content": "add"}, {"role": "user", "content": "1 + 2"},
                {"role": "assistant", "content": "3"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1 + 1 =", "completion": " 2", "id": 5}, "",
                                              {"messages": messages}])
    data = read_jsonl(path, tok)
    assert len(data) == 2
    assert data[0].prompt == tok.encode("1 + 1 =", add_special_tokens=True) and data[0].target == tok.encode(" 2")
    prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True)
    assert data[1].prompt == tok.encode(prompt)
    assert tok.decode(data[1].target, skip_special_tokens=False) == "3<end_of_turn>\n"
    # --chat-template wraps prompt/completion lines as a user turn and an assistant turn
    wrapped = read_jsonl(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "1 + 2", "completion": "3"}]), tok,
                         DataFormat(chat_template=True))
    assert wrapped[0].prompt == tok.encode(tok.apply_chat_template(messages[1:2], add_generation_prompt=True))
    # a byte-order mark (PowerShell's, Notepad's) before the first line is skipped, not an error
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [(e.prompt, e.target) for e in read_jsonl(bom, tok)] == [(e.prompt, e.target) for e in data]


def test_chat_lines_in_the_gemma_4_format_split_as_inference_sees_them(tmp_path):
    """The Gemma 4 template (the default model's, the released one's) opens an empty thought channel in the
    generation prompt that no history turn shows: every {"messages"} line used to be refused. The prompt is what
    inference renders, the target the reply; a line's top-level "tools" are declared as at inference, and a
    reply that is a tool call keeps its whole opening marker."""
    from letterpress.embedded import ASSETS

    tok = Tokenizer.from_dir(ASSETS / "tiny_tasks")
    ask = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 1+1?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [*ask, {"role": "assistant", "content": "2"}]},
        {"messages": [{"role": "user", "content": "Weather in Oslo?"}, call], "tools": tools}])
    answer, tool = read_jsonl(path, tok)
    assert answer.prompt == tok.encode(tok.apply_chat_template(ask, add_generation_prompt=True))
    assert tok.decode(answer.prompt, skip_special_tokens=False).endswith("<|turn>model\n<|channel>thought\n<channel|>")
    assert tok.decode(answer.target, skip_special_tokens=False) == "2<turn|>\n"
    assert "get_weather" in tok.decode(tool.prompt, skip_special_tokens=False)  # declared
    assert tok.decode(tool.target, skip_special_tokens=False) == \
        '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|><|tool_response>'
    with pytest.raises(DataError, match='"tools" must be a list'):
        read_jsonl(write_jsonl(tmp_path / "bad.jsonl", [{"messages": [*ask, {"role": "assistant", "content": "2"}],
                                                         "tools": "get_weather"}]), tok)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "completion": ', "not valid JSON"),
    ('["prompt", "completion"]', "expected a JSON object"),
    ('{"text": "hello"}', 'expected {"prompt", "completion"} or {"messages"}'),
    ('{"prompt": "a", "completion": 3}', '"completion" must be a string, got int'),
    ('{"prompt": "a"}', '"completion" must be a string, got nothing'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "at least two messages"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}', 'role "assistant"'),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}', "content"),
])
def test_bad_data_lines_name_file_and_line(tmp_path, tokenizer_dir, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [addition_lines(1)[0], "", line])
    with pytest.raises(DataError) as e:
        read_jsonl(path, Tokenizer.from_dir(tokenizer_dir))
    assert str(e.value).startswith(f"{path}, line 3: ") and message in str(e.value)
    assert isinstance(e.value, LetterpressError)


def test_non_utf8_line_is_named(tmp_path, tokenizer_dir):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(DataError, match=rf"{path}, line 2: not UTF-8 text"):
        read_jsonl(path, Tokenizer.from_dir(tokenizer_dir))


def test_example_order_is_a_function_of_position():
    order = ExampleOrder(10, seed=4)
    first = [order(p) for p in range(25)]
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert first[:10] != first[10:20]  # a new permutation each epoch
    assert [ExampleOrder(10, seed=4)(p) for p in range(25)] == first
    data = TokenizedDataset([Example([2, i], [i + 1] * i) for i in range(1, 6)])
    assert data[3] == Example([2, 4], [5] * 4) and len(data) == 5
    train, held = data.split(0.4, seed=0)
    assert len(train) == 3 and len(held) == 2


# --------------------------------------------------------------------------------------------------- trainer
def trainer_config(tmp_path: Path, base_dir: Path, data_file: Path, **kw) -> TrainConfig:
    settings = dict(model=str(base_dir), data=str(data_file), output_dir=str(tmp_path / "out"), steps=4, batch_size=4,
                    micro_batch_size=2, lr=5e-3, min_lr=5e-4, warmup_steps=1, log_every=1, device="cpu",
                    progress=False, seed=1)
    return TrainConfig(**{**settings, **kw})


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_gives_bit_identical_weights(tmp_path, base_dir, data_file, method):
    """A run that dies after step 3 (last checkpoint at step 2) and is resumed to step 4 ends with exactly the
    weights of an uninterrupted run. LoRA runs with dropout, so the RNG state is part of what must resume."""
    # full: 2 micro-batches accumulated per step; lora: one micro-batch per step (keeps the test short)
    extra = dict(lora=L.LoRAConfig(rank=4, dropout=0.1), merge=True, batch_size=2) if method == "lora" else {}
    straight = Trainer(trainer_config(tmp_path / "a", base_dir, data_file, **extra)).train()
    interrupted = trainer_config(tmp_path / "b", base_dir, data_file, save_every=2, stop_after_steps=3, **extra)
    first = Trainer(interrupted).train()
    assert first.step == 3 and not first.finished and first.model_dir is None
    assert not (tmp_path / "b" / "out" / "model").exists()
    checkpoints = tmp_path / "b" / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000002", "step-0000003"]
    shutil.rmtree(checkpoints / "step-0000003")  # as if the process had died before leaving its checkpoint
    resumed = Trainer(trainer_config(tmp_path / "b", base_dir, data_file, save_every=2, **extra)).train()
    assert resumed.finished and resumed.step == 4
    a = load_file(straight.model_dir / "model.safetensors")
    b = load_file(resumed.model_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "out" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]  # the redone step 3 is logged once
    if method == "lora":
        assert load_file(straight.adapter_dir / L.ADAPTER_WEIGHTS).keys() == load_file(
            resumed.adapter_dir / L.ADAPTER_WEIGHTS).keys()


def test_lora_on_a_bfloat16_base_trains_float32_adapters(tmp_path, base_dir, data_file):
    """As PEFT's autocast_adapter_dtype: in bfloat16 most of a small update rounds away. The adapter trains and is
    saved in float32; the base stays bfloat16."""
    config = trainer_config(tmp_path, base_dir, data_file, lora=L.LoRAConfig(rank=4), batch_size=2, steps=2,
                            dtype="bfloat16")
    trainer = Trainer(config)
    result = trainer.train()
    modules = L.lora_modules(trainer.module.model)
    assert modules and all(m.lora_A.dtype == m.lora_B.dtype == torch.float32 for m in modules.values())
    assert all(m.weight.dtype == torch.bfloat16 for m in modules.values())
    saved = load_file(result.adapter_dir / L.ADAPTER_WEIGHTS)
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert any(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)  # it trained


def test_micro_batches_group_by_length_and_train_as_one_batch(tmp_path, base_dir, data_file):
    """With gradient accumulation a step's examples are cut into micro-batches of similar length (less padding);
    the update is the one of the whole batch in one pass: the same examples, draws and normalised loss."""
    cut = Trainer(trainer_config(tmp_path / "a", base_dir, data_file, steps=1, micro_batch_size=1, progress=False))
    lengths = [int(b.sequence_lengths[0]) for b in cut.step_batches(0)]
    assert lengths == sorted(lengths)
    whole = Trainer(trainer_config(tmp_path / "b", base_dir, data_file, steps=1, micro_batch_size=4))
    for trainer in (cut, whole):  # keep the step's gradients to compare them (the step itself leaves them alone)
        trainer.optimizer.zero_grad = lambda *args, **kwargs: None
    a, b = cut.train_step(), whole.train_step()
    assert a.loss == pytest.approx(b.loss, rel=1e-5) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)
    for p, q in zip(cut.model.parameters(), whole.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_resume_refuses_other_settings(tmp_path, base_dir, data_file):
    Trainer(trainer_config(tmp_path, base_dir, data_file, steps=2, save_every=1, stop_after_steps=1)).train()
    with pytest.raises(TrainError, match="batch_size"):
        Trainer(trainer_config(tmp_path, base_dir, data_file, steps=2, batch_size=2)).train()


def test_canvas_length_override(tmp_path, base_dir, data_file):
    """--canvas-length: the loss splits targets into canvases of the new length, the saved config carries it, the
    base checkpoint's generation defaults are kept, and a resume with another canvas length is refused."""
    trainer = Trainer(trainer_config(tmp_path, base_dir, data_file, steps=2, canvas_length=CANVAS // 2,
                                     save_every=1, stop_after_steps=1))
    assert trainer.loss_cfg.canvas_length == CANVAS // 2
    batch = trainer.step_batches(0)[0]
    assert batch.clean.shape[1] == CANVAS // 2
    trainer.train()
    result = Trainer(trainer_config(tmp_path, base_dir, data_file, steps=2, canvas_length=CANVAS // 2)).train()
    assert json.loads((result.model_dir / "config.json").read_text())["canvas_length"] == CANVAS // 2
    assert (json.loads((result.model_dir / "generation_config.json").read_text())
            == json.loads((base_dir / "generation_config.json").read_text()))
    with pytest.raises(TrainError, match="canvas_length"):
        Trainer(trainer_config(tmp_path / "x", base_dir, data_file, canvas_length=0))
    Trainer(trainer_config(tmp_path / "y", base_dir, data_file, steps=2, save_every=1, stop_after_steps=1)).train()
    with pytest.raises(TrainError, match="canvas_length=8"):
        Trainer(trainer_config(tmp_path / "y", base_dir, data_file, steps=2, canvas_length=CANVAS // 2)).train()


def test_trainer_output_loads_in_letterpress_and_transformers(tmp_path, base_dir, data_file, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    result = Trainer(trainer_config(tmp_path, base_dir, data_file, steps=2, eval_fraction=0.25)).train()
    assert result.eval["eval_examples"] == 8 and result.eval["eval_loss"] > 0
    folder = result.model_dir
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (folder / name).is_file()
    ours = DiffusionGemma.from_pretrained(folder)
    base = DiffusionGemma.from_pretrained(base_dir)
    assert not torch.equal(ours.layers[0].self_attn.q_proj.weight, base.layers[0].self_attn.q_proj.weight)
    assert torch.equal(ours.layers[0].router.proj.weight, base.layers[0].router.proj.weight)  # frozen by default

    ref = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(folder).eval()
    prompt = torch.tensor([[2, 17, 33, 41, 9]])
    canvas = torch.randint(0, V, (1, CANVAS), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(decoder_logits(ref, prompt, canvas), our_logits(ours, prompt, canvas), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------------ LoRA
def randomized_lora(model, cfg: L.LoRAConfig, seed: int = 0):
    names = L.apply_lora(model, cfg, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in L.lora_modules(model).values():
            module.lora_B.normal_(0, 0.1, generator=g)  # B starts at zero; make the adapter do something
    return names


def test_lora_wraps_linear_layers_only_and_trains_only_adapters():
    model = tiny_model()
    names = L.apply_lora(model, L.LoRAConfig(rank=4))
    assert "layers.0.self_attn.v_proj" in names and "self_conditioning.gate_proj" in names
    assert not any("router" in n or "experts" in n for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * len(names)
    with pytest.raises(TrainError):
        L.apply_lora(tiny_model(), L.LoRAConfig(target_modules=("nothing",)))


def test_lora_save_load_merge_round_trip(tmp_path):
    prompt = torch.tensor([[2, 40, 41, 42]])
    canvas = torch.randint(0, V, (1, CANVAS), generator=torch.Generator().manual_seed(1))
    cfg = L.LoRAConfig(rank=4, alpha=8)
    adapted = tiny_model()
    base_out = our_logits(adapted, prompt, canvas)
    randomized_lora(adapted, cfg)
    expected = our_logits(adapted, prompt, canvas)
    assert not torch.allclose(expected, base_out, atol=1e-3)

    state = {k: v for k, v in adapted.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}
    folder = L.save_adapter(state, cfg, tmp_path / "adapter", base_model="tiny")
    config = json.loads((folder / L.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    keys = set(load_file(folder / L.ADAPTER_WEIGHTS))
    assert "base_model.model.model.decoder.layers.1.mlp.up_proj.lora_A.weight" in keys
    assert "base_model.model.model.encoder.language_model.layers.1.mlp.up_proj.lora_B.weight" in keys
    assert "base_model.model.model.decoder.self_conditioning.down_proj.lora_A.weight" in keys

    loaded = tiny_model()
    L.load_adapter(loaded, folder)
    assert torch.equal(our_logits(loaded, prompt, canvas), expected)
    merged = L.merge_lora(loaded)
    assert not L.lora_modules(merged)
    torch.testing.assert_close(our_logits(merged, prompt, canvas), expected, atol=1e-4, rtol=1e-4)
    by_state = L.merge_lora_state(adapted.state_dict(), cfg.scaling)
    assert by_state.keys() == merged.state_dict().keys()
    torch.testing.assert_close(by_state["layers.0.self_attn.q_proj.weight"], merged.layers[0].self_attn.q_proj.weight)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
def test_peft_loads_our_adapter_on_transformers(tmp_path, base_dir):
    """Our adapter folder, loaded by PEFT onto transformers' model, computes what our LoRA model computes."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = L.LoRAConfig(rank=4, alpha=8)
    ours = DiffusionGemma.from_pretrained(base_dir)
    randomized_lora(ours, cfg, seed=5)
    state = {k: v for k, v in ours.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}
    folder = L.save_adapter(state, cfg, tmp_path / "adapter")
    ref = transformers.DiffusionGemmaForBlockDiffusion.from_pretrained(base_dir).eval()
    ref = peft.PeftModel.from_pretrained(ref, str(folder)).eval()
    wrapped = [n for n, m in ref.named_modules() if hasattr(m, "lora_A") and "vision" in n]
    assert not wrapped  # the regex keeps PEFT off the vision tower
    prompt, canvas = torch.tensor([[2, 17, 33, 41, 9]]), torch.arange(CANVAS)[None] + 100
    torch.testing.assert_close(decoder_logits(ref.base_model.model, prompt, canvas), our_logits(ours, prompt, canvas),
                               atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------- command line, recipes
def test_cli_lora_train_then_merge_lora(tmp_path, base_dir, data_file, capsys):
    out = tmp_path / "run"
    code = cli_main(["train", "--model", str(base_dir), "--data", str(data_file), "--output", str(out), "--lora",
                     "--lora-rank", "4", "--steps", "2", "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "1",
                     "--loss", "reweighted-ce", "--no-progress", "--device", "cpu", "--merge"])
    assert code == 0
    assert "saved the LoRA adapter" in capsys.readouterr().out
    assert (out / "adapter" / L.ADAPTER_CONFIG).is_file() and (out / "model" / "model.safetensors").is_file()
    assert cli_main(["merge-lora", str(base_dir), str(out / "adapter"), str(tmp_path / "merged")]) == 0
    a = load_file(out / "model" / "model.safetensors")
    b = load_file(tmp_path / "merged" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def bfloat16_copy(base_dir: Path, folder: Path) -> Path:
    from safetensors.torch import save_file

    shutil.copytree(base_dir, folder)
    for path in folder.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(path).items()},
                  path)
    return folder


def test_train_merge_stores_the_bases_dtype_as_merge_lora_does(tmp_path, base_dir, data_file):
    """A bfloat16 base: `train --lora --merge` wrote float32 (twice the size), `merge-lora` bfloat16."""
    base = bfloat16_copy(base_dir, tmp_path / "bf16")
    out = tmp_path / "run"
    assert cli_main(["train", "--model", str(base), "--data", str(data_file), "--output", str(out), "--lora",
                     "--steps", "1", "--batch-size", "2", "--no-progress", "--device", "cpu", "--merge"]) == 0
    assert cli_main(["merge-lora", str(base), str(out / "adapter"), str(tmp_path / "merged")]) == 0
    a = load_file(out / "model" / "model.safetensors")
    b = load_file(tmp_path / "merged" / "model.safetensors")
    assert {v.dtype for v in a.values() if v.is_floating_point()} == {torch.bfloat16}
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_errors_are_one_line(tmp_path, base_dir, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": 1, "completion": "x"}'])
    assert cli_main(["train", "--model", str(base_dir), "--data", str(bad), "--output", str(tmp_path / "o"),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f'error: {bad}, line 1: "prompt" must be a string, got int'
    assert cli_main(["train", "--data", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "--model" in capsys.readouterr().err
    assert cli_main(["train", "--recipe", "nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    # a quantized checkpoint (the embedded default is int8): refused before any work, full or LoRA; a full run
    # used to train only its embedding and norms and then fail to save with a traceback
    from letterpress.embedded import ASSETS

    for extra in ([], ["--lora"]):
        assert cli_main(["train", "--model", str(ASSETS / "tiny_tasks"), "--data", str(bad), *extra,
                         "--output", str(tmp_path / "q")]) == 2
        assert "is stored quantized (int8): training needs its float weights" in capsys.readouterr().err
        assert not (tmp_path / "q").exists()
    # counts no run can use: one line before anything is built or written, for recipes with their own loop too
    for recipe, flag, value in (("tiny-vlm-tower", "--steps", "-1"), ("tiny-vlm", "--batch-size", "0"),
                                ("tiny-tasks", "--lr", "-1"), ("tiny-tasks", "--lr", "nan"),
                                ("tiny-tasks", "--weight-decay", "inf")):
        out = tmp_path / f"o-{recipe}"
        assert cli_main(["train", "--recipe", recipe, flag, value, "--output", str(out)]) == 2
        assert capsys.readouterr().err.strip().startswith(f"error: {flag} {value}")
        assert not out.exists()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert cli_main(["train", "--recipe", "tiny-tasks", "--output", str(a_file)]) == 2
    assert "is a file: the run needs a folder" in capsys.readouterr().err and a_file.read_text() == "mine"


def test_recipes_from_scratch(tmp_path, tokenizer_dir):
    def build(tok, seed):
        examples = [Example(tok.encode(f"{i} +", add_special_tokens=True), tok.encode(f" {i}")) for i in range(8)]
        return TokenizedDataset(examples), TokenizedDataset(examples[:2])

    register(Recipe(name="test-echo", description="echo numbers", build_data=build, model_config=tiny_config(),
                    tokenizer=str(tokenizer_dir), hyperparameters=dict(steps=2, batch_size=2, lr=1e-2, warmup_steps=1),
                    evaluate=lambda trainer: {"layers": float(len(trainer.model.layers))}))
    try:
        recipe = get_recipe("test-echo")
        cfg = recipe.config(output_dir=str(tmp_path), progress=False, device="cpu")
        assert cfg.steps == 2 and cfg.model_config["canvas_length"] == CANVAS
        train_data, eval_data = recipe.build_data(Tokenizer.from_dir(tokenizer_dir), cfg.seed)
        result = Trainer(cfg, train_data, eval_data, recipe.evaluate).train()
        assert result.finished and result.eval["eval_examples"] == 2 and result.eval["layers"] == 2
        model = DiffusionGemma.from_pretrained(result.model_dir)
        assert model.config.canvas_length == CANVAS
        with pytest.raises(TrainError, match="unknown settings"):
            recipe.config(learning_rate=1)
    finally:
        RECIPES.pop("test-echo")
    assert "tiny-reverse" in RECIPES


def test_logged_metrics_average_the_steps_since_the_last_line():
    from letterpress.train.trainer import StepStats, window_means

    window = [StepStats(loss=1.0, diffusion=0.5, encoder=2.0, grad_norm=1.0, lr=1e-3, loss_tokens=4,
                        forward_tokens=10, seconds=1.0),
              StepStats(loss=3.0, diffusion=1.5, encoder=4.0, grad_norm=3.0, lr=5e-4, loss_tokens=8,
                        forward_tokens=30, seconds=3.0)]
    line = window_means(window)
    assert line == {"loss": 2.0, "diffusion": 1.0, "encoder": 3.0, "grad_norm": 2.0, "loss_tokens": 6.0,
                    "forward_tokens": 20.0, "seconds": 2.0, "lr": 5e-4, "steps_averaged": 2}


def test_a_train_config_made_in_python_is_checked_as_the_flags_are(tmp_path, base_dir, data_file):
    """Trainer(TrainConfig(...)) skipped the CLI's checks: batch_size 0 was a ZeroDivisionError, lora=True an
    AttributeError, steps 0 saved an untrained "fine-tuned" model."""
    from letterpress.errors import TrainError

    for kw, message in ((dict(batch_size=0), "--batch-size 0"), (dict(steps=0), "--steps 0"),
                        (dict(micro_batch_size=0), "--micro-batch-size 0"), (dict(warmup_steps=-5), "--warmup-steps"),
                        (dict(lr=float("nan")), "finite"), (dict(eval_examples=0), "--eval-examples 0"),
                        (dict(eval_fraction=1.0), "--eval-fraction 1.0"), (dict(lora=True), "must be a LoRAConfig")):
        with pytest.raises(TrainError, match=message):
            Trainer(trainer_config(tmp_path, base_dir, data_file, **kw))
        assert not (tmp_path / "out").exists()
    # a fraction asked for holds out at least one example, even of a tiny file
    data = TokenizedDataset([Example([2, i], [i + 1]) for i in range(1, 4)])
    assert [len(part) for part in data.split(0.01, seed=0)] == [2, 1]


def test_examples_past_the_models_positions_are_skipped_by_default(tmp_path, base_dir, caplog):
    """Unset --max-length is the model's max_position_embeddings: a longer example used to train silently."""
    from letterpress.config import load_model_config

    limit = load_model_config(base_dir).text.max_position_embeddings
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1 + 1 =", "completion": " 2"},
                                              {"prompt": "1 " * (limit + 10), "completion": " 2"}])
    trainer = Trainer(trainer_config(tmp_path, base_dir, path, steps=1, batch_size=1, micro_batch_size=1))
    assert len(trainer.train_data) == 1 and f"skipped 1 examples longer than {limit} tokens" in caplog.text


def test_dtype_auto_trains_in_the_bases_dtype(tmp_path, base_dir, data_file):
    """--dtype auto said "pass it where a checkpoint is loaded" to a command that loads one."""
    from letterpress.errors import TrainError

    base = bfloat16_copy(base_dir, tmp_path / "bf16")
    trainer = Trainer(trainer_config(tmp_path, base, data_file, dtype="auto", steps=1))
    assert trainer.dtype == torch.bfloat16
    with pytest.raises(TrainError, match="trained from scratch has none"):
        Trainer(trainer_config(tmp_path / "scratch", base_dir, data_file, model=None,
                               model_config=json.loads((base_dir / "config.json").read_text()), dtype="auto"))
