"""One batched forward over a ragged batch of sequences, each continuing from its own cached length.

Used by the verifier (target model) and by the draft-model drafter. The runner owns the KV pool and the
per-sequence lengths; callers decide what to keep (``truncate``) after looking at the logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from smartspec.runtime.kv_pool import SlotKVPool


@dataclass
class StepRow:
    """One sequence's part of a step: tokens to append, and whether logits are wanted for all of
    them (verification) or only the last (prefill, drafting)."""

    seq_id: str
    tokens: list[int]
    all_logits: bool = True


@dataclass
class StepResult:
    """Logits per row in request order ([n_new, vocab] or [1, vocab]) and the step's measurements."""

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

    # --- the batched step -----------------------------------------------------------------------
    def step(self, rows: list[StepRow]) -> StepResult:
        """Appends each row's tokens to its sequence and returns the requested logits, in one forward
        unless the rows' padded shape would not fit the KV pool (see ``_fit_groups``)."""
        if not rows:
            return StepResult([], 0.0, 0, 0, 0)
        if min(len(r.tokens) for r in rows) < 1:
            raise ValueError("every row of a step needs at least one token")
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
        offsets = torch.arange(n_max)
        positions = torch.tensor(starts)[:, None] + offsets[None, :]  # [batch, n_max]
        # Query at absolute position q sees keys at positions <= q: its own row's history and the new
        # tokens before it. Padded queries see finite stale entries; their outputs are discarded.
        mask = torch.arange(view_len)[None, None, :] <= positions[:, :, None]  # [batch, n_max, view_len]
        cache = self.pool.step_cache([self._slot_of[r.seq_id] for r in batch], positions, view_len)

        started = time.perf_counter()
        hidden = self._decoder(
            input_ids=input_ids.to(device),
            attention_mask=mask[:, None].to(device),  # [batch, 1, n_max, view_len]
            position_ids=positions.to(device),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state  # [batch, n_max, hidden]
        picked = [hidden[b, : counts[b]] if row.all_logits else hidden[b, counts[b] - 1 : counts[b]] for b, row in enumerate(batch)]
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
