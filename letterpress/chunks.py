"""Passes over [positions, vocab] tensors a chunk of positions at a time.

At the released vocabulary (262,144) one [256, vocab] float32 tensor is 268 MB per canvas row, so the LM
head, the self-conditioning input and the sampler's passes that need temporaries work on chunks of
positions whose float32 temporaries stay under `CHUNK_BYTES` (32 positions at that vocabulary). Every
position is computed on its own, so chunking changes no bit (tests/test_step_memory.py).
"""

from __future__ import annotations

CHUNK_BYTES = 32 * 2**20


def position_slices(length: int, vocab: int, chunk_bytes: int | None = None) -> list[slice]:
    """Slices covering range(length), as equal as possible, of at most max(1, chunk_bytes // (4 vocab))
    positions each: a [chunk, vocab] float32 temporary stays under `chunk_bytes` (default: `CHUNK_BYTES`,
    read at call time so that tests can shrink it)."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    per_chunk = max(1, chunk_bytes // (4 * vocab))
    n = max(1, -(-length // per_chunk))
    bounds = [length * i // n for i in range(n + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]
