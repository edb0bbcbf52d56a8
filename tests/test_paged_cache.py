"""The paged KV cache (letterpress.cache.PagedKVCache): memory held by a row many windows long, equality
with the contiguous cache (itself checked against transformers in test_parity), admission under pool
pressure, and sizing. Parity against transformers for paged rows longer than the window is in test_parity."""

from __future__ import annotations

import math
import time

import pytest
import torch

from letterpress import LLM, SamplingParams
from letterpress.cache import blocks_for_row, layer_kinds, parse_bytes, plan_pool
from letterpress.config import model_config_from_dict
from letterpress.errors import ConfigError, RequestError
from letterpress.model.fast import apply_fast_path, apply_plain_path
from letterpress.quant import GEMMA4_26B_A4B_TEXT

from .fast_fixtures import random_model, save_checkpoint

WINDOW = 8  # the fixtures' sliding window
BLOCK = 4


def encode_in_chunks(model, cache, lengths: list[int], chunk: int, seed: int = 0) -> None:
    """Encode rows 0..B-1 of the given lengths, `chunk` tokens per call, as the runner does."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.text_config.vocab_size, (len(lengths), max(lengths)), generator=g)
    for start in range(0, max(lengths), chunk):
        rows = [i for i, n in enumerate(lengths) if n > start]
        n = torch.tensor([min(chunk, lengths[i] - start) for i in rows])
        model.encode(ids[rows, start:start + chunk], cache, torch.tensor(rows), n)


@torch.no_grad()
def test_long_row_holds_only_the_window_on_sliding_layers():
    """A row 60 windows long: full layers hold every position, sliding layers a window's worth of blocks."""
    model = random_model()
    length, chunk = 480, 32
    cache = model.new_paged_cache(1, 512, block_size=BLOCK, prefill_chunk=chunk)
    encode_in_chunks(model, cache, [length], chunk)
    full, sliding = sorted(cache.kinds, key=lambda k: k.window is not None)
    assert full.window is None and sliding.window == WINDOW
    assert cache.pools[full.name].num_held == length // BLOCK
    window_blocks = math.ceil((WINDOW - 1) / BLOCK) + 1
    assert cache.pools[sliding.name].num_held <= window_blocks
    beyond_full = cache.used_bytes() - length * full.bytes_per_token(torch.float32)
    assert 0 < beyond_full <= window_blocks * BLOCK * sliding.bytes_per_token(torch.float32)
    # the contiguous cache of the same row keeps every position of every layer
    every = sum(k.bytes_per_token(torch.float32) for k in cache.kinds) * length
    assert cache.used_bytes() < 0.6 * every
    # and the pool allocated for one row of 512 tokens: every block on full layers, the window and one
    # chunk on sliding ones
    sliding_blocks = math.ceil((WINDOW - 1 + chunk) / BLOCK) + 1
    assert cache.pool_bytes() == (512 * full.bytes_per_token(torch.float32)
                                  + sliding_blocks * BLOCK * sliding.bytes_per_token(torch.float32))
    assert sum(t.numel() * t.element_size() for t in cache.keys + cache.values) == (
        cache.pool_bytes() + sum(cache.block_bytes(k) for k in cache.kinds))  # + the null blocks


def test_released_shapes_bytes_per_token():
    """At the released shapes (bf16), a token beyond the window costs only the full layers: <= 21 KiB; a
    256K-token row needs ~5.5 GB (the encoder chunk's sliding blocks included), not 59."""
    config = model_config_from_dict({"model_type": "diffusion_gemma", "canvas_length": 256,
                                     "text_config": {"model_type": "diffusion_gemma_text", **GEMMA4_26B_A4B_TEXT}})
    kinds = {k.window is None: k for k in layer_kinds(config.text)}
    assert len(kinds[True].layers) == 5 and len(kinds[False].layers) == 25
    assert kinds[True].bytes_per_token(torch.bfloat16) == 20 * 1024
    row = 262_144
    total = sum(blocks_for_row(k, row, 16, 512) * 16 * k.bytes_per_token(torch.bfloat16) for k in kinds.values())
    assert 5.3e9 < total < 5.8e9


