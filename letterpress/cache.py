"""The encoder's KV cache: preallocated, one slot per row, append-only.

`encode` writes a row's new tokens at the end of its slot; `denoise` only reads. Sliding-window layers keep
every position (the window is applied by the attention mask), which keeps the plain path simple; see
`visible_from` for the exact window semantics we match.
"""

from __future__ import annotations

import torch

from .config import TextConfig
from .errors import RequestError


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

    def check_room(self, slots: torch.Tensor, new_tokens: torch.Tensor) -> None:
        end = self.lengths[slots] + new_tokens
        if bool((end > self.capacity).any()):
            raise RequestError(f"context too long: {int(end.max())} tokens exceed the cache capacity of {self.capacity}")

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the valid tokens of a right-padded chunk. k, v: [B, T, kv_heads, d]; positions, valid: [B, T]."""
        rows = slots[:, None].expand_as(positions)[valid]
        pos = positions[valid]
        self.keys[layer][rows, :, pos] = k[valid].to(self.keys[layer].dtype)
        self.values[layer][rows, :, pos] = v[valid].to(self.values[layer].dtype)

    def advance(self, slots: torch.Tensor, new_tokens: torch.Tensor) -> None:
        self.lengths[slots] += new_tokens


def visible_from(lengths: torch.Tensor, window: int | None) -> torch.Tensor:
    """First cached position a canvas query may read: a sliding layer sees the last `window - 1` prefix tokens
    (what transformers' dynamic sliding cache retains), a full layer sees them all."""
    if window is None:
        return torch.zeros_like(lengths)
    return (lengths - (window - 1)).clamp(min=0)
