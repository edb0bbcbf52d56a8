"""The encoder's KV caches, and the exact sliding-window semantics we match (`visible_from`).

Two caches with one interface (`begin_append`, `write`, `read`, `advance`; `lengths` [rows] on the device):

- `KVCache`: contiguous, one preallocated slot of `capacity` positions per row, every position kept. Simple,
  differentiable (training encodes into it), used by the loss, the tests and the benchmarks.
- `PagedKVCache`: what the engine serves with. Fixed-size blocks of `block_size` positions from one pool
  per layer kind (sliding and full layers have different KV shapes, so different pools); each row holds a
  block table per kind. Full layers keep every block of a row; sliding layers keep only the blocks a future
  read can reach (`visible_from`: the last `window - 1` positions, plus the chunk being encoded) and give
  older blocks back. With prefix caching on, every block that is full gets a chained hash of the tokens up
  to its end (and of the content of every image whose soft tokens it holds, `MediaSpan`); rows whose prompt starts with the same tokens share those blocks (reference counts), and
  blocks no row holds stay cached until the pool needs them (least recently freed first), which is how
  vLLM's allocator (and its hybrid one, for sliding layers) does it.

Admission is by blocks: `admit` reserves a row's worst case in every pool (its whole length on full layers,
the window plus one encoder chunk on sliding ones) and refuses (the row waits) when the pool's reservations
would exceed its size. A running row can therefore always get its next block and never touches another
row's blocks; there is no preemption.
"""

from __future__ import annotations

import hashlib
import math
import re
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from .config import SLIDING, TextConfig
from .errors import ConfigError, RequestError

Rows = torch.Tensor | slice  # row (slot) indices: a tensor, or a slice when they are consecutive


def visible_from(lengths: torch.Tensor, window: int | None) -> torch.Tensor:
    """First cached position a canvas query may read: a sliding layer sees the last `window - 1` prefix tokens
    (what transformers' dynamic sliding cache retains), a full layer sees them all. The encoder's first new
    token reads from the same position (causal: its own window of `window` tokens; bidirectional: what the
    sliding cache retained), so nothing before it is ever read again."""
    if window is None:
        return torch.zeros_like(lengths)
    return (lengths - (window - 1)).clamp(min=0)


def first_visible(length: int, window: int | None) -> int:
    """`visible_from` for one row, in Python ints."""
    return 0 if window is None else max(length - (window - 1), 0)


def contiguous_rows(slots: torch.Tensor) -> Rows:
    """A slice when the slots are consecutive (a view, no copy), else the index tensor (a gather)."""
    n = slots.numel()
    if n == 0:
        return slots
    first = int(slots[0])
    if torch.equal(slots.cpu(), torch.arange(first, first + n)):
        return slice(first, first + n)
    return slots


# ----------------------------------------------------------------------------------------- contiguous
class KVCache:
    """keys[layer], values[layer]: [slots, kv_heads, capacity, head_dim]; lengths: tokens written per slot."""

    def __init__(self, cfg: TextConfig, num_slots: int, capacity: int, dtype: torch.dtype, device: torch.device | str):
        self.cfg = cfg
        self.capacity = capacity
        self.keys = [
            torch.zeros(num_slots, spec.num_kv_heads, capacity, spec.head_dim, dtype=dtype, device=device)
            for spec in cfg.layers
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)

    @property
    def num_slots(self) -> int:
        return self.lengths.shape[0]

    def reset(self, slots: torch.Tensor | list[int]) -> None:
        self.lengths[torch.as_tensor(slots, device=self.lengths.device)] = 0

    def begin_append(self, slots: torch.Tensor, new_tokens: torch.Tensor) -> None:
        end = self.lengths[slots] + new_tokens
        if bool((end > self.capacity).any()):
            raise RequestError(f"context too long: {int(end.max())} tokens exceed the cache capacity of {self.capacity}")

    check_room = begin_append

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the valid tokens of a right-padded chunk. k, v: [B, T, kv_heads, d]; positions, valid: [B, T]."""
        rows = slots[:, None].expand_as(positions)[valid]
        pos = positions[valid]
        self.keys[layer][rows, :, pos] = k[valid].to(self.keys[layer].dtype)
        self.values[layer][rows, :, pos] = v[valid].to(self.values[layer].dtype)

    def read(self, layer: int, rows: Rows, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [start, end): [B, kv_heads, end - start, head_dim] each."""
        return self.keys[layer][rows, :, start:end], self.values[layer][rows, :, start:end]

    def advance(self, slots: torch.Tensor, new_tokens: torch.Tensor, token_ids: torch.Tensor | None = None) -> None:
        self.lengths[slots] += new_tokens


