"""Tensor and expert parallel serving (letterpress.parallel) on CPU with gloo and 2 processes: the sharded
model's logits equal one process's, a seeded request gives the same tokens, each rank holds about half the
weights and KV cache, and a dead worker takes the server down."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from letterpress.errors import ConfigError, NotSupportedError
from letterpress.model.layers import Experts
from letterpress.parallel import Shard, shard_model
from letterpress.quant import QuantExperts, QuantLinear, model_bytes, quantize_model

from .fast_fixtures import random_model, save_checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

QK = 0.3  # tame attention (see fast_fixtures.random_model): float32 rounding then moves logits by ~1e-6
# (name, expert parallel, fast path, quantized before sharding)
CASES = [("tp", False, False, None), ("ep", True, False, None), ("tp-fast", False, True, None),
         ("ep-fast", True, True, None), ("tp-int8", False, False, "int8"), ("ep-int8", True, False, "int8")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randint(3, 384, (2, 10), generator=g), torch.tensor([10, 7]),
            torch.randint(3, 384, (2, 16), generator=g))


def run_model(model, paged: bool) -> dict[str, torch.Tensor]:
    """Encode a batch of two prompts (one padded), then two denoise steps (the second self-conditioned)."""
    ids, lengths, canvas = inputs()
    with torch.inference_mode():
        cache = model.new_paged_cache(2, 64, block_size=4) if paged else model.new_cache(2, 64)
        model.encode(ids, cache, None, lengths)
        first = model.denoise(canvas, cache)
        second = model.denoise(canvas, cache, self_conditioning_logits=first)
    return {"first": first, "second": second}


def build(fast: bool, quant: str | None):
    from letterpress.parallel.shard import switch_fast_experts

    model = random_model(0, qk_scale=QK)
    quantize_model(model, quant)  # a checkpoint stored quantized: sharding slices the packed parts
    return model, (lambda m: switch_fast_experts(m)) if fast else None


def sharded_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of the 2-process run: every case, on the contiguous and the paged cache."""
    import torch.distributed as dist

    from letterpress import chunks

    torch.set_num_threads(1)
    chunks.CHUNK_BYTES = 4 * 384 * 5  # the LM head gathers 5 positions at a time: 7 gathers for 32 positions
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for name, ep, fast, quant in CASES:
        model, switch = build(fast, quant)
        shard_model(model, Shard(rank, world, ep))
        if switch:
            switch(model)
        for paged in (False, True):
            results[(name, paged)] = run_model(model, paged)
    results["collectives"] = count_collectives(rank, world)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def count_collectives(rank: int, world: int) -> dict[str, list[int]]:
    """Elements moved by each kind of collective in one self-conditioned denoise step (what
    benchmarks/parallel.py counts at the released shapes)."""
    import torch.distributed as dist

    model = shard_model(random_model(0, qk_scale=QK), Shard(rank, world))
    ids, lengths, canvas = inputs()
    seen: dict[str, list[int]] = {"all_reduce": [], "broadcast": [], "gather": []}
    originals = {name: getattr(dist, name) for name in seen}

    def counting(name):
        def call(tensor, *args, **kwargs):
            seen[name].append(tensor.numel())
            return originals[name](tensor, *args, **kwargs)
        return call

    with torch.inference_mode():
        cache = model.new_cache(2, 64)
        model.encode(ids, cache, None, lengths)
        first = model.denoise(canvas, cache)
        for name in seen:
            setattr(dist, name, counting(name))
        try:
            model.denoise(canvas, cache, self_conditioning_logits=first)
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
    return seen


def test_two_ranks_give_the_logits_of_one(tmp_path):
    """TP 2 (experts split by width), EP 2 (experts split by id), the fast path, and int8 weights sliced as
    stored: rank 0's logits equal the unsharded model's within float32 rounding, on both caches."""
    import torch.multiprocessing as mp

    out = tmp_path / "logits.pt"
    mp.spawn(sharded_worker, args=(2, free_port(), str(out)), nprocs=2)
    got = torch.load(out)
    # one step: 3 all-reduces of [tokens, hidden] per layer + the self-conditioning MLP's, one broadcast of
    # the soft embeddings, the logits gathered a chunk of positions at a time (7 chunks of 4-5 positions)
    tokens, hidden, layers = 2 * 16, 64, 4
    assert got["collectives"]["all_reduce"] == [tokens * hidden] * (3 * layers + 1)
    assert got["collectives"]["broadcast"] == [tokens * hidden]
    assert sum(got["collectives"]["gather"]) == tokens * 384 // 2 and len(got["collectives"]["gather"]) == 7
    for name, ep, fast, quant in CASES:
        model, _ = build(fast, quant)
        if fast:
            from letterpress.model.fast import apply_fast_path

            apply_fast_path(model)
        for paged in (False, True):
            want = run_model(model, paged)
            for step in ("first", "second"):
                torch.testing.assert_close(got[(name, paged)][step], want[step], rtol=1e-5, atol=1e-4,
                                           msg=lambda m: f"{name} paged={paged} {step}: {m}")