@torch.no_grad()
@pytest.mark.parametrize("fast", [False, True])
def test_paged_equals_contiguous_for_rows_many_windows_long(fast):
    """Rows of different lengths, several windows long, encoded in chunks: the paged cache (blocks recycled
    on sliding layers, rows not in slot order) gives the contiguous cache's logits, plain and fast path."""
    model = random_model(qk_scale=0.3)
    lengths, chunk = [150, 37, 96], 24
    paged = model.new_paged_cache(3, 256, block_size=BLOCK, prefill_chunk=chunk)
    contiguous = model.new_cache(3, 256)
    for cache in (paged, contiguous):
        encode_in_chunks(model, cache, lengths, chunk)
    canvas = torch.randint(0, 384, (3, 16), generator=torch.Generator().manual_seed(1))
    slots = torch.tensor([2, 0, 1])
    if fast:
        apply_fast_path(model)
    try:
        expected = model.denoise(canvas, contiguous, slots)
        got = model.denoise(canvas, paged, slots)
        expected_sc = model.denoise(canvas, contiguous, slots, expected / 0.7, torch.tensor([True, False, True]))
        got_sc = model.denoise(canvas, paged, slots, expected / 0.7, torch.tensor([True, False, True]))
    finally:
        apply_plain_path(model)
    assert expected.abs().max() > 1.0
    # the contiguous cache is read from position 0 under a mask, the paged one from the window's start: the
    # same keys, summed in another order (~1e-5 apart)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_sc, expected_sc, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------- admission
PROMPTS = [list(range(3, 3 + n)) for n in (19, 9, 4, 13)]
PARAMS = [SamplingParams(max_new_tokens=40, seed=s, max_denoising_steps=6, eos_token_ids=[1, 7, 11]) for s in range(4)]


@pytest.fixture(scope="module")
def calm(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("calm"), qk_scale=0.3)


def run_counting_rows(llm: LLM, prompts, params) -> tuple[list, int]:
    """`LLM.generate`, stepping the scheduler by hand to record the most rows that ran at once."""
    requests = [llm.make_request(p, sp) for p, sp in zip(prompts, params)]
    for r in requests:
        llm.scheduler.add(r)
    outs, most = {}, 0
    while llm.scheduler.has_work():
        for out in llm.scheduler.step():
            outs[out.request_id] = out
        most = max(most, llm.scheduler.num_running)
    return [outs[r.request_id] for r in requests], most


@torch.no_grad()
def test_pool_pressure_rows_wait_and_outputs_equal_running_alone(calm):
    """A pool with room for one worst-case row at a time on the full layers: the four requests wait their
    turn (never more than the pool holds), and each gets the tokens it gets when run alone with its seed,
    with prefix caching (on by default) sharing and evicting blocks under that pressure."""
    alone = [LLM(calm, max_num_seqs=1, max_model_len=128, block_size=BLOCK).generate(p, sp)[0].token_ids
             for p, sp in zip(PROMPTS, PARAMS)]
    # 4 KiB blocks (2 KiB per kind): a row of 19 + 3 x 16 tokens reserves 17 full blocks; the pool has 33
    llm = LLM(calm, max_num_seqs=4, max_model_len=128, block_size=BLOCK, prefill_chunk=8, kv_cache_memory=100_000)
    full = next(k.name for k in llm.runner.cache.kinds if k.window is None)
    assert llm.runner.cache.pools[full].num_blocks == 33
    outs, most = run_counting_rows(llm, PROMPTS, PARAMS)
    assert [o.token_ids for o in outs] == alone
    assert most == 2  # the two short prompts (9 + 48 and 4 + 48 tokens: 15 and 13 blocks) fit together
    assert any(o.num_cached_tokens for o in outs)  # the prompts share prefixes: later rows reuse blocks
    for pool in llm.runner.cache.pools.values():  # everything given back
        assert pool.reserved == pool.promised == pool.num_held == 0


def test_request_that_cannot_fit_is_refused(calm):
    """The pool always holds one row of max_model_len (else the LLM refuses to start, test_pool_sizing), so a
    request that cannot fit is one beyond max_model_len: refused before it queues; the others still run."""
    llm = LLM(calm, max_num_seqs=2, max_model_len=128, block_size=BLOCK, prefill_chunk=8, kv_cache_memory=80_000)
    with pytest.raises(RequestError, match="max_model_len"):
        llm.generate(list(range(3, 120)), SamplingParams(max_new_tokens=16))
    assert llm.generate(PROMPTS[0], PARAMS[0])[0].token_ids


