"""`torchrun` + FSDP2 on CPU (gloo, 2 processes) against one process on the same global batch: same losses,
same gradient norms, same updated weights; the LoRA run is also interrupted and resumed from its sharded
checkpoint. Runs the real command line under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .train_fixtures import addition_lines, make_checkpoint, make_tokenizer, write_jsonl

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def letterpress_train(args: list[str], nproc: int, timeout: int = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "letterpress.cli", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "letterpress.cli", "train", *args]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]


def logged(folder, key: str) -> list[float]:
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in lines if "loss" in r]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp2_two_processes_match_one(tmp_path, method):
    tokenizer = make_tokenizer(tmp_path / "tok")
    base = make_checkpoint(tmp_path / "base", tokenizer)
    data = write_jsonl(tmp_path / "train.jsonl", addition_lines(24))
    common = ["--model", str(base), "--data", str(data), "--steps", "2", "--batch-size", "4",
              "--micro-batch-size", "2", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup-steps", "1", "--log-every", "1",
              "--device", "cpu", "--no-progress", "--seed", "3", "--eval-fraction", "0.25",
              # Adam's first steps are +-lr for any gradient much larger than eps: with the default 1e-8, float
              # noise in a near-zero gradient would decide an update's sign. A larger eps keeps updates
              # proportional to such gradients, so the comparison checks the gradients, not that noise.
              "--adam-eps", "1e-4"]
    if method == "lora":
        common += ["--lora", "--lora-rank", "4", "--merge"]
    # One process: 2 micro-batches of 2 accumulated. Two processes: one micro-batch of 2 each, FSDP2-sharded.
    letterpress_train(common + ["--output", str(tmp_path / "one")], nproc=1)
    two = common + ["--output", str(tmp_path / "two")]
    if method == "lora":  # also stop after step 1 and resume from the sharded checkpoint (each rank its shard)
        letterpress_train(two + ["--save-every", "1", "--stop-after-steps", "1"], nproc=2)
        shards = sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step-0000001").glob("*.distcp"))
        assert shards == ["__0_0.distcp", "__1_0.distcp"]
        assert not (tmp_path / "two" / "model").exists()
    letterpress_train(two, nproc=2)

    for key in ("loss", "diffusion", "encoder", "grad_norm"):
        one, two = logged(tmp_path / "one", key), logged(tmp_path / "two", key)
        assert len(one) == len(two) == 2
        assert one == pytest.approx(two, rel=1e-5, abs=1e-6), key
    evals = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()][-1]
             for run in ("one", "two")]
    assert evals[0]["eval_examples"] == evals[1]["eval_examples"] == 6
    assert evals[0]["eval_loss"] == pytest.approx(evals[1]["eval_loss"], rel=1e-5)
    w1 = load_file(tmp_path / "one" / "model" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "model" / "model.safetensors")
    w0 = load_file(base / "model.safetensors")
    assert w1.keys() == w2.keys()
    moved = 0
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=2e-5, rtol=1e-4, msg=name)
        moved += not torch.equal(w1[name], w0[name])
    assert moved > 10  # the steps did change the weights


def test_train_leaves_the_process_group_after_dropping_the_model(tmp_path, monkeypatch):
    """`letterpress train` calls distributed.close with the Trainer (its sharded model, optimizer and their
    collective work) already gone, so the backend's threads never outlive what they hold; clean=False after
    an error (no barrier a failed peer might never reach). One process: close is only observed here."""
    import gc
    import weakref

    from letterpress.cli import main
    from letterpress.train import distributed
    from letterpress.train.trainer import Trainer

    tokenizer = make_tokenizer(tmp_path / "tok")
    base = make_checkpoint(tmp_path / "base", tokenizer)
    data = write_jsonl(tmp_path / "train.jsonl", addition_lines(8))
    made, calls = [], []
    real_init = Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    def close(env, clean=True):
        gc.collect()
        calls.append((clean, made[-1]() is None))

    monkeypatch.setattr(Trainer, "__init__", init)
    monkeypatch.setattr(distributed, "close", close)
    args = ["train", "--model", str(base), "--data", str(data), "--steps", "1", "--batch-size", "2", "--device", "cpu",
            "--no-progress", "--no-plot", "--output", str(tmp_path / "out")]
    assert main(args) == 0
    assert calls == [(True, True)]
    monkeypatch.setattr(Trainer, "train", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(args)
    assert calls[-1][0] is False