def test_each_rank_holds_half_the_sharded_weights_and_kv():
    """Everything but the replicated parts (embedding, norms, router, layer scalars) halves exactly; the
    KV pools halve where the KV heads divide and are replicated where there are fewer KV heads than ranks."""
    full = random_model(0, num_global_key_value_heads=2)
    replicated = sum(p.numel() * p.element_size() for n, p in full.named_parameters()
                     if "embed" in n or "norm" in n or "router" in n)
    replicated += sum(b.numel() * b.element_size() for b in full.buffers())  # layer scalars, RoPE frequencies
    kinds = {"sliding_attention": 6, "full_attention": 6}
    pool = full.new_paged_cache(2, 64, block_size=4, num_blocks=kinds).pool_bytes()
    for rank in (0, 1):
        model = shard_model(random_model(0, num_global_key_value_heads=2), Shard(rank, 2))
        assert model_bytes(model) - replicated == (model_bytes(full) - replicated) // 2
        assert model.new_paged_cache(2, 64, block_size=4, num_blocks=kinds).pool_bytes() * 2 == pool
    # one KV head on the full layers: each rank keeps it (vLLM's KV head replication), sliding ones halve
    one = random_model(0)
    sharded = shard_model(random_model(0), Shard(1, 2))
    assert [s.num_kv_heads for s in sharded.text_config.layers] == [1, 1, 1, 1]
    assert [s.num_kv_heads for s in one.text_config.layers] == [2, 1, 2, 1]


def test_quantized_slices_are_the_slices_of_the_quantized_weight():
    """Sharding a model quantized as stored (int8, fp8, int4) keeps exactly the matching rows / columns /
    experts of each packed weight; a cut inside an int4 group is refused with a message."""
    for fmt in ("int8", "fp8", "int4"):
        full = quantize_model(random_model(0), fmt)
        if fmt == "int4":  # o_proj's 64 inputs form one group of 64: a cut at 32 splits it
            with pytest.raises(NotSupportedError, match="groups are 64 wide; load a float checkpoint"):
                shard_model(quantize_model(random_model(0), fmt), Shard(1, 2))
            continue
        for ep in (False, True):
            model = shard_model(quantize_model(random_model(0), fmt), Shard(1, 2, ep))
            layer, ref = model.layers[0], full.layers[0]
            assert isinstance(layer.self_attn.q_proj, QuantLinear)
            w = ref.self_attn.q_proj.qweight.dequantize()
            torch.testing.assert_close(layer.self_attn.q_proj.qweight.dequantize(), w[w.shape[0] // 2:], rtol=0, atol=0)
            w = ref.mlp.down_proj.qweight.dequantize()
            torch.testing.assert_close(layer.mlp.down_proj.linear.qweight.dequantize(), w[:, w.shape[1] // 2:],
                                       rtol=0, atol=0)
            inner, ref_experts = layer.experts.inner, ref.experts
            assert isinstance(inner, QuantExperts)
            down = ref_experts.down.dequantize()
            want = down[4:] if ep else down[:, :, 16:]
            torch.testing.assert_close(inner.down.dequantize(), want, rtol=0, atol=0)


def test_refuses_what_does_not_split():
    from letterpress.parallel import ParallelConfig, check_shardable

    text = random_model(0).text_config
    with pytest.raises(NotSupportedError, match="does not divide the attention heads"):
        check_shardable(text, ParallelConfig(3))
    with pytest.raises(NotSupportedError, match="does not divide the experts"):
        check_shardable(random_model(0, num_experts=6, top_k_experts=2).text_config, ParallelConfig(4, True))
    with pytest.raises(ConfigError, match="positive integer"):
        ParallelConfig(0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("tp") / "model", seed=0, canvas=16, qk_scale=QK)


def test_seeded_requests_give_the_same_tokens_with_two_processes(tmp_path):
    """The engine end to end (paged cache with sliding blocks given back, prefix cache, self-conditioning,
    3 canvases per row, an image whose features rank 0's vision tower computes): rank 0 spawns rank 1,
    experts split by id; the seeded tokens equal one process's."""
    pytest.importorskip("transformers")
    from PIL import Image

    from letterpress import LLM
    from letterpress.engine.request import SamplingParams

    from .vision_fixtures import build_vision_checkpoint, png_bytes

    folder = build_vision_checkpoint(tmp_path / "vision")
    prompts = [[2] + list(range(5, 22)), [2, 30, 31, 32]]
    picture = Image.open(io.BytesIO(png_bytes(60, 40, 1)))
    chat = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "what?"}]}]
    params = SamplingParams(max_new_tokens=20, seed=3, max_denoising_steps=8)

    def run(llm):
        return [o.token_ids for o in llm.generate(prompts, params)] + [llm.chat(chat, params)[0].token_ids]

    kwargs = dict(max_num_seqs=2, max_model_len=256, block_size=4)
    want = run(LLM(folder, **kwargs))
    llm = LLM(folder, tensor_parallel_size=2, enable_expert_parallel=True, **kwargs)
    try:
        assert [s.num_kv_heads for s in llm.model.text_config.layers] == [1, 1, 1, 1]
        assert run(llm) == want
        assert llm.generate([prompts[0]], params)[0].token_ids == want[0]  # again, its prefix now cached
    finally:
        llm.close()
    assert not torch.distributed.is_initialized()


