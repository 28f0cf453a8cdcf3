"""A fixed-size replay buffer filled by reservoir sampling (shared by the rehearsal methods).

Every item is a dict of per-example tensors of fixed trailing shape (the caller pads sequences
to one length). Storage is allocated once at the first write, `size` rows per field, so memory
is bounded by `size` whatever the stream length. The random draws come from the buffer's own
generator, whose state is part of `state_dict`, so a resumed run makes the same draws.
"""

from __future__ import annotations

import torch
from torch import Tensor

_SEEN = "seen"
_RNG = "rng"


class ReservoirBuffer:
    """At any time a uniform sample of at most `size` of all examples offered so far."""

    def __init__(self, size: int, seed: int = 0) -> None:
        if size <= 0:
            raise ValueError(f"buffer size must be a positive number of examples, got {size}")
        self.size = size
        self.seen = 0
        self.data: dict[str, Tensor] = {}
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return min(self.seen, self.size)

    def reserve(self, n: int) -> tuple[list[int], list[int]]:
        """Offer n new examples; return (example indices kept, buffer slots they go to).

        Algorithm R: the k-th example offered (0-based) fills slot k while the buffer is not
        full, else replaces a uniform slot with probability size / (k + 1).
        """
        row_of_slot: dict[int, int] = {}
        for i in range(n):
            if self.seen < self.size:
                slot = self.seen
            else:
                slot = int(torch.randint(self.seen + 1, (1,), generator=self.generator))
            self.seen += 1
            if slot < self.size:
                # a later example that draws the same slot overwrites the earlier one; keeping
                # one row per slot matters because an indexed write with repeated indices
                # picks its winner per field (and per thread), mixing two examples' fields
                row_of_slot.pop(slot, None)
                row_of_slot[slot] = i
        return list(row_of_slot.values()), list(row_of_slot)

    def write(self, slots: list[int], items: dict[str, Tensor]) -> None:
        """Store items (first dimension = len(slots)) into the reserved slots."""
        if not slots:
            return
        for key, value in items.items():
            value = value.detach()
            if key not in self.data:
                self.data[key] = value.new_zeros((self.size, *value.shape[1:]))
            self.data[key][torch.tensor(slots, device=value.device)] = value

    def add(self, items: dict[str, Tensor]) -> None:
        """Offer a batch of examples (all fields share the first dimension)."""
        n = next(iter(items.values())).shape[0]
        rows, slots = self.reserve(n)
        index = torch.tensor(rows, dtype=torch.long)
        self.write(slots, {k: v[index.to(v.device)] for k, v in items.items()})

    def sample(self, n: int) -> dict[str, Tensor]:
        """min(n, len) distinct stored examples, uniformly at random."""
        if len(self) == 0:
            raise ValueError("cannot sample from an empty buffer")
        picked = torch.randperm(len(self), generator=self.generator)[:n]
        return {k: v[picked.to(v.device)] for k, v in self.data.items()}

    def state_dict(self, prefix: str = "buffer.") -> dict[str, Tensor]:
        state = {prefix + k: v[: len(self)] for k, v in self.data.items()}
        state[prefix + _SEEN] = torch.tensor([self.seen], dtype=torch.long)
        state[prefix + _RNG] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Tensor], prefix: str = "buffer.",
                        device: torch.device | str | None = None) -> None:
        self.seen = int(state[prefix + _SEEN][0])
        self.generator.set_state(state[prefix + _RNG])
        self.data = {}
        for key, value in state.items():
            name = key[len(prefix):]
            if key.startswith(prefix) and name not in (_SEEN, _RNG):
                full = value.new_zeros((self.size, *value.shape[1:]), device=device)
                full[: value.shape[0]] = value.to(full.device)
                self.data[name] = full
