"""One batched forward over a ragged batch of sequences, each continuing from its own cached length.

Used by the verifier (target model) and by the draft-model drafters. The runner owns the KV pool and the
per-sequence lengths; callers decide what to keep (``truncate``, or ``keep`` for a tree path) after
looking at the logits.

A row's new tokens are a chain (each follows the one before) or a token tree (each names its parent
among the row's tokens): either way token j is written at column start + j of the row's KV, attends to
the row's history, its ancestors and itself, and sits at position start + depth. A chain is simply the
tree whose parents are -1, 0, 1, ..., so both go through one mask.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from smartspec.runtime.kv_pool import SlotKVPool
from smartspec.tree import depths, parents_problem


@dataclass
class StepRow:
    """One sequence's part of a step: tokens to append, and whether logits are wanted for all of
    them (verification) or only the last (prefill, drafting)."""

    seq_id: str
    tokens: list[int]
    all_logits: bool = True
    # A token tree: per token, the index of its parent among this row's tokens, or -1 for a token that
    # follows the cached history directly (it sits at position start). None: a chain.
    parents: list[int] | None = None
    # Offsets of the tokens whose logits are returned, in this order (overrides all_logits).
    logits_at: list[int] | None = None

    def picked(self) -> list[int] | slice:
        """The offsets whose logits this row returns."""
        if self.logits_at is not None:
            return self.logits_at
        return slice(0, len(self.tokens)) if self.all_logits else slice(len(self.tokens) - 1, len(self.tokens))


def ancestry(parents: list[int] | None, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a row of `count` new tokens: which tokens each one sees among them ([count, count] bool:
    its ancestors and itself) and each one's offset from the row's start ([count]: its depth, where a
    child of the history has depth 0). None is a chain: lower-triangular, offsets 0..count-1."""
    if parents is None:
        return torch.ones(count, count, dtype=torch.bool).tril(), torch.arange(count)
    problem = parents_problem(parents, count)
    if problem is not None:
        raise ValueError(f"row parents {parents} do not describe a tree: {problem}")
    sees = torch.eye(count, dtype=torch.bool)  # [count, count]
    for j, parent in enumerate(parents):
        if parent >= 0:
            sees[j] |= sees[parent]
    return sees, torch.tensor(depths(parents)) - 1  # a child of the history sits at offset 0