def test_compile_and_tensor_parallel_are_refused_before_starting(checkpoint):
    from letterpress import LLM

    with pytest.raises(ConfigError, match="--compile is not supported with --tensor-parallel-size"):
        LLM(str(checkpoint), tensor_parallel_size=2, compile=True)
    with pytest.raises(NotSupportedError, match="--tensor-parallel-size 3 does not divide"):
        LLM(str(checkpoint), tensor_parallel_size=3)


def worker_pids(pid: int) -> list[int]:
    """The spawned ranks among a process's children (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from /proc")
def test_a_dead_worker_takes_the_server_down():
    """`letterpress serve --tensor-parallel-size 2` (the shipped default model): a request is answered, then
    rank 1 is killed; the command exits non-zero with a message naming the worker, instead of hanging."""
    import httpx

    from .live_server import wait_healthy

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "letterpress.cli", "serve", "--tensor-parallel-size", "2",
                             "--port", str(port), "--max-model-len", "512", "--max-denoising-steps", "2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        answer = httpx.post(url + "/v1/completions", json={"prompt": "def f(x):", "max_tokens": 8, "seed": 0},
                            timeout=120)
        assert answer.status_code == 200, answer.text
        (worker,) = worker_pids(proc.pid)
        os.kill(worker, signal.SIGKILL)
        start = time.monotonic()
        code = proc.wait(timeout=60)
        output = proc.stdout.read()
        assert code != 0
        assert f"tensor-parallel worker rank 1 (pid {worker}) exited with code -9" in output, output[-2000:]
        assert time.monotonic() - start < 60
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("ep", [False, True])
def test_each_rank_reads_only_its_slices_of_the_checkpoint(checkpoint, ep):
    """`read_slices` (meta model cut first, then only the kept ranges read from safetensors) gives exactly the
    tensors of loading the whole model and cutting it; `--quantization` then quantizes those slices."""
    from letterpress.model import DiffusionGemma
    from letterpress.parallel.runtime import LoadSpec, load_shard, read_slices

    for rank in (0, 1):
        got = read_slices(checkpoint, "float32", Shard(rank, 2, ep))
        want = shard_model(DiffusionGemma.from_pretrained(checkpoint), Shard(rank, 2, ep))
        assert got.text_config == want.text_config
        want_tensors = dict(want.state_dict())
        for name, tensor in got.state_dict().items():
            assert torch.equal(tensor, want_tensors.pop(name)), name
        assert not want_tensors
    quantized = load_shard(LoadSpec(str(checkpoint), quantization="int8"), Shard(1, 2, ep))
    want = quantize_model(shard_model(DiffusionGemma.from_pretrained(checkpoint), Shard(1, 2, ep)), "int8")
    assert quantized.quantization == "int8"
    for (name, a), (_, b) in zip(quantized.state_dict().items(), want.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
