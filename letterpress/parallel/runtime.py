"""Running one engine over several processes: rank 0 drives, the other ranks follow.

Rank 0 is the whole engine (LLM, scheduler, runner, HTTP server). Its model's `encode`, `denoise`,
`new_paged_cache` and `new_cache` are replaced by a `Driver`'s: before each model call it sends the call
(token ids, slots, the rows' block tables and lengths; a few KB) to the workers over a gloo group, then
runs its own shard. Every worker (`worker_loop`) receives the same call and runs its shard, so all ranks
meet in the same collectives inside the layers. The runner's sampler step goes through `Driver.sample`:
the rows' settings and generator states go out, and every rank runs the vocabulary passes on its slice of
the logits (sampler.py); each rank keeps its slice of the rows' self-conditioning state (`RowStates` on a
worker, the rows themselves on rank 0). The block allocator, prefix cache and per-row bookkeeping exist on
rank 0 only: a worker's cache (`FollowerCache`) takes the block tables it is sent.

Launch: `LLM(..., tensor_parallel_size=N)` spawns ranks 1..N-1 itself (torch.multiprocessing, TCP store on
127.0.0.1, gloo on CPU, NCCL on CUDA) or, under `torchrun`, joins the group torchrun set up (ranks > 0 run
the worker loop and exit). A watcher thread on rank 0 ends the process with a message when a spawned worker
dies, instead of leaving rank 0 blocked in a collective forever.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import logging
import os
import signal
import socket
import sys
import threading

import torch
import torch.distributed as dist

from ..cache import KVCache, PagedKVCache, layer_kinds, plan_pool
from ..errors import ConfigError, NotSupportedError
from ..model.diffusion_gemma import DiffusionGemma, check_token_ids, encode_rows
from ..sampling import NonFiniteRows
from .sampler import finish_step, plan_step, sample_slice, worker_generators
from .shard import Shard, shard_model, switch_fast_experts

log = logging.getLogger("letterpress.parallel")
FOREVER = datetime.timedelta(days=365)  # workers wait for rank 0's next call as long as the server is up


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """vLLM's names: `tensor_parallel_size` ranks; `enable_expert_parallel` splits the experts by id over
    them (else every expert is split by width, as the dense MLP is)."""

    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False

    def __post_init__(self):
        n = self.tensor_parallel_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"--tensor-parallel-size must be a positive integer, got {n!r}")

    @property
    def world(self) -> int:
        return self.tensor_parallel_size


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    """What each rank loads: the `LLM` arguments that concern the model."""

    folder: str
    dtype: object = "float32"
    device: str = "cpu"
    quantization: str | None = None
    impl: str = "plain"


def check_shardable(text_config, config: ParallelConfig) -> None:
    """Refuse a split the shapes do not allow before any process starts (every rank would fail the same way)."""
    from .shard import kv_heads_of
    from .vocab import vocab_range

    n = config.world
    vocab_range(text_config.vocab_size, n - 1, n)
    probe = Shard(0, n, config.enable_expert_parallel)
    probe.split(text_config.num_attention_heads, "the attention heads")
    for spec in text_config.layers:
        kv_heads_of(0, n, text_config.num_attention_heads, spec.num_kv_heads)
    probe.split(text_config.intermediate_size, "the dense MLP's intermediate size")
    if config.enable_expert_parallel:
        probe.split(text_config.num_experts, "the experts (expert parallel)")
    else:
        probe.split(text_config.moe_intermediate_size, "the experts' intermediate size")


def rank_device(device: str, rank: int) -> torch.device:
    """cuda -> cuda:rank (one GPU per rank; torchrun's LOCAL_RANK where set); cpu stays cpu."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    if dev.type != "cpu":
        raise NotSupportedError(f"--tensor-parallel-size runs on cpu (gloo) or cuda (NCCL), not {dev.type}")
    return dev


def load_shard(spec: LoadSpec, shard: Shard) -> DiffusionGemma:
    """This rank's slice of the checkpoint on its device, quantized (when asked) and switched to the fast
    path. A float checkpoint is cut on the meta device and only the rank's ranges of each tensor are read
    (`read_slices`); one stored quantized (compressed-tensors) is loaded whole on the CPU and cut as stored.
    With `--quantization`, the float slice is quantized on the device a layer at a time, so the device
    never holds more than one float layer beside the quantized ones."""
    from ..checkpoint import resolve, stored_quantization
    from ..quant import quantize_module

    device = rank_device(spec.device, shard.rank)
    folder = resolve(spec.folder, offline=True)
    if stored_quantization(folder) is None:
        model = read_slices(folder, spec.dtype, shard)
    else:
        model = shard_model(DiffusionGemma.from_pretrained(folder, dtype=spec.dtype, device="cpu"), shard)
    if spec.quantization is None:
        model.to(device)
    else:
        for name, child in model.named_children():
            if name != "layers":
                child.to(device)
        model.init_rope()  # its buffers move with the model's own `to`, which this loop skips
        for layer in model.layers:
            layer.to(device)
            quantize_module(layer, spec.quantization)
        quantize_module(model.self_conditioning, spec.quantization)
        model.quantization = spec.quantization
    if spec.impl == "fast":
        switch_fast_experts(model)
    return model.eval()


@torch.no_grad()
def read_slices(folder, dtype, shard: Shard) -> DiffusionGemma:
    """Build the model on the meta device, cut it (`shard_model`), allocate the slice on the CPU and read from
    the safetensors files only the ranges each parameter keeps (`shard.slice_plan`): host memory holds this
    rank's slice, not the whole model. The same header checks as `load_model`; NaN/inf refused."""
    from contextlib import ExitStack

    from ..checkpoint import (_open, allocate, check_headers, checkpoint_dtype, count_non_finite, parse_dtype,
                              plan_weights, weight_files)
    from ..config import load_model_config
    from ..errors import CheckpointError
    from .shard import slice_plan

    config = load_model_config(folder)
    dtype = parse_dtype(dtype, auto=checkpoint_dtype(folder, config) if dtype == "auto" else None)
    with torch.device("meta"):
        model = DiffusionGemma(config).to(dtype)
    files = weight_files(folder)
    stored = plan_weights(model, folder, files)
    check_headers(model, stored, files)
    with torch.device("meta"):
        shard_model(model, shard)
    cuts = slice_plan(model)
    model = allocate(model, "cpu", folder)
    model.init_rope()
    targets = dict(model.named_parameters())
    targets.update({n: b for n, b in model.named_buffers() if not n.startswith("inv_freq")})
    with ExitStack() as stack:
        handles: dict = {}
        for local, target in targets.items():
            full, dim, ranges = cuts.get(local, (local, None, None))
            if full not in stored:  # a layer scalar the checkpoint omits (plan_weights warned)
                target.fill_(1.0)
                continue
            name = stored[full].names["float"]
            path = files[name]
            if path not in handles:
                handles[path] = stack.enter_context(_open(path))
            view = handles[path].get_slice(name)
            if dim is None:
                data = view[:]
            else:
                lead = (slice(None),) * dim
                data = torch.cat([view[lead + (slice(a, b),)] for a, b in ranges], dim)
            target.copy_(data.reshape(target.shape))
            if count_non_finite(target):
                raise CheckpointError(f"{path.name}: {name} holds NaN or infinite values (in this rank's slice, "
                                      f"as {target.dtype})")
    model.checkpoint_dir = folder
    return model


# ---------------------------------------------------------------------------------------------- caches
class FollowerCache(PagedKVCache):
    """A worker's paged cache: the same pools (its own KV heads) and tables as rank 0's, but no allocator:
    before each call the rows' tables and lengths arrive from rank 0."""

    def begin_append(self, slots: torch.Tensor, new_tokens: torch.Tensor) -> None:
        pass  # rank 0 allocated the blocks; their ids came with the call

    def advance(self, slots: torch.Tensor, new_tokens: torch.Tensor, token_ids: torch.Tensor | None = None) -> None:
        self.lengths[slots] += new_tokens


def cache_state(cache, slots: torch.Tensor) -> dict:
    state = {"lengths": cache.lengths[slots].cpu()}
    if isinstance(cache, PagedKVCache):
        state["tables"] = {name: t[slots].cpu() for name, t in cache.tables.items()}
    return state


def load_state(cache, slots: torch.Tensor, state: dict) -> None:
    cache.lengths[slots] = state["lengths"].to(cache.lengths.device)
    for name, rows in state.get("tables", {}).items():
        cache.tables[name][slots] = rows.to(cache.tables[name].device)


# ---------------------------------------------------------------------------------------------- rank 0
class Channel:
    """Rank 0 -> every rank: one pickled (command, message) per model call, on a gloo group."""

    def __init__(self, group):
        self.group = group

    def send(self, command: str, message: dict) -> None:
        dist.broadcast_object_list([command, message], src=0, group=self.group)

    def recv(self) -> tuple[str, dict]:
        box = [None, None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0], box[1]


class Driver:
    """Rank 0's side: installs itself on the model (instance attributes), tells the workers each call."""

    def __init__(self, model: DiffusionGemma, channel: Channel, workers: list):
        self.model, self.channel, self.workers = model, channel, workers
        self.cache_ids: dict[int, int] = {}
        self.closed = False
        # one call at a time on the control group: the engine thread's steps and `close` (at exit, from the
        # main thread) must not interleave their messages
        self.lock = threading.RLock()
        model.encode = self.encode
        model.denoise = self.denoise
        model.new_paged_cache = self.new_paged_cache
        model.new_cache = self.new_cache
        model.parallel_driver = self  # the runner samples through `sample` (every rank takes part)
        self.rows: list[tuple[int, int, int]] | None = None

    def _register(self, cache, kind: str, args: dict):
        cid = len(self.cache_ids)
        self.cache_ids[id(cache)] = cid
        self.channel.send("cache", {"id": cid, "kind": kind, **args})
        return cache

    def new_paged_cache(self, num_slots: int, max_model_len: int, block_size: int = 16,
                        num_blocks: dict[str, int] | None = None, budget_bytes: int | None = None,
                        prefill_chunk: int = 2048, enable_prefix_caching: bool = True) -> PagedKVCache:
        """`DiffusionGemma.new_paged_cache`, on every rank: the pools are planned here (from this rank's KV
        heads, so `budget_bytes` is per rank, as vLLM's memory settings are per GPU) and sized alike."""
        if num_blocks is None:
            num_blocks = plan_pool(layer_kinds(self.model.text_config), self.model.dtype, block_size, num_slots,
                                   max_model_len, prefill_chunk, budget_bytes)
        cache = DiffusionGemma.new_paged_cache(self.model, num_slots, max_model_len, block_size, num_blocks,
                                               prefill_chunk=prefill_chunk, enable_prefix_caching=enable_prefix_caching)
        return self._register(cache, "paged", dict(num_slots=num_slots, max_model_len=max_model_len,
                                                   block_size=block_size, num_blocks=num_blocks,
                                                   prefill_chunk=prefill_chunk))

    def new_cache(self, num_slots: int, capacity: int) -> KVCache:
        cache = DiffusionGemma.new_cache(self.model, num_slots, capacity)
        return self._register(cache, "contiguous", dict(num_slots=num_slots, capacity=capacity))

    def _send(self, command: str, cache, slots: torch.Tensor, **message) -> None:
        if self.closed:
            raise RuntimeError("the tensor-parallel workers have been stopped")
        if id(cache) not in self.cache_ids:
            raise NotSupportedError("under tensor parallelism, build caches with the model's new_paged_cache / "
                                    "new_cache (the workers build theirs alongside)")
        self.channel.send(command, {"cache": self.cache_ids[id(cache)], "slots": slots.cpu(),
                                    "state": cache_state(cache, slots), **message})

    def encode(self, input_ids: torch.Tensor, cache, slots: torch.Tensor | None = None,
               input_lengths: torch.Tensor | None = None, soft_tokens: torch.Tensor | None = None,
               soft_token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`DiffusionGemma.encode` on every rank. Image features (`soft_tokens`, from the vision tower, which
        runs on rank 0 only) travel with the call."""
        slots, input_lengths = encode_rows(input_ids, slots, input_lengths)
        # Allocate the chunk's blocks now (encode's own call then finds them), so that their ids go out with
        # the call; a context that does not fit raises here, before any worker hears of it.
        cache.begin_append(slots, input_lengths)
        with self.lock:
            media = {} if soft_token_mask is None else {"soft_tokens": soft_tokens.cpu(),
                                                         "soft_token_mask": soft_token_mask.cpu()}
            self._send("encode", cache, slots, ids=input_ids.cpu(), lengths=input_lengths.cpu(), **media)
            with self._fatal("encode"):
                return DiffusionGemma.encode(self.model, input_ids, cache, slots, input_lengths, soft_tokens,
                                             soft_token_mask)

    def prepare(self, rows: list[tuple[int, int, int]]) -> None:
        """The runner, before a batch's denoise and sample: (slot, canvas index, step) of each row. Each
        rank keeps its vocabulary slice of a row's self-conditioning state under (slot, canvas, step made):
        the denoise reads the one made at step - 1, the sample files the new one, and a step the runner
        retries (`Runner._isolated`) reads the old one again."""
        self.rows = list(rows)

    def denoise(self, canvas_ids: torch.Tensor, cache, slots: torch.Tensor | None = None,
                self_conditioning_logits: torch.Tensor | None = None,
                self_conditioning_mask: torch.Tensor | None = None,
                self_conditioning_probs: torch.Tensor | None = None) -> torch.Tensor:
        """`DiffusionGemma.denoise` on every rank; returns rank 0's vocabulary slice of the logits
        [B, C, V / N] (letterpress.parallel.vocab). The self-conditioning input is rank 0's slice of the rows'
        state; the workers read theirs by the keys of `prepare`."""
        check_token_ids(canvas_ids, "canvas_ids")
        slots = torch.arange(canvas_ids.shape[0], device=canvas_ids.device) if slots is None else slots.to(canvas_ids.device)
        signal = self_conditioning_logits is not None or self_conditioning_probs is not None
        mask = None if self_conditioning_mask is None else self_conditioning_mask.cpu()
        keys = None
        if signal:
            if self.rows is None or len(self.rows) != canvas_ids.shape[0]:
                raise NotSupportedError("under tensor parallelism, self-conditioning goes through the engine's "
                                        "runner (each rank keeps its slice of the previous step's state)")
            present = [True] * len(self.rows) if mask is None else mask.tolist()
            keys = [(c, s - 1) if p else None for (_, c, s), p in zip(self.rows, present)]
        with self.lock:
            self._send("denoise", cache, slots, ids=canvas_ids.cpu(), keys=keys,
                       probs=self_conditioning_probs is not None, mask=mask)
            with self._fatal("denoise"):
                return DiffusionGemma.denoise(self.model, canvas_ids, cache, slots, self_conditioning_logits,
                                              self_conditioning_mask, self_conditioning_probs)

    def sample(self, logits: torch.Tensor, temperatures: torch.Tensor, entropy_bounds: torch.Tensor, draws: list,
               canvas_index: list[int], step_index: list[int], greedy: list[bool] | None = None,
               clamp_tokens: torch.Tensor | None = None, clamp_mask: torch.Tensor | None = None,
               top_k: list[int] | None = None, keep_probs: bool = False, log_prob_rows: list[int] = ()):
        """The sampler step of the batch just denoised, on every rank over its vocabulary slice
        (letterpress.parallel.sampler): `fused_denoise_step`'s outcome with rank 0's slices of the state
        (`sc_probs` with `keep_probs`, else `processed_logits`), plus `log_probs` {row: [C, V]} of
        `log_prob_rows` (structured output). `logits` (rank 0's slice) are consumed."""
        plan, generators = plan_step(temperatures, draws, greedy, top_k, log_prob_rows, keep_probs, self.model.dtype)
        rows = self.rows
        if rows is None or len(rows) != logits.shape[0]:
            raise NotSupportedError("under tensor parallelism the sampler runs through the engine's runner")
        with self.lock:
            if self.closed:
                raise RuntimeError("the tensor-parallel workers have been stopped")
            self.channel.send("sample", {"plan": plan, "rows": rows})
            with self._fatal("sample", NonFiniteRows):
                local = sample_slice(logits, plan, self.model.vocab_slice, self.model.shard.group, generators)
        del logits
        outcome = finish_step(local, plan, entropy_bounds, draws, canvas_index, step_index, greedy, clamp_tokens,
                              clamp_mask)
        outcome.log_probs = local.log_probs
        return outcome

    @contextlib.contextmanager
    def _fatal(self, call: str, alike: type[BaseException] | tuple = ()):
        """An exception inside rank 0's part of a call the workers already run would leave them waiting in a
        collective that never completes (and the runner's retry would send them a call they cannot take): a
        single process isolates such a fault to its rows, a tensor-parallel engine stops, with the cause.
        `alike`: exceptions every rank raises at the same point (the sampler's NonFiniteRows), which the
        workers survive: they pass."""
        try:
            yield
        except alike:
            raise
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C: the workers (which ignore SIGINT) go with us
            self._kill_workers()
            raise
        except BaseException as e:
            print(f"letterpress: rank 0 failed inside a tensor-parallel {call} ({type(e).__name__}: {e}); the "
                  "other ranks cannot be brought back in step, stopping", file=sys.stderr, flush=True)
            log.error("tensor-parallel %s failed on rank 0", call, exc_info=e)
            self._kill_workers()
            os._exit(1)

    def _kill_workers(self) -> None:
        self.closed = True
        for p in self.workers:
            if p.is_alive():
                p.kill()

    def close(self) -> None:
        """Stop the workers (they leave their loop) and wait for them."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            try:
                self.channel.send("stop", {})
            except Exception:  # a worker already gone: nothing to tell
                pass
        for p in self.workers:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- workers
def worker_loop(model: DiffusionGemma, channel: Channel) -> None:
    """Run rank 0's calls on this rank's shard until it says stop."""
    caches: dict[int, object] = {}
    states = RowStates()
    logits = None  # this rank's slice of the last denoise's logits, for the sample call that follows
    device = model.device
    with torch.inference_mode():
        while True:
            command, msg = channel.recv()
            if command == "stop":
                return
            if command == "cache":
                if msg["kind"] == "paged":
                    caches[msg["id"]] = FollowerCache(model.text_config, msg["num_slots"], msg["max_model_len"],
                                                      msg["block_size"], msg["num_blocks"], model.dtype, device,
                                                      msg["prefill_chunk"], enable_prefix_caching=False)
                else:
                    caches[msg["id"]] = DiffusionGemma.new_cache(model, msg["num_slots"], msg["capacity"])
                continue
            if command == "sample":
                plan = msg["plan"]
                try:
                    out = sample_slice(logits, plan, model.vocab_slice, model.shard.group,
                                       worker_generators(plan, device))
                except NonFiniteRows:  # rank 0 raised it too, at the same point: its runner retries
                    continue
                finally:
                    logits = None
                states.file(msg["rows"], out.state)
                continue
            cache, slots = caches[msg["cache"]], msg["slots"].to(device)
            load_state(cache, slots, msg["state"])
            ids = msg["ids"].to(device)
            if command == "encode":
                media = msg.get("soft_token_mask")
                DiffusionGemma.encode(model, ids, cache, slots, msg["lengths"].to(device),
                                      None if media is None else msg["soft_tokens"].to(device, model.dtype),
                                      None if media is None else media.to(device))
            elif command == "denoise":
                logits = None
                state = states.take(slots.tolist(), msg["keys"])
                mask = None if msg["mask"] is None else msg["mask"].to(device)
                logits = DiffusionGemma.denoise(model, ids, cache, slots, None if msg["probs"] else state, mask,
                                                state if msg["probs"] else None)
            else:
                raise RuntimeError(f"unknown command {command!r} from rank 0")


class RowStates:
    """A worker's slices of the rows' self-conditioning state, by slot and (canvas, step made): the [R, C,
    V / N] tensor of the sample call that made them and the row's index in it (rank 0's rows hold views of
    theirs alike)."""

    def __init__(self):
        self.by_slot: dict[int, dict[tuple[int, int], tuple[torch.Tensor, int]]] = {}

    def file(self, rows: list[tuple[int, int, int]], state: torch.Tensor) -> None:
        for i, (slot, canvas, step) in enumerate(rows):
            self.by_slot.setdefault(slot, {})[(canvas, step)] = (state, i)

    def take(self, slots: list[int], keys: list | None) -> torch.Tensor | None:
        """The stacked state [R, C, V / N] of these rows (zeros where a key is None), or None without keys;
        each slot then keeps only the entry it read (the newest a retried step may read again)."""
        if keys is None:
            for slot in slots:
                self.by_slot.pop(slot, None)
            return None
        found = [None if k is None else self.by_slot[slot][tuple(k)] for slot, k in zip(slots, keys)]
        for slot, k in zip(slots, keys):
            kept = self.by_slot.pop(slot, {})
            if k is not None:
                self.by_slot[slot] = {tuple(k): kept[tuple(k)]}
        first = next((f for f in found if f is not None), None)
        if first is None:  # rank 0 sends keys only when some row has a state
            raise RuntimeError("a self-conditioned denoise without any row's state")
        tensor, start = first
        if all(f is not None and f[0] is tensor and f[1] == start + i for i, f in enumerate(found)):
            return tensor[start:start + len(found)]  # the last step's batch, same rows: no copy
        zeros = torch.zeros_like(tensor[0])
        return torch.stack([zeros if f is None else f[0][f[1]] for f in found])


def _init_group(backend: str, rank: int, world: int, init_method: str | None) -> Channel:
    kwargs = {} if init_method is None else dict(init_method=init_method, rank=rank, world_size=world)
    dist.init_process_group(backend=backend, **kwargs)
    # the control group waits as long as the server is idle; the model's collectives keep the default timeout
    return Channel(dist.new_group(backend="gloo", timeout=FOREVER))


def _worker_main(rank: int, world: int, init_method: str | None, config: ParallelConfig, spec: LoadSpec) -> None:
    """A spawned (or torchrun) rank > 0: join the group, load its shard, follow rank 0."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process of a terminal: rank 0 decides
    try:
        device = rank_device(spec.device, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        channel = _init_group("nccl" if device.type == "cuda" else "gloo", rank, world, init_method)
        model = load_shard(spec, Shard(rank, world, config.enable_expert_parallel))
        worker_loop(model, channel)
        dist.destroy_process_group()
    except BaseException as e:  # say which rank failed and why, then let rank 0's watcher stop the server
        print(f"letterpress: tensor-parallel worker rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)
        os._exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _watch(workers: list, driver_box: list) -> None:
    """Rank 0: when a spawned worker exits while the engine still needs it, say so and end the process
    (rank 0 would otherwise wait in its next collective for a peer that never comes)."""
    from multiprocessing.connection import wait

    by_sentinel = {p.sentinel: (rank, p) for rank, p in enumerate(workers, start=1)}
    ready = wait(list(by_sentinel))
    driver = driver_box[0] if driver_box else None
    if driver is not None and driver.closed:
        return
    rank, p = by_sentinel[ready[0]]
    p.join(timeout=1)
    print(f"letterpress: tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}; "
          "the engine cannot go on without it, stopping", file=sys.stderr, flush=True)
    for other in workers:
        if other.is_alive():
            other.kill()
    os._exit(1)


def launch(config: ParallelConfig, spec: LoadSpec) -> Driver:
    """Start (or, under torchrun, join) the ranks; on rank 0 return the `Driver` whose `model` is rank 0's
    shard. Under torchrun a rank > 0 never returns: it follows rank 0 and exits when rank 0 stops."""
    world = config.world
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    device = rank_device(spec.device, 0)
    backend = "nccl" if device.type == "cuda" else "gloo"
    workers: list = []
    driver_box: list = []
    if dist.is_initialized():
        raise ConfigError("a tensor-parallel engine is already running in this process: close() its LLM first")
    if env_world > 1:  # torchrun: RANK, WORLD_SIZE, MASTER_ADDR/PORT are set
        if env_world != world:
            raise ConfigError(f"torchrun started {env_world} processes but --tensor-parallel-size is {world}")
        rank = int(os.environ["RANK"])
        if rank != 0:
            _worker_main(rank, world, None, config, spec)
            sys.exit(0)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        channel = _init_group(backend, 0, world, None)
    else:
        import torch.multiprocessing as mp

        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        for rank in range(1, world):
            p = ctx.Process(target=_worker_main, args=(rank, world, init_method, config, spec), daemon=True,
                            name=f"letterpress-tp{rank}")
            p.start()
            workers.append(p)
        threading.Thread(target=_watch, args=(workers, driver_box), daemon=True, name="letterpress-tp-watch").start()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        channel = _init_group(backend, 0, world, init_method)
    model = load_shard(spec, Shard(0, world, config.enable_expert_parallel))
    driver = Driver(model, channel, workers)
    driver_box.append(driver)
    atexit.register(driver.close)
    log.info("tensor parallel: %d ranks (%s), experts split %s", world, backend,
             "by id (expert parallel)" if config.enable_expert_parallel else "by width")
    return driver
