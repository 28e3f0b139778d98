"""A paged KV cache: a fixed budget of token slots, handed out to sequences in fixed-size blocks.

Every layer keeps ``keys[l]: [num_blocks * block_size, kv_heads, head_dim]`` (values alike), allocated
and touched once at start-up, so the process's memory is what ``--kv-cache-gb`` says from the first
request on. A sequence owns a *block table* (the ids of its blocks, in order); its token at position p
lives in slot ``table[p // block_size] * block_size + p % block_size``. Memory follows the tokens held:
a sequence wastes at most one partly filled block, and a rollback (a rejected draft) only lowers the
sequence's length and returns the blocks it no longer reaches.

Attention reads a sequence's history by gathering its slots (``slots``): one copy of the keys and values
it attends to, against three in the padded layout's ``repeat_kv`` for a model with 3 query heads per KV
head (``bench/kv_gather.py`` measured the gather at 0.42-0.46x of that copy's time). See docs/engine.md.
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 16  # tokens per block: small enough to waste little, large enough for short block tables


class KVCacheFull(RuntimeError):
    """The cache has fewer free blocks than an operation needs; nothing was changed."""


def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """What one cached token costs: a key and a value per layer."""
    return 2 * num_layers * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


class PagedKVCache:
    """Per-layer K/V storage of ``num_blocks`` blocks, and the block table of every live sequence."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        num_blocks: int,
        dtype: torch.dtype,
        device: torch.device | str,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        slots = num_blocks * block_size
        # torch.zeros writes every page now: the budget is paid at start-up, not by the first long prompt.
        # Unused entries stay zero (finite): a masked NaN would still leak through attention.
        with torch.inference_mode():
            self.keys = [torch.zeros(slots, kv_heads, head_dim, dtype=dtype, device=self.device) for _ in range(num_layers)]
            self.values = [torch.zeros_like(k) for k in self.keys]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: low ids are handed out first
        self._tables: dict[str, list[int]] = {}
        self._length: dict[str, int] = {}

    # --- capacity -------------------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def extra_blocks(self, seq_id: str, length: int) -> int:
        """Blocks `seq_id` would need beyond what it holds to reach `length` tokens."""
        return max(0, self.blocks_for(length) - len(self._tables[seq_id]))

    # --- sequences ------------------------------------------------------------------------------
    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def __len__(self) -> int:
        return len(self._tables)

    @property
    def used_tokens(self) -> int:
        return sum(self._length.values())

    def length(self, seq_id: str) -> int:
        return self._length[seq_id]

    def admit(self, seq_id: str) -> None:
        if seq_id in self._tables:
            raise KeyError(f"sequence {seq_id!r} is already live")
        self._tables[seq_id] = []
        self._length[seq_id] = 0

    def release(self, seq_id: str) -> bool:
        """Returns the sequence's blocks; whether it was live."""
        table = self._tables.pop(seq_id, None)
        if table is None:
            return False
        del self._length[seq_id]
        self._free.extend(reversed(table))
        return True

    def reserve(self, lengths: dict[str, int]) -> None:
        """Gives each sequence the blocks to hold `lengths[seq]` tokens, all or nothing
        (KVCacheFull, with nothing allocated, when the free blocks do not cover them)."""
        needed = {seq: self.extra_blocks(seq, n) for seq, n in lengths.items()}
        total = sum(needed.values())
        if total > len(self._free):
            raise KVCacheFull(
                f"the KV cache needs {total} more blocks of {self.block_size} tokens but has {len(self._free)} free "
                f"of {self.num_blocks} ({self.capacity_tokens} tokens in all)"
            )
        for seq, count in needed.items():
            self._tables[seq].extend(self._free.pop() for _ in range(count))

    def set_length(self, seq_id: str, length: int) -> None:
        """Sets how many tokens the sequence holds (its blocks must reach that far); blocks past the
        new end go back to the free list, so a rejected draft frees what it took."""
        table = self._tables[seq_id]
        keep = self.blocks_for(length)
        if keep > len(table):
            raise ValueError(f"sequence {seq_id!r} holds {len(table)} blocks, too few for {length} tokens")
        self._free.extend(reversed(table[keep:]))
        del table[keep:]
        self._length[seq_id] = length

    # --- addressing -----------------------------------------------------------------------------
    def slots(self, seq_id: str, start: int, stop: int) -> torch.Tensor:
        """The cache slots of positions start..stop-1 of a sequence ([stop - start], on the CPU)."""
        table = torch.tensor(self._tables[seq_id], dtype=torch.long)
        positions = torch.arange(start, stop)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    @torch.inference_mode()
    def copy_positions(self, seq_id: str, src: list[int], dst: int) -> None:
        """Copies positions `src` of a sequence, in that order, to positions dst, dst + 1, ...: an
        accepted tree path, written where the step's tokens went, is moved into sequence order (the
        source is read whole before anything is written, so the ranges may overlap)."""
        source = self.slots(seq_id, 0, max(src) + 1)[src].to(self.device)
        target = self.slots(seq_id, dst, dst + len(src)).to(self.device)
        for tensor in self.keys + self.values:
            tensor[target] = tensor[source]
