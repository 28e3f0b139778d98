"""A slot-pooled KV cache: every live sequence owns one row of per-layer tensors, with its own length.

transformers' DynamicCache crops every row of a batch alike and has no per-row position, so it cannot
hold a ragged batch whose rows are rolled back independently. Here each layer keeps
``keys[l]: [slots, kv_heads, capacity, head_dim]`` (values alike). A step writes each row's new
keys at that row's own positions and hands attention a view of the slots it touches; rows are cut back
by the owner simply lowering their length (stale entries beyond it are masked, then overwritten), and
an accepted tree path is compacted into sequence order with ``gather``.

Live sequences are kept in slots ``0..live-1`` (a release moves the last slot into the hole), so a step
over a contiguous range of slots attends to a zero-copy view; any other set of slots is gathered.
"""

from __future__ import annotations

import torch


class SlotKVPool:
    """Per-layer K/V storage for up to ``max_slots`` sequences of up to ``max_len`` tokens each.

    Storage grows lazily (doubling) in both slots and length, so memory follows what is in use.
    Unused entries stay zero (finite): a masked NaN would still leak through SDPA attention.
    """

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        max_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
        initial_slots: int = 4,
        initial_len: int = 256,
    ) -> None:
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.max_len = max_len
        self._shape = (kv_heads, head_dim)
        self._dtype = dtype
        self._device = torch.device(device)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._alloc(min(initial_slots, max_slots), min(initial_len, max_len))

    @property
    def allocated_slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def allocated_len(self) -> int:
        return self.keys[0].shape[2]

    # Storage is created and changed only in inference mode: tensors made inside it (growth happens
    # during a forward) may not be updated in place outside it.
    @torch.inference_mode()
    def _alloc(self, slots: int, length: int) -> None:
        heads, dim = self._shape
        old_k, old_v = self.keys, self.values
        self.keys = [torch.zeros(slots, heads, length, dim, dtype=self._dtype, device=self._device) for _ in range(self.num_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        for new, old in zip(self.keys + self.values, old_k + old_v):
            s, _, n, _ = old.shape
            new[:s, :, :n].copy_(old)

    def ensure(self, slots: int, length: int) -> None:
        """Grows storage to hold at least `slots` slots of `length` positions each."""
        if slots > self.max_slots or length > self.max_len:
            raise ValueError(f"KV pool limit: {slots}/{self.max_slots} slots, {length}/{self.max_len} positions")
        new_slots, new_len = self.allocated_slots, self.allocated_len
        while new_slots < slots:
            new_slots = min(2 * new_slots, self.max_slots)
        while new_len < length:
            new_len = min(2 * new_len, self.max_len)
        if (new_slots, new_len) != (self.allocated_slots, self.allocated_len):
            self._alloc(new_slots, new_len)

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        """Copies the first `length` positions of slot `src` into slot `dst` (used to close holes)."""
        for tensor in self.keys + self.values:
            tensor[dst, :, :length].copy_(tensor[src, :, :length])

    @torch.inference_mode()
    def gather(self, slot: int, src: list[int], dst: int) -> None:
        """Copies positions `src` of `slot`, in that order, to positions dst, dst + 1, ...: an accepted
        tree path, written where the step's tokens went, is moved into sequence order (the source is
        read whole before anything is written, so the ranges may overlap)."""
        index = torch.tensor(src, dtype=torch.long, device=self._device)  # [n]
        for tensor in self.keys + self.values:
            tensor[slot, :, dst : dst + len(src)] = tensor[slot, :, index]

    def step_cache(self, slots: list[int], write_positions: torch.Tensor, view_len: int) -> "StepCache":
        """The cache object to pass a model as ``past_key_values`` for one batched step.

        slots: the slot of each batch row. write_positions: [batch, n_new], where each row's new
        tokens go. view_len: how many positions of each row attention sees (covers every write).
        """
        return StepCache(self, slots, write_positions, view_len)


class StepCache:
    """What a transformers decoder layer sees as its cache for one step: ``update`` stores the new
    keys/values at each row's own positions and returns the row's whole (masked later) history."""

    def __init__(self, pool: SlotKVPool, slots: list[int], write_positions: torch.Tensor, view_len: int) -> None:
        self._pool = pool
        device = pool.keys[0].device
        self._rows = torch.tensor(slots, dtype=torch.long, device=device)[:, None]  # [batch, 1]
        self._cols = write_positions.to(device)  # [batch, n_new]
        self._view_len = view_len
        first = slots[0]
        contiguous = slots == list(range(first, first + len(slots)))
        self._slice = slice(first, first + len(slots)) if contiguous else None
        self._gather = None if contiguous else self._rows[:, 0]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states: [batch, kv_heads, n_new, head_dim] -> [batch, kv_heads, view_len, head_dim]."""
        keys, values = self._pool.keys[layer_idx], self._pool.values[layer_idx]
        # Indexing [rows, :, cols] addresses a [batch, n_new, kv_heads, head_dim] block.
        keys[self._rows, :, self._cols] = key_states.transpose(1, 2)
        values[self._rows, :, self._cols] = value_states.transpose(1, 2)
        if self._slice is not None:
            return keys[self._slice, :, : self._view_len], values[self._slice, :, : self._view_len]
        return keys[self._gather, :, : self._view_len], values[self._gather, :, : self._view_len]