def test_cli_refuses_a_pool_too_small_for_one_row(capsys):
    from letterpress.cli import main

    assert main(["generate", "def f(x):", "--max-new-tokens", "4", "--kv-cache-memory", "1KiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kv-cache-memory" in err[0]


def test_pool_sizing(calm):
    with pytest.raises(ConfigError, match="cannot hold one row"):
        LLM(calm, max_num_seqs=2, max_model_len=128, block_size=BLOCK, kv_cache_memory="1KiB")
    with pytest.raises(ConfigError, match="kv-cache-memory"):
        LLM(calm, max_num_seqs=2, max_model_len=128, gpu_memory_utilization=0.5)  # CPU
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("4096") == 4096
    with pytest.raises(ConfigError):
        parse_bytes("two gigs")
    # the default pool holds max_num_seqs rows of max_model_len tokens, sliding layers only their window
    kinds = layer_kinds(random_model().text_config)
    plan = plan_pool(kinds, torch.float32, BLOCK, 8, 1024, 64)
    assert plan == {k.name: 8 * (1024 // BLOCK if k.window is None else math.ceil((WINDOW - 1 + 64) / BLOCK) + 1)
                    for k in kinds}


# ------------------------------------------------------------------------------------------ prefix cache
def _denoise_after(model, cache, slot: int, prompt: list[int], chunk: int, canvas: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Admit `prompt` into `slot`, encode what the prefix cache did not have, denoise one canvas."""
    cached = cache.admit(slot, prompt, len(prompt) + canvas.shape[1])
    assert cached is not None
    rest = prompt[cached:]
    for start in range(0, len(rest), chunk):
        part = torch.tensor(rest[start:start + chunk])[None]
        model.encode(part, cache, torch.tensor([slot]))
    return cached, model.denoise(canvas, cache, torch.tensor([slot]))


@torch.no_grad()
@pytest.mark.parametrize("fast", [False, True])
def test_prefix_hit_changes_no_logits(fast):
    """A second prompt sharing 45 tokens with a finished one reuses 11 blocks (44 tokens): the full layers'
    blocks, and on the sliding layers the blocks the window still sees, which the first row had already
    given back (cached, unreferenced, evictable). The logits equal (float32, 1e-4) those of a cache without
    prefix caching that saw the same two prompts."""
    model = random_model(qk_scale=0.3)
    if fast:
        apply_fast_path(model)
    g = torch.Generator().manual_seed(4)
    first = torch.randint(3, 384, (60,), generator=g).tolist()
    second = first[:45] + torch.randint(3, 384, (20,), generator=g).tolist()
    canvas = torch.randint(0, 384, (1, 16), generator=g)
    try:
        shared = model.new_paged_cache(2, 128, block_size=BLOCK, prefill_chunk=16)
        assert _denoise_after(model, shared, 0, first, 16, canvas)[0] == 0
        shared.free(0)
        sliding = next(k.name for k in shared.kinds if k.window is not None)
        # the sliding pool (7 blocks a row) is smaller than the 15 blocks the row wrote: the oldest cached
        # ones were evicted (least recently freed first) to make room; all are unreferenced now
        pool = shared.pools[sliding]
        assert len(pool.evictable) == pool.num_blocks == 14
        hashes = shared.hashes_of(first, 60)
        assert hashes[0] not in pool.cached and hashes[14] in pool.cached
        cached, got = _denoise_after(model, shared, 1, second, 16, canvas)
        plain = model.new_paged_cache(2, 128, block_size=BLOCK, prefill_chunk=16, enable_prefix_caching=False)
        assert _denoise_after(model, plain, 0, first, 16, canvas)[0] == 0
        plain.free(0)
        uncached, expected = _denoise_after(model, plain, 1, second, 16, canvas)
    finally:
        apply_plain_path(model)
    assert (cached, uncached) == (44, 0)
    # Not bit for bit: without the hit, positions 44..47 are encoded in another chunk (32..47) than with it
    # (44..59), and a matmul of another shape rounds differently (~1e-5 here); the parity tolerance holds.
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_prefix_hit_needs_the_sliding_window_blocks():
    """Full-layer blocks alone are no hit: once the sliding blocks the window needs have been evicted, the hit
    falls back to a shorter prefix whose window blocks are still cached (or none)."""
    model = random_model()
    cache = model.new_paged_cache(2, 128, block_size=BLOCK, prefill_chunk=16)
    prompt = list(range(3, 43))  # 40 tokens: 10 blocks
    _denoise_after(model, cache, 0, prompt, 16, torch.zeros(1, 16, dtype=torch.long))
    cache.free(0)
    sliding = next(k.name for k in cache.kinds if k.window is not None)
    pool = cache.pools[sliding]
    hashes = cache.hashes_of(prompt, 40)
    for j in (7, 8):  # evict the sliding blocks of positions 28..35
        block = pool.cached.pop(hashes[j])
        del pool.hash_of[block], pool.evictable[block]
        pool.free.append(block)
    # 9 blocks (36 tokens) would need sliding blocks 7, 8 (positions 29..35); 7 blocks (28 tokens) need 5, 6
    assert cache.admit(1, prompt + [5], 64) == 28


@torch.no_grad()
def test_admission_counts_shared_prefix_blocks_once():
    """A full pool of 20 blocks, one worst-case row (41 + 16 tokens: 15 blocks) and a few more: a second row
    sharing the first's 10-block prompt is admitted by the 5 blocks it will allocate, not its whole 15 (15 +
    15 > 20 waited before); both rows then fill their worst case, the pool exactly full, and neither row's
    logits change. A third row that cannot be promised its blocks waits until they are given back."""
    model = random_model(qk_scale=0.3)
    kinds = layer_kinds(model.text_config)
    full = next(k.name for k in kinds if k.window is None)
    sliding = next(k.name for k in kinds if k.window is not None)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, 384, (40,), generator=g).tolist()
    a, b, c = prompt + [7], prompt + [9], torch.randint(3, 384, (41,), generator=g).tolist()
    canvas = torch.randint(0, 384, (1, 16), generator=g)
    committed = torch.randint(3, 384, (1, 16), generator=g)
    cache = model.new_paged_cache(3, 128, block_size=BLOCK, prefill_chunk=16, num_blocks={full: 20, sliding: 21})
    assert cache.blocks_needed(len(a) + 16) == {full: 15, sliding: 7}

    assert _denoise_after(model, cache, 0, a, 16, canvas)[0] == 0
    cached = _denoise_after(model, cache, 1, b, 16, canvas)[0]
    assert cached == 40 and cache.pools[full].num_held == 12  # 11 blocks of row a, 1 more for row b
    assert cache.admit(2, c, len(c) + 16) is None  # 12 held + 8 promised + 15 > 20: waits
    for slot in (0, 1):  # each row commits a canvas: its worst case, the pool full, nothing refused
        model.encode(committed, cache, torch.tensor([slot]))
    assert cache.pools[full].num_held == 20 and cache.pools[full].promised == 0

    alone = {}
    for slot, tokens in ((0, a), (1, b)):
        own = model.new_paged_cache(1, 128, block_size=BLOCK, prefill_chunk=16, enable_prefix_caching=False)
        _denoise_after(model, own, 0, tokens, 16, canvas)
        model.encode(committed, own, torch.tensor([0]))
        alone[slot] = model.denoise(canvas, own, torch.tensor([0]))
    for slot in (0, 1):  # after both rows filled the pool: as alone (float32 parity tolerance, see above)
        torch.testing.assert_close(model.denoise(canvas, cache, torch.tensor([slot])), alone[slot], atol=1e-4, rtol=0)
    cache.free(0)
    cache.free(1)
    for pool in cache.pools.values():
        assert pool.num_held == pool.promised == pool.reserved == 0
    assert cache.admit(2, c, len(c) + 16) == 0


def test_engine_reports_cached_prompt_tokens_and_same_outputs(calm):
    """Through the engine: a follow-up prompt that extends the first conversation gets its shared blocks from
    the cache (RequestOutput.num_cached_tokens) and the same tokens as with prefix caching off."""
    first = list(range(3, 40))
    follow = first + list(range(50, 70))
    params = SamplingParams(max_new_tokens=32, seed=3, max_denoising_steps=6, eos_token_ids=[1])
    outs = {}
    for caching in (True, False):
        llm = LLM(calm, max_num_seqs=2, max_model_len=128, block_size=BLOCK, enable_prefix_caching=caching)
        a = llm.generate(first, params)[0]
        b = llm.generate(follow, params)[0]
        outs[caching] = (a, b)
    (a, b), (a_off, b_off) = outs[True], outs[False]
    assert (a.token_ids, b.token_ids) == (a_off.token_ids, b_off.token_ids)
    assert a.num_cached_tokens == 0 and b_off.num_cached_tokens == 0
    assert b.num_cached_tokens == 36  # 37 shared tokens, whole blocks of 4


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("uvicorn")
    from letterpress.server.app import ServerConfig

    from .live_server import KEY, MODEL, LiveServer

    live = LiveServer(LLM(None, max_num_seqs=2, max_model_len=256), ServerConfig(
        served_model_names=[MODEL], api_key=KEY, max_denoising_steps=3))
    yield live
    live.stop()


def test_server_usage_reports_cached_tokens(client):
    """usage.prompt_tokens_details.cached_tokens (OpenAI's field): 0 the first time, whole blocks of the
    prompt (never its last token) when the same prompt comes again; the text does not change."""
    from .live_server import MODEL

    prompt = list(range(100, 140))  # 40 tokens: 2 blocks of 16 can be reused
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, seed=0)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, seed=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 32
    assert again.choices[0].text == first.choices[0].text


def test_server_cached_tokens_count_each_prompt_once(client):
    """With n > 1 (or several prompts) the rows of one prompt share its cached blocks: cached_tokens counts them
    once per prompt, never more than the whole blocks of each prompt (it summed the rows, capped at the total)."""
    from .live_server import MODEL

    a, b = list(range(300, 339)), list(range(400, 439))  # 39 tokens each: 2 blocks of 16 can be reused
    for prompt in (a, b):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, seed=0)
    again = client.completions.create(model=MODEL, prompt=a, max_tokens=8, seed=0, n=2)
    assert again.usage.prompt_tokens_details.cached_tokens == 32
    both = client.completions.create(model=MODEL, prompt=[a, b], max_tokens=8, seed=0, n=2)
    assert both.usage.prompt_tokens_details.cached_tokens == 64


def test_metrics_report_kv_cache_usage_and_prefix_cache_hits(client, http):
    """/metrics carries vLLM's KV-cache figures under our prefix: prefix-cache queries and hits in prompt
    tokens, and the usage gauge (the fraction of the pools' bytes rows hold): above 0 while a row runs, 0
    once every row has left (its blocks stay cached, and count as free)."""
    from .live_server import MODEL

    def read() -> dict[str, float]:
        names = ("letterpress_kv_cache_usage_perc", "letterpress_prefix_cache_queries_total",
                 "letterpress_prefix_cache_hits_total")
        lines = http.get("/metrics").text.splitlines()
        return {n: float(next(line.split()[-1] for line in lines if line.startswith(n + " "))) for n in names}

    before = read()
    prompt = list(range(200, 250))  # 50 tokens: 3 blocks of 16 reusable the second time
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, seed=0)
    after = read()
    assert after["letterpress_prefix_cache_queries_total"] - before["letterpress_prefix_cache_queries_total"] == 100
    assert after["letterpress_prefix_cache_hits_total"] - before["letterpress_prefix_cache_hits_total"] == 48

    # three canvases of 64: the row still holds its blocks when the first one has been streamed
    stream = client.completions.create(model=MODEL, prompt=list(range(300, 350)), max_tokens=192, seed=0,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    running = read()["letterpress_kv_cache_usage_perc"]
    stream.close()
    assert 0 < running <= 1
    deadline = time.monotonic() + 60
    while read()["letterpress_kv_cache_usage_perc"] != 0:
        assert time.monotonic() < deadline, "the KV cache was not given back"
        time.sleep(0.1)


def test_weights_changed_in_place_do_not_reuse_the_old_prefix_cache(tmp_path):
    """An adapter loaded into a running LLM (or the model quantized in place) must not answer from keys and
    values the old weights wrote: the second call equals a fresh LLM with the adapter, with no cache hit."""
    from letterpress.train import LoRAConfig, apply_lora, load_adapter, save_adapter

    folder = save_checkpoint(tmp_path / "model", qk_scale=0.3)
    model = random_model(qk_scale=0.3)
    g = torch.Generator().manual_seed(0)
    apply_lora(model, LoRAConfig(rank=4, alpha=8), g)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B"):
                module.lora_B.normal_(0, 0.2, generator=g)
    save_adapter(model, LoRAConfig(rank=4, alpha=8), tmp_path / "adapter")
    prompt = list(range(3, 40))  # two full blocks of 16: cacheable
    params = SamplingParams(seed=0, max_new_tokens=16, ignore_eos=True)

    fresh = LLM(folder, max_model_len=128)
    load_adapter(fresh.model, tmp_path / "adapter")
    want = fresh.generate(prompt, params)[0]
    used = LLM(folder, max_model_len=128)
    base = used.generate(prompt, params)[0]
    assert base.token_ids != want.token_ids  # the adapter matters
    load_adapter(used.model, tmp_path / "adapter")
    got = used.generate(prompt, params)[0]
    assert got.num_cached_tokens == 0 and got.token_ids == want.token_ids
    again = used.generate(prompt, params)[0]  # caching goes on with the new weights
    assert again.num_cached_tokens == 32 and again.token_ids == want.token_ids
    assert used.reset_prefix_cache() and used.generate(prompt, params)[0].num_cached_tokens == 0