# ----------------------------------------------------------------------------------------------- sizes
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(text: str | int) -> int:
    """"2GiB", "512MiB", "1.5GB", "1e9" or a plain integer -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read {text!r} as a size in bytes (examples: 2GiB, 512MiB, 8GB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def kv_cache_budget(device: torch.device | str, kv_cache_memory: str | int | None = None,
                    gpu_memory_utilization: float | None = None) -> int | None:
    """Bytes for the KV pools: `kv_cache_memory` if given; else, on CUDA, vLLM's `gpu_memory_utilization`
    (the fraction of the device's memory letterpress may use, minus what is in use now: weights and anything
    else on the card; activations are not profiled, so leave room for them); else None (`plan_pool`'s
    default: max_num_seqs rows of max_model_len tokens)."""
    if kv_cache_memory is not None:
        budget = parse_bytes(kv_cache_memory)
        if budget <= 0:
            raise ConfigError(f"--kv-cache-memory must be positive, got {kv_cache_memory!r}")
        return budget
    if gpu_memory_utilization is None:
        return None
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"--gpu-memory-utilization must lie in (0, 1], got {gpu_memory_utilization}")
    device = torch.device(device)
    if device.type != "cuda":
        raise ConfigError("--gpu-memory-utilization sizes the cache from CUDA memory; on this device use "
                          "--kv-cache-memory (e.g. 4GiB)")
    free, total = torch.cuda.mem_get_info(device)
    budget = int(gpu_memory_utilization * total) - (total - free)
    if budget <= 0:
        raise ConfigError(f"--gpu-memory-utilization {gpu_memory_utilization} leaves no room for the KV cache: "
                          f"{(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB are already in use")
    return budget


@dataclass(frozen=True)
class LayerKind:
    """Layers of one type share a block pool: a block holds `block_size` positions of every one of them."""

    name: str  # the layer type, e.g. "sliding_attention"
    layers: tuple[int, ...]
    num_kv_heads: int
    head_dim: int
    window: int | None  # None: the layer sees the whole prefix

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """Keys and values of one position on every layer of this kind."""
        return 2 * len(self.layers) * self.num_kv_heads * self.head_dim * torch.empty(0, dtype=dtype).element_size()


def layer_kinds(cfg: TextConfig) -> list[LayerKind]:
    kinds = []
    for layer_type in dict.fromkeys(cfg.layer_types):
        idx = tuple(i for i, t in enumerate(cfg.layer_types) if t == layer_type)
        spec = cfg.layers[idx[0]]
        if any((cfg.layers[i].num_kv_heads, cfg.layers[i].head_dim) != (spec.num_kv_heads, spec.head_dim) for i in idx):
            raise ConfigError(f"layers of type {layer_type} have different KV shapes")
        window = cfg.sliding_window if layer_type == SLIDING else None
        kinds.append(LayerKind(layer_type, idx, spec.num_kv_heads, spec.head_dim, window))
    return kinds


def blocks_for_row(kind: LayerKind, tokens: int, block_size: int, prefill_chunk: int) -> int:
    """The most blocks of `kind` a row of `tokens` positions holds at once: all of them on a full layer; on a
    sliding layer those covering the last `window - 1` positions plus one encoder chunk (any alignment)."""
    total = math.ceil(tokens / block_size)
    if kind.window is None:
        return total
    span = kind.window - 1 + prefill_chunk
    return min(total, math.ceil(span / block_size) + 1)


def plan_pool(kinds: list[LayerKind], dtype: torch.dtype, block_size: int, max_num_seqs: int, max_model_len: int,
              prefill_chunk: int, budget_bytes: int | None = None) -> dict[str, int]:
    """Blocks per layer kind. Without a budget: room for `max_num_seqs` rows of `max_model_len` tokens (the
    old slot x max_model_len capacity, so nothing waits that did not wait before; sliding layers need only
    their window). With one: sliding pools get room for `max_num_seqs` rows if that leaves one full-length
    row on the full pools (else as many rows as do), full pools share the rest in proportion to their size
    per token."""
    per_row = {k.name: blocks_for_row(k, max_model_len, block_size, prefill_chunk) for k in kinds}
    if budget_bytes is None:
        return {name: max_num_seqs * n for name, n in per_row.items()}
    block_bytes = {k.name: k.bytes_per_token(dtype) * block_size for k in kinds}
    sliding = [k for k in kinds if k.window is not None]
    full = [k for k in kinds if k.window is None]
    one_row = sum(per_row[k.name] * block_bytes[k.name] for k in kinds)
    if budget_bytes < one_row:
        raise ConfigError(
            f"a KV cache of {budget_bytes / 2**30:.2f} GiB cannot hold one row of max_model_len {max_model_len} "
            f"tokens ({one_row / 2**30:.2f} GiB); raise --kv-cache-memory or lower --max-model-len")
    full_row = sum(per_row[k.name] * block_bytes[k.name] for k in full)
    sliding_row = one_row - full_row
    rows = max_num_seqs if not full else min(max_num_seqs, (budget_bytes - full_row) // max(sliding_row, 1))
    plan = {k.name: rows * per_row[k.name] for k in sliding}
    left = budget_bytes - sum(plan[k.name] * block_bytes[k.name] for k in sliding)
    per_token = sum(k.bytes_per_token(dtype) for k in full)
    for k in full:
        plan[k.name] = int(left * k.bytes_per_token(dtype) / per_token) // block_bytes[k.name]
    return plan


# ------------------------------------------------------------------------------------------ block pool
class BlockPool:
    """Block ids 1..num_blocks of one layer kind (id 0 is the null block: unused table entries point at it and
    its contents are never attended to). Free blocks, reference counts, and with prefix caching the map
    hash -> block of cached blocks; cached blocks nobody holds wait in LRU order to be evicted."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(1, num_blocks + 1))
        self.refs = [0] * (num_blocks + 1)
        self.hash_of: dict[int, bytes] = {}
        self.cached: dict[bytes, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        # blocks promised to admitted rows (see PagedKVCache.admit): on a sliding pool every row's worst case;
        # on a full pool what the rows may still allocate (their worst case less the blocks they hold)
        self.reserved = 0
        self.promised = 0

    @property
    def num_held(self) -> int:
        return self.num_blocks - len(self.free) - len(self.evictable)

    def allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.hash_of.pop(block)]
        else:  # admission promises every row's worst case, so this means a caller skipped `admit`
            raise RequestError("the KV cache pool is exhausted")
        self.refs[block] = 1
        return block

    def acquire(self, block: int) -> None:
        if self.refs[block] == 0:
            del self.evictable[block]
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.hash_of:
                self.evictable[block] = None
            else:
                self.free.append(block)

    def forget_cached(self) -> None:
        """Drop every hash: cached blocks nobody holds are free again, held ones are freed when released."""
        self.free.extend(self.evictable)
        self.evictable.clear()
        self.cached.clear()
        self.hash_of.clear()

    def register(self, block: int, block_hash: bytes) -> None:
        """Make a full block findable by its hash (the first block with a given hash stays the cached one)."""
        if block_hash not in self.cached and block not in self.hash_of:
            self.cached[block_hash] = block
            self.hash_of[block] = block_hash