def step_layout(starts: list[int], rows: list[StepRow], view_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where one batched step writes, which positions it uses and what each query sees.

    Returns columns [batch, n_max] (token j of row b is written at starts[b] + j), position ids
    [batch, n_max] (starts[b] + depth) and the attention mask [batch, n_max, view_len]: a query sees
    its row's history (columns < starts[b]) and, among the new columns, its ancestors and itself.
    Padding queries (past a row's count) see causally, so no query sees nothing; their outputs are
    discarded.
    """
    counts = [len(r.tokens) for r in rows]
    n_max = max(counts)
    offsets = torch.arange(n_max)  # [n_max]
    start = torch.tensor(starts)  # [batch]
    columns = start[:, None] + offsets[None, :]  # [batch, n_max]
    if all(row.parents is None for row in rows):  # chains only (the usual step): plain causal, ~5x cheaper
        mask = torch.arange(view_len)[None, None, :] <= columns[:, :, None]  # [batch, n_max, view_len]
        return columns, columns, mask
    block = torch.ones(len(rows), n_max, n_max, dtype=torch.bool).tril()  # [batch, n_max, n_max]: new token sees new token
    positions = columns.clone()  # [batch, n_max]
    for b, row in enumerate(rows):
        if row.parents is not None:
            sees, depth = ancestry(row.parents, counts[b])
            block[b, : counts[b], : counts[b]] = sees
            positions[b, : counts[b]] = starts[b] + depth
    relative = torch.arange(view_len)[None, None, :] - start[:, None, None]  # [batch, 1, view_len]: column - start
    new = (relative >= 0) & (relative < n_max)  # [batch, 1, view_len]
    index = relative.clamp(0, n_max - 1).expand(len(rows), n_max, view_len)  # [batch, n_max, view_len]
    mask = (relative < 0) | (new & block.gather(2, index))  # [batch, n_max, view_len]
    return columns, positions, mask


@dataclass
class StepResult:
    """Logits per row in request order ([n_picked, vocab]: see StepRow.picked) and the step's measurements."""

    logits: list[torch.Tensor]
    forward_s: float
    new_tokens: int
    context_tokens: int
    num_forwards: int = 1


class BatchedRunner:
    """Runs a Hugging Face causal LM (a decoder whose logits are ``lm_head(hidden)``, e.g. Llama, Qwen2,
    Mistral) over ragged batches with per-row positions, attention masks and KV rows."""

    def __init__(self, model: torch.nn.Module, max_sequences: int, max_context: int, step_slack: int = 64) -> None:
        config = model.config
        self.model = model
        self.max_sequences = max_sequences
        self.max_context = max_context
        self._decoder = model.get_decoder()
        self._head = model.get_output_embeddings()
        self._device = next(model.parameters()).device
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        # Padded rows write a few positions past their own end: leave room beyond the context limit.
        self.pool = SlotKVPool(
            num_layers=config.num_hidden_layers,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            max_slots=max_sequences,
            max_len=max_context + step_slack,
            dtype=next(model.parameters()).dtype,
            device=self._device,
        )
        self._slot_of: dict[str, int] = {}
        self._length: dict[str, int] = {}
        self._slot_owner: list[str] = []  # slot -> seq_id; live slots are always 0..live-1

    # --- sequence bookkeeping -------------------------------------------------------------------
    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._slot_of

    @property
    def live(self) -> int:
        return len(self._slot_owner)

    @property
    def used_tokens(self) -> int:
        return sum(self._length.values())

    def length(self, seq_id: str) -> int:
        """Tokens of `seq_id` held in the KV cache."""
        return self._length[seq_id]

    def admit(self, seq_id: str) -> None:
        """Gives a new sequence an empty KV row."""
        if seq_id in self._slot_of:
            raise KeyError(f"sequence {seq_id!r} is already live")
        if self.live >= self.max_sequences:
            raise OverflowError(f"all {self.max_sequences} sequence slots are in use")
        slot = self.live
        self.pool.ensure(slot + 1, self.pool.allocated_len)
        self._slot_owner.append(seq_id)
        self._slot_of[seq_id] = slot
        self._length[seq_id] = 0

    def release(self, seq_id: str) -> bool:
        """Frees a sequence's row; returns whether it was live. The last slot moves into the hole."""
        slot = self._slot_of.pop(seq_id, None)
        if slot is None:
            return False
        del self._length[seq_id]
        last_owner = self._slot_owner.pop()
        if last_owner != seq_id:
            self.pool.move(len(self._slot_owner), slot, self._length[last_owner])
            self._slot_owner[slot] = last_owner
            self._slot_of[last_owner] = slot
        return True

    def truncate(self, seq_id: str, length: int) -> None:
        """Cuts a sequence's cache back to its first `length` tokens (rollback after a rejection)."""
        if not 0 <= length <= self._length[seq_id]:
            raise ValueError(f"cannot truncate {seq_id!r} from {self._length[seq_id]} to {length}")
        self._length[seq_id] = length

    def keep(self, seq_id: str, start: int, offsets: list[int]) -> None:
        """Keeps, of the tokens fed at `start` by the last step, those at `offsets` (increasing: an
        accepted tree path, root first), moved to positions start, start + 1, ... in sequence order;
        the rest is cut. For a chain's accepted prefix (offsets 0..n-1) this is a plain truncate."""
        fed = self._length[seq_id] - start
        if any(not 0 <= o < fed for o in offsets) or any(a >= b for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"cannot keep offsets {offsets} of the {fed} tokens {seq_id!r} was fed at {start}")
        if offsets != list(range(len(offsets))):
            self.pool.gather(self._slot_of[seq_id], [start + o for o in offsets], start)
        self.truncate(seq_id, start + len(offsets))

    # --- the batched step -----------------------------------------------------------------------
    def step(self, rows: list[StepRow]) -> StepResult:
        """Appends each row's tokens to its sequence and returns the requested logits, in one forward
        unless the rows' padded shape would not fit the KV pool (see ``_fit_groups``)."""
        if not rows:
            return StepResult([], 0.0, 0, 0, 0)
        if min(len(r.tokens) for r in rows) < 1:
            raise ValueError("every row of a step needs at least one token")
        for row in rows:
            if row.logits_at is not None and any(not 0 <= o < len(row.tokens) for o in row.logits_at):
                raise ValueError(f"row {row.seq_id!r}: logits asked at {row.logits_at} but it has {len(row.tokens)} tokens")
        logits: dict[str, torch.Tensor] = {}
        total = StepResult([], 0.0, 0, 0, 0)
        for group in self._fit_groups(rows):
            part = self._forward(group)
            logits.update((row.seq_id, out) for row, out in zip(group, part.logits))
            total.forward_s += part.forward_s
            total.new_tokens += part.new_tokens
            total.context_tokens += part.context_tokens
            total.num_forwards += 1
        total.logits = [logits[row.seq_id] for row in rows]
        return total

    def _fit_groups(self, rows: list[StepRow]) -> list[list[StepRow]]:
        """Splits rows so that no forward's padded view passes the KV pool's length limit.

        A forward pads every row to the longest one and attends over max(start) + that many positions,
        so a long new prompt beside a long-running sequence can overflow the pool although each fits on
        its own. Almost always one group.
        """
        limit = self.pool.max_len
        groups: list[tuple[int, int, list[StepRow]]] = []  # (max start, max count, rows)
        for row in sorted(rows, key=lambda r: len(r.tokens), reverse=True):
            start = self._length[row.seq_id]
            for g, (g_start, g_count, members) in enumerate(groups):
                if max(g_start, start) + g_count <= limit:
                    groups[g] = (max(g_start, start), g_count, members + [row])
                    break
            else:
                groups.append((start, len(row.tokens), [row]))
        return [members for _, _, members in groups]

    @torch.inference_mode()
    def _forward(self, rows: list[StepRow]) -> StepResult:
        """One batched forward over rows whose padded view fits the pool."""
        order = sorted(range(len(rows)), key=lambda i: self._slot_of[rows[i].seq_id])
        batch = [rows[i] for i in order]
        starts = [self._length[r.seq_id] for r in batch]
        counts = [len(r.tokens) for r in batch]
        n_max = max(counts)
        view_len = max(starts) + n_max
        self.pool.ensure(self.live, view_len)

        device = self._device
        input_ids = torch.zeros(len(batch), n_max, dtype=torch.long)  # [batch, n_max], padded with id 0
        for b, row in enumerate(batch):
            input_ids[b, : counts[b]] = torch.tensor(row.tokens, dtype=torch.long)
        # Padded queries see finite stale entries; their outputs are discarded.
        columns, positions, mask = step_layout(starts, batch, view_len)  # [batch, n_max] x2, [batch, n_max, view_len]
        cache = self.pool.step_cache([self._slot_of[r.seq_id] for r in batch], columns, view_len)

        started = time.perf_counter()
        hidden = self._decoder(
            input_ids=input_ids.to(device),
            attention_mask=mask[:, None].to(device),  # [batch, 1, n_max, view_len]
            position_ids=positions.to(device),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state  # [batch, n_max, hidden]
        picked = [hidden[b, row.picked()] for b, row in enumerate(batch)]  # [n_picked, hidden] per row
        logits = self._head(torch.cat(picked)).float()  # [sum of picked, vocab]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        forward_s = time.perf_counter() - started

        per_row = list(torch.split(logits, [p.shape[0] for p in picked]))
        for row, start, count in zip(batch, starts, counts):
            self._length[row.seq_id] = start + count
        result = [torch.empty(0)] * len(rows)
        for b, original in enumerate(order):
            result[original] = per_row[b]
        return StepResult(result, forward_s, sum(counts), sum(starts))
