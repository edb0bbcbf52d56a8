"""Tensor and expert parallel serving (letterpress.parallel) on CPU with gloo and 2 processes: the sharded
model's logits equal one process's, the sampler over vocabulary slices gives one process's draws at about
half the memory per rank, a seeded request gives the same tokens, each rank holds about half the weights and
KV cache, and a dead worker takes the server down."""

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
from letterpress.parallel import Shard, shard_model
from letterpress.parallel.sampler import noise_columns
from letterpress.parallel.vocab import key_index, key_value, order_key
from letterpress.sampling import GeneratorDraws
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
    chunks.CHUNK_BYTES = 4 * 384 * 5  # the LM head and the soft embeddings: 5 positions at a time
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for name, ep, fast, quant in CASES:
        model, switch = build(fast, quant)
        shard_model(model, Shard(rank, world, ep))
        if switch:
            switch(model)
        for paged in (False, True):
            # each rank's logits are its vocabulary slice (the self-conditioned step reads them as they are)
            results[(name, paged)] = {k: whole(v, world) for k, v in run_model(model, paged).items()}
    results["collectives"] = count_collectives(rank, world)
    results["sampler"] = run_sampler(rank, world)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """One 2-process gloo run (sharded_worker) for the logits and the sampler tests: rank 0's results."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("two_ranks") / "results.pt"
    mp.spawn(sharded_worker, args=(2, free_port(), str(out)), nprocs=2)
    return torch.load(out, weights_only=False)


def whole(local: torch.Tensor, world: int, vocab: int = 384) -> torch.Tensor:
    """The vocabulary slices of every rank, side by side (the test's own gather; slices padded to
    ceil(vocab / world))."""
    import torch.distributed as dist

    size = -(-vocab // world)
    padded = torch.zeros(*local.shape[:-1], size, dtype=local.dtype)
    padded[..., : local.shape[-1]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat(parts, dim=-1)[..., :vocab]


def count_collectives(rank: int, world: int) -> dict[str, list[int]]:
    """Elements moved by each kind of collective in one self-conditioned denoise step (what
    benchmarks/parallel.py counts at the released shapes)."""
    import torch.distributed as dist

    model = shard_model(random_model(0, qk_scale=QK), Shard(rank, world))
    ids, lengths, canvas = inputs()
    seen: dict[str, list[int]] = {"all_reduce": [], "broadcast": [], "gather": [], "all_gather": []}
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


def test_two_ranks_give_the_logits_of_one(two_ranks):
    """TP 2 (experts split by width), EP 2 (experts split by id), the fast path, and int8 weights sliced as
    stored: the ranks' logits side by side equal the unsharded model's within float32 rounding, on both
    caches (the second step self-conditioned on the first's slices)."""
    got = two_ranks
    # one self-conditioned step: the soft embeddings (the previous logits' max and sum of exponentials over
    # the whole vocabulary, [tokens] each, then the partial products [tokens, hidden]), the embedding lookup,
    # the self-conditioning MLP and 3 per layer; nothing of vocabulary size moves
    tokens, hidden, layers = 2 * 16, 64, 4
    assert got["collectives"]["all_reduce"] == [tokens, tokens] + [tokens * hidden] * (3 * layers + 3)
    assert got["collectives"]["broadcast"] == got["collectives"]["gather"] == got["collectives"]["all_gather"] == []
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
    """Everything but the replicated parts (norms, router, layer scalars) halves exactly, the embedding (and
    so the tied LM head) included; the KV pools halve where the KV heads divide and are replicated where
    there are fewer KV heads than ranks."""
    full = random_model(0, num_global_key_value_heads=2)
    replicated = sum(p.numel() * p.element_size() for n, p in full.named_parameters()
                     if "norm" in n or "router" in n)
    replicated += sum(b.numel() * b.element_size() for b in full.buffers())  # layer scalars, RoPE frequencies
    kinds = {"sliding_attention": 6, "full_attention": 6}
    pool = full.new_paged_cache(2, 64, block_size=4, num_blocks=kinds).pool_bytes()
    for rank in (0, 1):
        model = shard_model(random_model(0, num_global_key_value_heads=2), Shard(rank, 2))
        assert model_bytes(model) - replicated == (model_bytes(full) - replicated) // 2
        assert model.embed_tokens.weight.shape == (192, 64)
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


# ------------------------------------------------------------------------------------- the sampler
VOCAB, CANVAS, ROWS = 501, 24, 4  # 501: the ranks' slices differ (251 and 250 tokens)
SAMPLER_CHUNK = 4 * 4 * VOCAB  # 4 positions per chunk, as 32 of 256 at the released vocabulary


class Replay(GeneratorDraws):
    """Overrides `proposals` alone (as a test's replay does): rank 0 gets the row's whole probabilities."""

    def proposals(self, probs, canvas, step):
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def sampler_inputs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(ROWS, CANVAS, VOCAB, generator=g) * torch.linspace(0.5, 25, CANVAS)[None, :, None]
    clamp_mask = torch.zeros(ROWS, CANVAS, dtype=torch.bool)
    clamp_mask[2, :5] = True
    return dict(logits=logits, temperatures=torch.tensor([0.8, 0.55, 0.41, 1.0]),
                entropy_bounds=torch.tensor([0.1, 1.0, 5.0, 0.5]), canvas_index=[0, 2, 1, 0], step_index=[0, 7, 3, 1],
                greedy=[False, True, False, False], clamp_tokens=torch.full((ROWS, CANVAS), 9), clamp_mask=clamp_mask,
                top_k=[0, 0, 7, 0])


def sampler_draws():
    return [GeneratorDraws(1), GeneratorDraws(2), GeneratorDraws(3), Replay(4)]


def memory_draws():  # the engine's usual rows: nothing gathered to rank 0
    return [GeneratorDraws(1), GeneratorDraws(2), GeneratorDraws(3), GeneratorDraws(4)]


def run_sampler(rank: int, world: int) -> dict:
    """Each rank runs the sampler step on its slice of the same logits (plain and fused), rank 0 finishes it."""
    import torch.distributed as dist

    from letterpress.parallel.sampler import finish_step, plan_step, sample_slice, worker_generators
    from letterpress.parallel.vocab import vocab_range
    from letterpress.profiling import AllocationPeak

    v0, v1 = vocab_range(VOCAB, rank, world)
    results = {}
    for keep_probs, gathers in [(False, True), (True, True), (False, False), (True, False)]:
        inp = sampler_inputs()
        draws = sampler_draws() if gathers else memory_draws()
        plan, generators = plan_step(inp["temperatures"], draws, inp["greedy"], inp["top_k"], [0] if gathers else [],
                                     keep_probs, torch.float32)
        box = [plan]
        dist.broadcast_object_list(box, src=0)  # what the driver's channel does
        generators = generators if rank == 0 else worker_generators(box[0], torch.device("cpu"))
        x = inp["logits"][..., v0:v1].clone()
        with AllocationPeak() as peak:
            local = sample_slice(x, box[0], (v0, v1, VOCAB), None, generators, chunk_bytes=SAMPLER_CHUNK)
        state = whole(local.state, world, VOCAB)
        if rank:
            continue
        outcome = finish_step(local, plan, inp["entropy_bounds"], draws, inp["canvas_index"], inp["step_index"],
                              inp["greedy"], inp["clamp_tokens"], inp["clamp_mask"])
        results[keep_probs, gathers] = {"outcome": outcome.__dict__, "state": state, "log_probs": local.log_probs.get(0),
                               "generators": [d.generator.get_state() for d in draws],
                               "bytes": peak.peak + x.numel() * 4}
    return results


def test_the_sampler_over_two_slices_is_the_sampler_over_the_vocabulary(two_ranks):
    """The vocabulary-parallel sampler step (letterpress.parallel.sampler) on 2 ranks whose slices differ in
    size, against one process's `denoise_step` / `fused_denoise_step` on the whole logits: a sampled row, a
    greedy one, a top_k row with clamps, a row whose Draws override `proposals` (probabilities gathered), a
    row's log-probabilities gathered (structured output). Argmax, acceptance, proposals and the re-noised
    canvas are equal; each row's generator ends in the same state (the same noise was drawn); entropies and
    probabilities agree within float32 rounding; each rank's sampler pass (its logits slice and what the
    pass allocates) holds at most about half of one process's."""
    from letterpress.fast_sampling import fused_denoise_step
    from letterpress.profiling import AllocationPeak
    from letterpress.sampling import denoise_step

    got = two_ranks["sampler"]
    for (keep_probs, gathers), result in got.items():
        inp = sampler_inputs()
        draws = sampler_draws() if gathers else memory_draws()
        logits = inp.pop("logits")
        log_probs = torch.log_softmax(logits[0] / inp["temperatures"][0], dim=-1)
        with AllocationPeak() as peak:
            if keep_probs:
                want = fused_denoise_step(logits, draws=draws, keep_processed=False, chunk_bytes=SAMPLER_CHUNK, **inp)
            else:
                want = denoise_step(logits, draws=draws, in_place=True, chunk_bytes=SAMPLER_CHUNK, **inp)
        one_process = peak.peak + logits.numel() * 4
        outcome = result["outcome"]
        for name in ("next_canvas", "argmax", "accept_mask"):
            assert torch.equal(outcome[name], getattr(want, name)), (keep_probs, gathers, name)
        torch.testing.assert_close(outcome["mean_entropy"], want.mean_entropy, rtol=1e-5, atol=1e-6)
        for a, d in zip(result["generators"], draws):
            assert torch.equal(a, d.generator.get_state())
        if keep_probs:
            torch.testing.assert_close(result["state"], want.sc_probs, rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(result["state"], want.processed_logits)  # x / T, top_k's -inf: elementwise
        if gathers:
            torch.testing.assert_close(result["log_probs"], log_probs, rtol=1e-5, atol=1e-5)
        else:  # rows gathered to rank 0 cost what one process holds for them: measured without
            assert result["bytes"] <= 0.55 * one_process, (keep_probs, result["bytes"], one_process)


def test_order_keys_reduce_to_torch_argmax():
    """`order_key`: the int64 max of the keys is torch.argmax's (the largest value, its first index), for
    negative values, ties, -0.0 against 0.0, and nan; the value comes back exactly."""
    values = torch.tensor([[-3.5, -1.0, -1.0, -7.0], [0.0, -0.0, -2.0, 0.0], [1e-30, 2.5, float("nan"), 2.5],
                           [-0.0, 0.0, -1e-38, -5.0]])
    index = torch.arange(4).expand(4, 4)
    keys = order_key(values, index).amax(-1)
    assert key_index(keys).tolist() == values.argmax(-1).tolist()
    best = values.gather(1, values.argmax(-1, keepdim=True)).squeeze(1)
    assert torch.equal(key_value(keys)[[0, 3]], best[[0, 3]]) and key_value(keys)[2].isnan()


def test_each_rank_draws_the_single_process_noise_in_chunks():
    """On the CPU, drawing a row's [C, V] exponential noise a chunk of positions at a time gives the numbers
    of one call and leaves the generator in the same state, so a rank keeps its columns of the single
    process's noise without holding [C, V]."""
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    whole_noise = torch.empty(CANVAS, VOCAB).exponential_(1.0, generator=a)
    got = torch.empty(CANVAS, 250)
    for s, q in noise_columns(b, CANVAS, VOCAB, 251, 501, "cpu", chunk_bytes=5 * 4 * VOCAB):
        assert q.shape[0] <= 5
        got[s] = q
    assert torch.equal(got, whole_noise[:, 251:]) and torch.equal(a.get_state(), b.get_state())


def test_a_worker_keeps_each_rows_state_until_the_runner_moves_on():
    """`RowStates` (a worker's slices of the rows' self-conditioning state): a denoise reads the state made at
    step - 1 (a view when the rows are the last step's batch, else stacked, zeros for a row without one); a
    sample files the new one beside it, so that a retried step reads the old one again; a row that starts a
    new canvas (no key) drops its slot's states."""
    from letterpress.parallel.runtime import RowStates

    states = RowStates()
    first = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    states.file([(5, 0, 0), (6, 0, 0)], first)  # slots 5 and 6, canvas 0, made at step 0
    view = states.take([5, 6], [(0, 0), (0, 0)])
    assert torch.equal(view, first) and view.data_ptr() == first.data_ptr()
    second = -first
    states.file([(5, 0, 1), (6, 0, 1)], second)
    retried = states.take([6], [(0, 0)])  # the runner retried slot 6's step 1: the step-0 state again
    assert torch.equal(retried, first[1:])
    assert torch.equal(states.take([5], [(0, 1)]), second[:1])
    mixed = states.take([6, 5], [(0, 0), None])  # slot 5 starts a new canvas
    assert torch.equal(mixed, torch.stack([first[1], torch.zeros(3, 4)]))
    assert 5 not in states.by_slot and list(states.by_slot[6]) == [(0, 0)]


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


def test_fast_path_top_k_and_structured_rows_give_the_same_tokens_with_two_processes(tmp_path):
    """`--impl fast` (each rank keeps its slice of the rows' softmax as the self-conditioning state), a
    seeded row, a top_k row, a greedy row and a structured-output row (its log-probabilities gathered to rank
    0 for the automaton) in one batch, over an odd vocabulary split unevenly (2 x 2049 - 1): the tokens of
    one process. Tensor parallel by width."""
    import shutil

    from letterpress import LLM
    from letterpress.embedded import default_model_dir
    from letterpress.engine.request import SamplingParams
    from letterpress.structured import StructuredOutputsParams

    folder = save_checkpoint(tmp_path / "model", seed=0, canvas=16, qk_scale=QK, vocab_size=4097)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir() / name, folder / name)
    base = dict(max_new_tokens=24, max_denoising_steps=6)
    params = [SamplingParams(seed=5, **base), SamplingParams(seed=6, top_k=4, **base),
              SamplingParams(seed=7, greedy=True, **base),
              SamplingParams(seed=8, structured_outputs=StructuredOutputsParams(regex=r"[a-z]{3,12} [0-9]{2}"), **base)]
    prompts = [[2, 40, 41], [2] + list(range(50, 70)), [2, 7], [2, 99, 100]]
    kwargs = dict(max_num_seqs=4, max_model_len=256, impl="fast")
    want = [o.token_ids for o in LLM(folder, **kwargs).generate(prompts, params)]
    llm = LLM(folder, tensor_parallel_size=2, **kwargs)
    try:
        outs = llm.generate(prompts, params)
        assert [o.token_ids for o in outs] == want
        assert outs[3].finish_reason == "stop"
    finally:
        llm.close()


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