def chain_hash(parent: bytes, tokens: list[int], media: bytes = b"") -> bytes:
    """Hash of a block given the hash of the block before it: equal hashes mean equal token prefixes. `media`:
    the content digests of the images whose soft tokens the block holds (their placeholder ids are all
    equal, so the ids alone would let two different images share blocks)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes() + media, digest_size=16).digest()


MediaSpan = tuple[int, int, bytes]  # an image's soft tokens: [start, end) prompt positions, content digest


ROOT_HASH = b"letterpress-kv"


# ----------------------------------------------------------------------------------------------- paged
class PagedKVCache:
    """keys[layer], values[layer]: [blocks + 1, block_size, kv_heads, head_dim] (block 0: the null block);
    tables[kind]: [rows, max_blocks] physical block of each logical block of a row (0 where none is held)."""

    def __init__(self, cfg: TextConfig, num_slots: int, max_model_len: int, block_size: int,
                 num_blocks: dict[str, int], dtype: torch.dtype, device: torch.device | str,
                 prefill_chunk: int, enable_prefix_caching: bool = True):
        self.cfg = cfg
        self.kinds = layer_kinds(cfg)
        self.kind_of_layer = [next(k for k in self.kinds if i in k.layers) for i in range(len(cfg.layers))]
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.prefill_chunk = prefill_chunk
        self.enable_prefix_caching = enable_prefix_caching
        self.dtype = dtype
        self.keys = [torch.zeros(num_blocks[k.name] + 1, block_size, k.num_kv_heads, k.head_dim, dtype=dtype,
                                 device=device) for k in self.kind_of_layer]
        self.values = [torch.zeros_like(t) for t in self.keys]
        self.pools = {k.name: BlockPool(num_blocks[k.name]) for k in self.kinds}
        max_blocks = math.ceil(max_model_len / block_size)
        self.tables = {k.name: torch.zeros(num_slots, max_blocks, dtype=torch.long, device=device) for k in self.kinds}
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)
        # host-side row state
        self.blocks = {k.name: [[] for _ in range(num_slots)] for k in self.kinds}  # logical -> physical (0: none)
        self.reserved = {k.name: [0] * num_slots for k in self.kinds}
        self.tokens: list[list[int]] = [[] for _ in range(num_slots)]  # what each row has encoded
        self.hashes: list[list[bytes]] = [[] for _ in range(num_slots)]  # one per full block of `tokens`
        self.hashable = [True] * num_slots  # False once a chunk came without its token ids
        self.media: list[list[MediaSpan]] = [[] for _ in range(num_slots)]  # each row's images
        self.trimmed = {k.name: [0] * num_slots for k in self.kinds}  # sliding: blocks before this are given back

    @property
    def num_slots(self) -> int:
        return self.lengths.shape[0]

    # ------------------------------------------------------------------------------------------ sizes
    def block_bytes(self, kind: LayerKind) -> int:
        return kind.bytes_per_token(self.dtype) * self.block_size

    def pool_bytes(self) -> int:
        """Bytes the pools occupy (allocated up front)."""
        return sum(self.block_bytes(k) * self.pools[k.name].num_blocks for k in self.kinds)

    def used_bytes(self) -> int:
        """Bytes of the blocks rows hold now (cached blocks nobody holds are not counted)."""
        return sum(self.block_bytes(k) * self.pools[k.name].num_held for k in self.kinds)

    def usage(self) -> float:
        """The fraction of the pools' bytes that rows hold (vLLM's kv_cache_usage_perc: cached blocks nobody
        holds count as free, as they are evicted on demand)."""
        return self.used_bytes() / max(self.pool_bytes(), 1)

    def blocks_needed(self, tokens: int) -> dict[str, int]:
        return {k.name: blocks_for_row(k, tokens, self.block_size, self.prefill_chunk) for k in self.kinds}

    def fits_alone(self, tokens: int) -> bool:
        return all(n <= self.pools[name].num_blocks for name, n in self.blocks_needed(tokens).items())

    # -------------------------------------------------------------------------------------- admission
    def admit(self, slot: int, prompt_ids: list[int], max_tokens: int, media: list[MediaSpan] | None = None) -> int | None:
        """Promise the blocks a row of at most `max_tokens` tokens can hold at once and reuse the cached blocks
        of the longest cached prefix of `prompt_ids`. Returns the number of prompt tokens already cached (the
        row's length; encode the rest), or None when the pool cannot promise the blocks yet (wait).
        `media`: the prompt's image runs; their digests enter the hashes of the blocks holding them, and a
        cached prefix never ends inside one (an image is encoded in one piece).

        A full pool is asked only for the blocks the row will allocate: its worst case less the cached prefix
        blocks it shares (a 2,000-token system prompt held once, not once per row). Promise kept: the blocks
        held plus every row's worst case less what it holds stays within the pool, as a full row holds each
        block until it ends. A sliding pool promises every row its worst case: a row gives its window's
        blocks back as it moves on, but a block it shared stays held by the others, so sharing saves nothing
        there that could be promised (and the window is small)."""
        need = self.blocks_needed(max_tokens)
        media = sorted(media or [])
        hit = self._longest_hit(prompt_ids, media) if self.enable_prefix_caching else 0
        hashes = self.hashes_of(prompt_ids, hit, media)
        if not all(self._can_promise(kind, need[kind.name], hashes) for kind in self.kinds):
            return None
        for kind in self.kinds:
            pool = self.pools[kind.name]
            if kind.window is None:
                pool.promised += need[kind.name] - len(hashes)  # a full row takes every block of the hit
            else:
                pool.reserved += need[kind.name]
            self.reserved[kind.name][slot] = need[kind.name]
            first = first_visible(hit, kind.window) // self.block_size
            row = [0] * len(hashes)
            for j in range(first, len(row)):
                row[j] = pool.cached[hashes[j]]
                pool.acquire(row[j])
            self.blocks[kind.name][slot] = row
            self.trimmed[kind.name][slot] = first
            self.tables[kind.name][slot] = 0
            if row:
                self.tables[kind.name][slot, : len(row)] = torch.tensor(row)
        self.tokens[slot] = list(prompt_ids[:hit])
        self.hashes[slot] = hashes
        self.media[slot] = media
        self.hashable[slot] = True
        self.lengths[slot] = hit
        return hit

    def _can_promise(self, kind: LayerKind, need: int, hashes: list[bytes]) -> bool:
        pool = self.pools[kind.name]
        if kind.window is not None:
            return pool.reserved + need <= pool.num_blocks
        # cached blocks nobody holds count as free until this row takes them
        revived = sum(1 for h in hashes if pool.refs[pool.cached[h]] == 0)
        return pool.num_held + revived + pool.promised + need - len(hashes) <= pool.num_blocks

    def hashes_of(self, token_ids: list[int], tokens: int, media: list[MediaSpan] | None = None) -> list[bytes]:
        hashes, parent = [], ROOT_HASH
        for start in range(0, tokens - tokens % self.block_size, self.block_size):
            parent = chain_hash(parent, token_ids[start:start + self.block_size],
                                self._media_in(media, start, start + self.block_size))
            hashes.append(parent)
        return hashes

    @staticmethod
    def _media_in(media: list[MediaSpan] | None, start: int, end: int) -> bytes:
        """The digests of the image runs overlapping positions [start, end), in order."""
        return b"".join(digest for s, e, digest in media or () if s < end and e > start)

    def _longest_hit(self, prompt_ids: list[int], media: list[MediaSpan] | None = None) -> int:
        """Tokens of the longest block-aligned prefix whose blocks are cached on every layer kind for every
        position a later read needs: all of them on full layers, the window's on sliding ones. At least one
        prompt token is always left to encode (as in vLLM)."""
        hashes = self.hashes_of(prompt_ids, len(prompt_ids) - 1, media)
        count = len(hashes)
        for kind in self.kinds:
            if kind.window is None:
                cached = self.pools[kind.name].cached
                count = min(count, next((j for j, h in enumerate(hashes) if h not in cached), len(hashes)))
        for n in range(count, 0, -1):
            tokens = n * self.block_size
            if any(start < tokens < end for start, end, _ in media or ()):
                continue  # the rest of an image cannot be encoded without its start
            if all(h in self.pools[k.name].cached
                   for k in self.kinds if k.window is not None
                   for h in hashes[first_visible(tokens, k.window) // self.block_size:n]):
                return tokens
        return 0

    def free(self, slot: int) -> None:
        """Give back every block the row holds and its reservation (cached blocks stay findable)."""
        for kind in self.kinds:
            pool = self.pools[kind.name]
            held = 0
            for block in self.blocks[kind.name][slot]:
                if block:
                    pool.release(block)
                    held += 1
            if kind.window is None:
                pool.promised -= self.reserved[kind.name][slot] - held
            else:
                pool.reserved -= self.reserved[kind.name][slot]
            self.reserved[kind.name][slot] = 0
            self.blocks[kind.name][slot] = []
            self.trimmed[kind.name][slot] = 0
            self.tables[kind.name][slot] = 0
        self.tokens[slot], self.hashes[slot], self.media[slot] = [], [], []
        self.lengths[slot] = 0

    def reset(self, slots: torch.Tensor | list[int]) -> None:
        for slot in torch.as_tensor(slots).tolist():
            self.free(slot)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (vLLM's `reset_prefix_cache`): after the weights changed, what they wrote
        is stale. Rows running now keep their blocks; nothing they write from here on is registered."""
        for pool in self.pools.values():
            pool.forget_cached()
        self.hashable = [False] * len(self.hashable)

    # ---------------------------------------------------------------------------------- encode / read
    def begin_append(self, slots: torch.Tensor, new_tokens: torch.Tensor) -> None:
        """Give each row blocks for its next `new_tokens` positions, on every layer kind."""
        updates: dict[str, list[tuple[int, int, int]]] = {k.name: [] for k in self.kinds}
        for slot, n in zip(slots.tolist(), new_tokens.tolist()):
            length = len(self.tokens[slot])
            if length + n > self.max_model_len:
                raise RequestError(f"context too long: {length + n} tokens exceed max_model_len {self.max_model_len}")
            for kind in self.kinds:
                row, pool = self.blocks[kind.name][slot], self.pools[kind.name]
                for j in range(len(row), math.ceil((length + n) / self.block_size)):
                    row.append(pool.allocate())
                    if kind.window is None:
                        pool.promised -= 1  # one promised block taken
                    updates[kind.name].append((slot, j, row[j]))
        for name, entries in updates.items():
            if entries:
                idx = torch.tensor(entries, device=self.tables[name].device)
                self.tables[name][idx[:, 0], idx[:, 1]] = idx[:, 2]

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the valid tokens of a right-padded chunk. k, v: [B, T, kv_heads, d]; positions, valid: [B, T]."""
        table = self.tables[self.kind_of_layer[layer].name]
        rows = slots[:, None].expand_as(positions)[valid]
        pos = positions[valid]
        blocks, offsets = table[rows, pos // self.block_size], pos % self.block_size
        self.keys[layer][blocks, offsets] = k[valid].to(self.dtype)
        self.values[layer][blocks, offsets] = v[valid].to(self.dtype)

    def read(self, layer: int, rows: Rows, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [start, end) gathered from the rows' blocks: [B, kv_heads, end - start,
        head_dim] each. Positions a row does not hold read the null block (callers mask them)."""
        bs = self.block_size
        first, last = start // bs, max(math.ceil(end / bs), start // bs)
        ids = self.tables[self.kind_of_layer[layer].name][rows, first:last]  # [B, blocks]
        b = ids.shape[0]

        def gather(pool: torch.Tensor) -> torch.Tensor:
            flat = pool.index_select(0, ids.reshape(-1)).view(b, -1, *pool.shape[2:])  # [B, blocks * bs, kvh, d]
            return flat[:, start - first * bs:end - first * bs].transpose(1, 2)

        return gather(self.keys[layer]), gather(self.values[layer])

    def advance(self, slots: torch.Tensor, new_tokens: torch.Tensor, token_ids: torch.Tensor | None = None) -> None:
        """After a chunk is written on every layer: record its tokens, hash the blocks it completed (with prefix
        caching), and give back sliding blocks that no later read can reach. The only change to a row's
        state besides `begin_append`'s new blocks (which a retry reuses), and the last step of `encode`: an
        encode that fails leaves the row as it was (the runner retries failed batches row by row)."""
        self.lengths[slots] += new_tokens
        ids = token_ids.tolist() if token_ids is not None else None
        updates: dict[str, list[tuple[int, int]]] = {k.name: [] for k in self.kinds}
        for i, (slot, n) in enumerate(zip(slots.tolist(), new_tokens.tolist())):
            tokens = self.tokens[slot]
            if ids is None:
                self.hashable[slot] = False
            tokens.extend(ids[i][:n] if ids is not None else [-1] * n)
            hashes = self.hashes[slot]
            while (len(hashes) + 1) * self.block_size <= len(tokens):
                j = len(hashes)
                start, end = j * self.block_size, (j + 1) * self.block_size
                hashes.append(chain_hash(hashes[-1] if hashes else ROOT_HASH, tokens[start:end],
                                         self._media_in(self.media[slot], start, end)))
                if self.enable_prefix_caching and self.hashable[slot]:
                    for kind in self.kinds:
                        block = self.blocks[kind.name][slot][j]
                        if block:
                            self.pools[kind.name].register(block, hashes[-1])
            for kind in self.kinds:
                if kind.window is None:
                    continue
                row, trimmed = self.blocks[kind.name][slot], self.trimmed[kind.name]
                unreachable = first_visible(len(tokens), kind.window) // self.block_size
                for j in range(trimmed[slot], unreachable):
                    if row[j]:
                        self.pools[kind.name].release(row[j])
                        row[j] = 0
                        updates[kind.name].append((slot, j))
                trimmed[slot] = max(trimmed[slot], unreachable)
        for name, entries in updates.items():
            if entries:
                idx = torch.tensor(entries, device=self.tables[name].device)
                self.tables[name][idx[:, 0], idx[:, 1]] = 0
