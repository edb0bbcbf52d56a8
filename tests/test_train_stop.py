"""The Trainer's ends: SIGTERM / Ctrl-C stop a run after the current step with a resume checkpoint (a real
`python -m letterpress.cli train` process, and in-process), a finished run leaves a checkpoint that more
--steps continue from, a rerun of a finished run does nothing, and what the logged token counts count.
Tiny models, CPU."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from letterpress.cli import main as cli_main
from letterpress.train.loss import Example, LossConfig, loss_sums, make_batch
from letterpress.train.trainer import StopSignals, TrainConfig, Trainer, TrainResult, forward_tokens

from .train_fixtures import (CANVAS, addition_lines, make_checkpoint, make_tokenizer, sigterm_after_first_log,
                             tiny_model, write_jsonl)

V = 512


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    tokenizer = make_tokenizer(tmp_path_factory.mktemp("tok"))
    return make_checkpoint(tmp_path_factory.mktemp("base") / "ckpt", tokenizer)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", addition_lines(32))


def config(out: Path, base_dir: Path, data_file: Path, **kw) -> TrainConfig:
    settings = dict(model=str(base_dir), data=str(data_file), output_dir=str(out), steps=4, batch_size=2, lr=5e-3,
                    min_lr=5e-4, warmup_steps=1, log_every=1, device="cpu", progress=False, plot=False, seed=1)
    return TrainConfig(**{**settings, **kw})


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


def checkpoint_tensors(folder: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Model and optimizer tensors of a resume checkpoint (torch.distributed.checkpoint format), flattened."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(folder), str(tmp))
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(tmp, weights_only=False))
    return flat


# ----------------------------------------------------------------------------------------------- signals
def test_sigterm_stops_the_command_with_a_checkpoint_and_the_same_command_resumes(tmp_path, base_dir, data_file,
                                                                                 capsys):
    """SIGTERM to a real `letterpress train` process after it has logged a step: it finishes that step, writes
    its resume checkpoint, says where it stopped and exits 143. The same command again (time-boxed to two more
    steps here) resumes there, and the run equals one never stopped: the same loss lines, the same weights and
    optimizer state. A constant learning rate keeps the long --steps irrelevant to the updates, so when the
    signal lands does not matter."""
    common = ["train", "--model", str(base_dir), "--data", str(data_file), "--steps", "100000", "--batch-size", "2",
              "--lr", "3e-3", "--min-lr", "3e-3", "--warmup-steps", "0", "--log-every", "1", "--device", "cpu",
              "--no-progress", "--no-plot", "--seed", "1", "--threads", "1"]
    out = tmp_path / "stopped"
    returncode, stderr = sigterm_after_first_log(common, out, timeout=180)
    assert returncode == 128 + signal.SIGTERM, stderr[-3000:]
    step = logged(out)[-1]["step"]
    assert [r["step"] for r in logged(out)] == list(range(1, step + 1))
    assert f"stopped at step {step} of 100000; run the same command again to resume" in stderr
    assert checkpoints(out) == [f"step-{step:07d}"] and not (out / "model").exists()

    # The same command again (in this process, to spare an interpreter start: the same code, one thread too)
    assert cli_main([*common, "--output", str(out), "--stop-after-steps", "2"]) == 0
    assert f"stopped at step {step + 2} of 100000" in capsys.readouterr().err

    straight = tmp_path / "straight"  # the same run, never stopped
    assert cli_main([*common, "--output", str(straight), "--stop-after-steps", str(step + 2)]) == 0
    assert logged(out) == [{**r, "seconds": logged(out)[i]["seconds"]} for i, r in enumerate(logged(straight))]
    a = checkpoint_tensors(out / "checkpoints" / f"step-{step + 2:07d}", tmp_path / "a.pt")
    b = checkpoint_tensors(straight / "checkpoints" / f"step-{step + 2:07d}", tmp_path / "b.pt")
    assert a.keys() == b.keys() and any(".exp_avg" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def wait_until_handled(sig: int, repeat: bool = False, timeout: float = 10.0) -> None:
    """Wait until StopSignals' handler for `sig` has run (it records the signal), so a second signal is not
    sent while the first is still pending; returns at once when another handler is installed. For a repeated
    signal, wait until the handler has given way (restored the previous one, which raises KeyboardInterrupt
    for SIGINT right here): on a loaded machine it can run late, after the step it was meant to cut short."""
    stop = getattr(signal.getsignal(sig), "__self__", None)
    deadline = time.monotonic() + timeout
    while (isinstance(stop, StopSignals) and (repeat or stop.signum is None) and time.monotonic() < deadline):
        time.sleep(0.001)
        stop = getattr(signal.getsignal(sig), "__self__", None)


def send_during_step(trainer: Trainer, step: int, *signals: int) -> None:
    real = trainer.train_step

    def train_step():
        if trainer.step + 1 == step:
            for i, sig in enumerate(signals):
                # To the main thread itself: os.kill may hand the signal to another thread (torch's), which on a
                # loaded machine can run its C handler late, and two pending SIGINTs would then merge into one.
                signal.pthread_kill(threading.main_thread().ident, sig)
                wait_until_handled(sig, repeat=sig in signals[:i])
        return real()

    trainer.train_step = train_step


@pytest.fixture
def python_sigint():
    """Ctrl-C as Python sets it up (KeyboardInterrupt), whatever ran before. In three full-suite runs this test's
    second Ctrl-C raised nothing; a leaked handler was suspected, but a plugin comparing the SIGINT and SIGTERM
    handlers around every test of the suite found none (ninth session), so the cause is still open."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_finishes_the_step_saves_and_restores_the_handlers(tmp_path, base_dir, data_file, python_sigint):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    trainer = Trainer(config(tmp_path, base_dir, data_file, steps=6, save_every=4, log_every=3))
    send_during_step(trainer, 2, signal.SIGINT)
    result = trainer.train()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert result.stopped_by == signal.SIGINT and result.exit_status == 130
    assert result.step == 2 and not result.finished and result.model_dir is None
    assert checkpoints(tmp_path) == ["step-0000002"]
    [line] = logged(tmp_path)  # the unfinished logging window is logged where the run stopped
    assert line["step"] == 2 and line["steps_averaged"] == 2 and "tokens" not in line
    # loss_tokens: scored canvas positions + encoder next-token targets; forward_tokens: what the passes read
    batches = trainer.step_batches(0) + trainer.step_batches(1)
    assert line["loss_tokens"] == sum(b.num_scored + b.num_next_token_scored for b in batches) / 2
    assert line["forward_tokens"] == sum(forward_tokens(b, trainer.loss_cfg) for b in batches) / 2

    # Twice: the second one is Ctrl-C as before (KeyboardInterrupt at once), and the handlers are back.
    trainer = Trainer(config(tmp_path, base_dir, data_file, steps=6, save_every=4, log_every=3))
    assert trainer.resume() and trainer.step == 2
    send_during_step(trainer, 3, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert checkpoints(tmp_path) == ["step-0000002"]  # abandoned: nothing written


def test_stop_signals_only_in_the_main_thread_and_ranks_agree():
    from letterpress.train.distributed import DistEnv

    seen = []
    thread = threading.Thread(target=lambda: seen.append(StopSignals().__enter__()._previous))
    thread.start()
    thread.join()
    assert seen == [{}]  # a Trainer trained from a worker thread leaves signals alone
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(announce=False) as signals:
        assert signal.getsignal(signal.SIGTERM) == signals._request
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert signals.agreed(DistEnv()) == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("signum, status", [(None, 0), (signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_run_and_its_stop_signals_give_one_exit_status(signum, status):
    """TrainResult's exit status is StopSignals' rule (128 + the signal, what a shell reports), so the Trainer
    and the VLM loops, which return StopSignals' own, cannot disagree."""
    signals = StopSignals(announce=False)
    signals.signum = signum
    result = TrainResult(step=1, finished=signum is None, last=None, eval={}, model_dir=None, adapter_dir=None,
                         stopped_by=signum)
    assert result.exit_status == signals.exit_status == StopSignals.status(signum) == status


def test_a_signal_during_the_last_step_leaves_the_outputs_to_the_next_run(tmp_path, base_dir, data_file):
    trainer = Trainer(config(tmp_path, base_dir, data_file, steps=3))
    send_during_step(trainer, 3, signal.SIGTERM)
    result = trainer.train()
    assert result.step == 3 and not result.finished and result.exit_status == 143
    assert checkpoints(tmp_path) == ["step-0000003"] and not (tmp_path / "model").exists()
    again = Trainer(config(tmp_path, base_dir, data_file, steps=3)).train()  # nothing to train: writes the model
    assert again.finished and again.last is None and (again.model_dir / "model.safetensors").is_file()
    assert [r["step"] for r in logged(tmp_path) if "loss" in r] == [1, 2, 3]


# ------------------------------------------------------------------------------------------- finished runs
def test_a_finished_run_is_not_redone_and_more_steps_continue_it(tmp_path, base_dir, data_file, capsys):
    """The last step writes a resume checkpoint too. The identical command afterwards does nothing (says so);
    a larger --steps continues from that checkpoint with its optimizer state: with a constant learning rate
    2 + 2 steps give exactly the weights of 4 straight steps. With a cosine, the continued steps follow the new
    total's schedule from the first one on."""
    flat = ["--lr", "3e-3", "--min-lr", "3e-3", "--warmup-steps", "0"]
    args = ["train", "--model", str(base_dir), "--data", str(data_file), "--batch-size", "2", "--log-every", "1",
            "--device", "cpu", "--no-progress", "--no-plot", "--seed", "1", *flat, "--output", str(tmp_path / "a")]
    assert cli_main(args + ["--steps", "2"]) == 0
    assert checkpoints(tmp_path / "a") == ["step-0000002"]
    state = json.loads((tmp_path / "a" / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert state["final_outputs"] == ["model"]
    model_file = tmp_path / "a" / "model" / "model.safetensors"
    written, lines = model_file.stat().st_mtime_ns, logged(tmp_path / "a")
    capsys.readouterr()
    assert cli_main(args + ["--steps", "2"]) == 0
    assert "holds a finished run (step 2 of 2): nothing to do" in capsys.readouterr().err
    assert model_file.stat().st_mtime_ns == written and logged(tmp_path / "a") == lines

    assert cli_main(args + ["--steps", "4"]) == 0
    assert checkpoints(tmp_path / "a") == ["step-0000002", "step-0000004"]
    straight = tmp_path / "b"
    assert cli_main([*args[:-1], str(straight), "--steps", "4"]) == 0
    a, b = load_file(model_file), load_file(straight / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)

    cosine = config(tmp_path / "c", base_dir, data_file, steps=2, warmup_steps=0)
    Trainer(cosine).train()
    Trainer(replace(cosine, steps=4)).train()
    Trainer(replace(cosine, steps=4, output_dir=str(tmp_path / "d"))).train()
    lrs = {run: [r["lr"] for r in logged(tmp_path / run) if "lr" in r] for run in "cd"}
    assert lrs["c"][2:] == lrs["d"][2:] and lrs["c"][1] != lrs["d"][1]


def test_a_changed_lr_on_resume_applies_from_the_next_step(tmp_path, base_dir, data_file, capsys):
    """Resuming with another --lr / --min-lr (a finished run continued with a new peak): the run follows this
    command's schedule from the checkpoint's step on, as a run started with those values would at that step,
    and says so in one line; the checkpoint's stored peak no longer wins."""
    from letterpress.train.trainer import lr_factor

    first = config(tmp_path / "a", base_dir, data_file, steps=2, warmup_steps=1)
    Trainer(first).train()
    capsys.readouterr()
    more = replace(first, steps=4, lr=1e-3, min_lr=2e-4)
    Trainer(more).train()
    assert capsys.readouterr().err.count("learning rate changed since the checkpoint (--lr 0.005 -> 0.001, "
                                         "--min-lr 0.0005 -> 0.0002): from step 2 on the run follows this "
                                         "command's schedule") == 1
    Trainer(replace(more, output_dir=str(tmp_path / "b"))).train()  # the new values from the start
    lrs = {run: [r["lr"] for r in logged(tmp_path / run) if "lr" in r] for run in "ab"}
    assert lrs["a"][2:] == lrs["b"][2:] == pytest.approx([1e-3 * lr_factor(s, 1, 4, 0.2) for s in (2, 3)])
    state = torch.load(tmp_path / "a" / "checkpoints" / "step-0000004" / "scheduler.pt", weights_only=False)
    assert state["base_lrs"] == [1e-3] * len(state["base_lrs"])
    Trainer(replace(more, steps=5)).train()  # unchanged: no line
    assert "learning rate changed" not in capsys.readouterr().err


def test_only_the_main_rank_says_it_resumed(tmp_path, base_dir, data_file, monkeypatch, caplog):
    """Under torchrun every rank resumes (rank 0 broadcasts the checkpoint's path) but only rank 0 logs it:
    a rank-1 env, with the broadcast standing in for rank 0's, loads the checkpoint and says nothing."""
    from letterpress.train import distributed as D

    cfg = config(tmp_path, base_dir, data_file, steps=2)
    Trainer(replace(cfg, stop_after_steps=1)).train()
    caplog.set_level(logging.INFO, logger="letterpress.train.trainer")
    main, other = Trainer(cfg), Trainer(cfg)
    checkpoint = main.latest_checkpoint()
    monkeypatch.setattr(D, "broadcast_object", lambda obj, env: checkpoint)  # what rank 0 would send
    other.env = D.DistEnv(rank=1)
    assert other.resume() and other.step == 1
    assert "resumed from" not in caplog.text
    assert main.resume() and main.step == 1
    assert caplog.text.count(f"resumed from {checkpoint} at step 1") == 1


def test_missing_outputs_are_written_again(tmp_path, base_dir, data_file):
    """A run killed while writing its model (or whose model was deleted) is finished by the next run from its
    last checkpoint, without training again. --no-resume starts over."""
    cfg = config(tmp_path, base_dir, data_file, steps=2)
    Trainer(cfg).train()
    first = load_file(tmp_path / "model" / "model.safetensors")
    shutil.rmtree(tmp_path / "model")
    result = Trainer(cfg).train()
    assert result.finished and result.last is None and not result.already_complete
    again = load_file(result.model_dir / "model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert [r["step"] for r in logged(tmp_path) if "loss" in r] == [1, 2]

    # --no-resume starts over: the earlier run's checkpoints (its finished one at step 2 among them) and metrics
    # go, so the next resume continues this run, not that one.
    Trainer(replace(cfg, resume=False, stop_after_steps=1)).train()
    assert checkpoints(tmp_path) == ["step-0000001"] and [r["step"] for r in logged(tmp_path)] == [1]
    assert not (tmp_path / "model").exists()  # the earlier run's model is not left to pass for this one's
    assert Trainer(cfg).train().finished and checkpoints(tmp_path) == ["step-0000001", "step-0000002"]


# --------------------------------------------------------------------------------------------- token counts
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0)], ids=["both", "no-encoder", "no-diffusion"])
def test_forward_tokens_count_what_the_passes_read(weights):
    """`forward_tokens` = the non-padding positions the loss's forward passes actually read (counted by
    watching the model), so the encoder pass over prompt + target is counted only when its loss is on."""
    diffusion, encoder = weights
    model = tiny_model()
    cfg = LossConfig(canvas_length=CANVAS, diffusion_loss_weight=diffusion, encoder_loss_weight=encoder)
    examples = [Example([2, 30 + i], list(range(40, 40 + 3 * i + 2))) for i in range(4)]
    batch = make_batch(examples, cfg, V, [torch.Generator().manual_seed(i) for i in range(4)])
    read = []
    encode, denoise = model.encode, model.denoise

    def counting_encode(ids, cache, input_lengths=None, **kw):
        read.append(int(input_lengths.sum()) if input_lengths is not None else ids.numel())
        return encode(ids, cache, input_lengths=input_lengths, **kw)

    def counting_denoise(canvas, *args, **kw):
        read.append(canvas.numel())
        return denoise(canvas, *args, **kw)

    model.encode, model.denoise = counting_encode, counting_denoise
    loss_sums(model, batch, cfg)
    assert len(read) == (3 if diffusion else 0) + (1 if encoder else 0)  # context, 2 canvas passes; sequence
    assert forward_tokens(batch, cfg) == sum(read)
