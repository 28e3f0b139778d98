"""One forward per step over exactly the step's new tokens, for a ragged batch of sequences.

Used by the verifier (target model) and by the draft-model drafters. The runner owns the paged KV cache
and the per-sequence lengths; callers decide what to keep (``truncate``, or ``keep`` for a tree path)
after looking at the logits.

A step flattens every row's new tokens into one ``[1, N]`` input with per-token position ids: the
embeddings, projections, MLP and LM head see no padding at all. Attention (``smartspec.runtime.attention``)
groups rows of equal new-token count and similar context, and pads only the key side within a group.

A row's new tokens are a chain (each follows the one before) or a token tree (each names its parent
among the row's tokens): either way token j is written at position start + j of the row's KV, attends
to the row's history, its ancestors and itself, and sits at position start + depth. A chain is the
tree whose parents are -1, 0, 1, ..., so both go through one layout. See docs/engine.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

from smartspec.runtime.attention import RAGGED, AttentionGroup, RaggedStep
from smartspec.runtime.kv_pool import BLOCK_SIZE, PagedKVCache
from smartspec.tree import depths, parents_problem

# A group may pad its key side by at most this fraction of the keys it really attends to.
GROUP_PADDING = 0.25

# Model types whose every transform is served exactly: decoder layers that call transformers' attention
# interface with the new tokens' keys, and a causal LM head whose only post-processing, if any, is
# final_logit_softcapping (applied here).
SUPPORTED_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma", "gemma2", "gemma3_text"}
)


# RoPE variants whose frequencies depend on the longest position in the forward: in a flat step that is
# another request's, so a request's output would depend on what it is batched with.
BATCH_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


def serving_problem(config) -> str | None:
    """Why the runner cannot serve a model of this config exactly (None: it can)."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (f"model type {model_type!r} is not served: the runner is exact for decoder-only families "
                f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kinds = [rope.get("rope_type")] + [v.get("rope_type") for v in rope.values() if isinstance(v, dict)]
    odd = sorted({k for k in kinds if k in BATCH_DEPENDENT_ROPE})
    if odd:
        return (f"model type {model_type!r} with rope_type {odd[0]!r} is not served: its rotary frequencies depend on "
                "the longest position in a forward, so a request's output would depend on what it is batched with")
    return None


def check_supported(model: torch.nn.Module) -> None:
    """Refuses, with a message that says why, a model the runner cannot serve exactly."""
    problem = serving_problem(model.config)
    if problem is not None:
        raise ValueError(problem)


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a model's KV cache, from its config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


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
    # Offsets of the tokens whose logits are returned, in this order (overrides all_logits; empty: none,
    # as for a prefill chunk that does not end its context).
    logits_at: list[int] | None = None

    def picked(self) -> list[int]:
        """The offsets whose logits this row returns."""
        if self.logits_at is not None:
            return self.logits_at
        n = len(self.tokens)
        return list(range(n)) if self.all_logits else [n - 1]


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


def group_layout(starts: list[int], rows: list[StepRow], kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and attention mask of one attention group: rows of equal new-token count n, row b's
    tokens written at columns starts[b] .. starts[b] + n - 1 of its own key row.

    Returns position ids [rows, n] (start + depth) and the mask [rows, n, kv_len]: a query sees its
    row's history (columns < start) and, among the new columns, its ancestors and itself; columns past
    the row's end (key padding) are seen by nobody.
    """
    n = len(rows[0].tokens)
    if all(row.parents is None for row in rows):  # chains (the usual step): one causal block shared by all
        chain_sees, chain_depth = ancestry(None, n)
        sees, depth = [chain_sees] * len(rows), [chain_depth] * len(rows)
    else:
        sees, depth = zip(*(ancestry(row.parents, n) for row in rows))
    start = torch.tensor(starts)  # [rows]
    rel = torch.arange(kv_len)[None, :] - start[:, None]  # [rows, kv_len]: column - start
    new = (rel >= 0) & (rel < n)
    index = rel.clamp(0, n - 1)[:, None, :].expand(len(rows), n, kv_len)  # [rows, n, kv_len]
    mask = (rel < 0)[:, None, :] | (new[:, None, :] & torch.stack(sees).gather(2, index))
    return start[:, None] + torch.stack(depth), mask


def group_rows(rows: list[tuple[int, int]], padding: float = GROUP_PADDING) -> list[list[int]]:
    """Splits rows, given as (new tokens, attended length), into attention groups: equal new-token
    counts, and lengths close enough that padding every row to the group's longest costs at most
    `padding` of the keys really attended. Returns row indices per group, longest first."""
    by_count: dict[int, list[int]] = {}
    for i, (count, _) in enumerate(rows):
        by_count.setdefault(count, []).append(i)
    groups: list[list[int]] = []
    for members in by_count.values():
        members.sort(key=lambda i: rows[i][1], reverse=True)
        current: list[int] = []
        attended = 0
        for i in members:
            length = rows[i][1]
            longest = rows[current[0]][1] if current else length
            if current and longest * (len(current) + 1) > (1 + padding) * (attended + length):
                groups.append(current)
                current, attended = [], 0
            current.append(i)
            attended += length
        groups.append(current)
    return groups


@dataclass
class StepResult:
    """Logits per row in request order ([n_picked, vocab]: see StepRow.picked) and the step's measurements.
    The rows' logits are views of one flat tensor, `flat_logits`, in which row i's start at `first_rows[i]`
    (batched consumers index it instead of concatenating the views)."""

    logits: list[torch.Tensor]
    forward_s: float
    new_tokens: int
    context_tokens: int
    num_forwards: int = 1
    flat_logits: torch.Tensor | None = None
    first_rows: list[int] = field(default_factory=list)


class BatchedRunner:
    """Runs a Hugging Face causal LM over ragged steps (flat new tokens, per-token positions) with a
    paged KV cache of `kv_cache_tokens` tokens (default: room for every sequence at the context limit)."""

    def __init__(self, model: torch.nn.Module, max_sequences: int, max_context: int, kv_cache_tokens: int | None = None) -> None:
        check_supported(model)
        config = model.config
        model.set_attn_implementation(RAGGED)
        self.model = model
        self.max_sequences = max_sequences
        self.max_context = max_context
        self._decoder = model.get_decoder()
        self._head = model.get_output_embeddings()
        self._final_softcap = getattr(config, "final_logit_softcapping", None)
        param = next(model.parameters())
        self._device = param.device
        layers, kv_heads, head_dim = kv_shape(config)
        tokens = kv_cache_tokens if kv_cache_tokens is not None else max_sequences * (max_context + BLOCK_SIZE)
        self.cache = PagedKVCache(layers, kv_heads, head_dim, max(1, -(-tokens // BLOCK_SIZE)), param.dtype, self._device)

    # --- sequence bookkeeping -------------------------------------------------------------------
    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self.cache

    @property
    def live(self) -> int:
        return len(self.cache)

    @property
    def used_tokens(self) -> int:
        return self.cache.used_tokens

    @property
    def capacity_tokens(self) -> int:
        return self.cache.capacity_tokens

    def length(self, seq_id: str) -> int:
        """Tokens of `seq_id` held in the KV cache."""
        return self.cache.length(seq_id)

    def admit(self, seq_id: str) -> None:
        """Starts a new, empty sequence."""
        if self.live >= self.max_sequences:
            raise OverflowError(f"all {self.max_sequences} sequence slots are in use")
        self.cache.admit(seq_id)

    def release(self, seq_id: str) -> bool:
        """Frees a sequence's blocks; returns whether it was live."""
        return self.cache.release(seq_id)

    def truncate(self, seq_id: str, length: int) -> None:
        """Cuts a sequence's cache back to its first `length` tokens (rollback after a rejection)."""
        if not 0 <= length <= self.cache.length(seq_id):
            raise ValueError(f"cannot truncate {seq_id!r} from {self.cache.length(seq_id)} to {length}")
        self.cache.set_length(seq_id, length)

    def keep(self, seq_id: str, start: int, offsets: list[int]) -> None:
        """Keeps, of the tokens fed at `start` by the last step, those at `offsets` (increasing: an
        accepted tree path, root first), moved to positions start, start + 1, ... in sequence order;
        the rest is cut. For a chain's accepted prefix (offsets 0..n-1) this is a plain truncate."""
        fed = self.cache.length(seq_id) - start
        if any(not 0 <= o < fed for o in offsets) or any(a >= b for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"cannot keep offsets {offsets} of the {fed} tokens {seq_id!r} was fed at {start}")
        if offsets != list(range(len(offsets))):
            self.cache.copy_positions(seq_id, [start + o for o in offsets], start)
        self.truncate(seq_id, start + len(offsets))

    # --- the step -------------------------------------------------------------------------------
    def step(self, rows: list[StepRow]) -> StepResult:
        """Appends each row's tokens to its sequence and returns the requested logits, in one forward.
        Raises KVCacheFull (nothing changed) when the cache cannot hold the new tokens."""
        if not rows:
            return StepResult([], 0.0, 0, 0, 0)
        if min(len(r.tokens) for r in rows) < 1:
            raise ValueError("every row of a step needs at least one token")
        if len({r.seq_id for r in rows}) != len(rows):
            raise ValueError("a sequence appears twice in one step")
        for row in rows:
            if row.logits_at is not None and any(not 0 <= o < len(row.tokens) for o in row.logits_at):
                raise ValueError(f"row {row.seq_id!r}: logits asked at {row.logits_at} but it has {len(row.tokens)} tokens")
        starts = [self.cache.length(r.seq_id) for r in rows]
        for row, start in zip(rows, starts):  # positions count a tree's depth; its KV takes all its nodes
            end = start + (max(depths(row.parents)) if row.parents is not None else len(row.tokens))
            if end > self.max_context:
                raise ValueError(f"row {row.seq_id!r} would reach position {end}, over the context limit {self.max_context}")
        self.cache.reserve({r.seq_id: s + len(r.tokens) for r, s in zip(rows, starts)})
        try:
            return self._forward(rows, starts)
        except BaseException:
            for row, start in zip(rows, starts):
                self.cache.set_length(row.seq_id, start)
            raise

    def _layout(self, rows: list[StepRow], starts: list[int]) -> tuple[list[int], RaggedStep, torch.Tensor, torch.Tensor, list[list[int]]]:
        """The flat order of rows (grouped for attention), the attention plan, input ids [N], position
        ids [N] and, per row in flat order, the flat indices of the tokens whose logits it returns."""
        counts = [len(r.tokens) for r in rows]
        groups = group_rows([(n, s + n) for n, s in zip(counts, starts)])
        order = [i for group in groups for i in group]
        device = self._device
        ids, positions, writes, picks = [], [], [], []
        plans: list[AttentionGroup] = []
        flat = 0
        for group in groups:
            n = counts[group[0]]
            kv_len = max(starts[i] + n for i in group)
            members, member_starts = [rows[i] for i in group], [starts[i] for i in group]
            query_pos, mask = group_layout(member_starts, members, kv_len)  # [rows, n], [rows, n, kv_len]
            slots = [self.cache.slots(row.seq_id, 0, start + n) for row, start in zip(members, member_starts)]
            for row, start, row_slots, row_pos in zip(members, member_starts, slots, query_pos):
                ids.append(torch.tensor(row.tokens, dtype=torch.long))
                positions.append(row_pos)
                writes.append(row_slots[start:])
                picks.append([flat + o for o in row.picked()])
                flat += n
            # a lone row without history is plain causal attention; single queries over equal lengths see everything
            causal = len(group) == 1 and member_starts[0] == 0 and members[0].parents is None
            unmasked = causal or (n == 1 and all(start + 1 == kv_len for start in member_starts))
            plans.append(
                AttentionGroup(
                    token_start=flat - n * len(group), rows=len(group), queries=n, kv_len=kv_len,
                    gather=pad_sequence(slots, batch_first=True).reshape(-1).to(device),  # key padding reads slot 0, masked
                    mask=None if unmasked else mask[:, None].to(device),  # [rows, 1, n, kv_len]
                    causal=causal,
                    query_positions=query_pos.to(device),
                    last_position=int(query_pos.max()),
                    starts=torch.tensor(member_starts, device=device),
                )
            )
        step = RaggedStep(self.cache, torch.cat(writes).to(device), plans, flat)
        return order, step, torch.cat(ids), torch.cat(positions), picks

    @torch.inference_mode()
    def _forward(self, rows: list[StepRow], starts: list[int]) -> StepResult:
        order, plan, input_ids, positions, picks = self._layout(rows, starts)
        device = self._device
        started = time.perf_counter()
        hidden = self._decoder(
            input_ids=input_ids[None].to(device),  # [1, N]
            position_ids=positions[None].to(device),  # [1, N]
            use_cache=False,
            ragged_step=plan,
        ).last_hidden_state[0]  # [N, hidden]
        flat_picks = [p for row_picks in picks for p in row_picks]
        logits = self._head(hidden[torch.tensor(flat_picks, dtype=torch.long, device=device)]).float()  # [picked, vocab]
        if self._final_softcap is not None:
            logits = torch.tanh(logits / self._final_softcap) * self._final_softcap
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        forward_s = time.perf_counter() - started
        per_row = torch.split(logits, [len(p) for p in picks])
        result: list[torch.Tensor] = [torch.empty(0)] * len(rows)
        first_rows = [0] * len(rows)
        offset = 0
        for i, out in zip(order, per_row):
            result[i], first_rows[i] = out, offset
            offset += out.shape[0]
        for row, start in zip(rows, starts):
            self.cache.set_length(row.seq_id, start + len(row.tokens))
        return StepResult(result, forward_s, plan.num_tokens, sum(starts), flat_logits=logits, first_rows=first_rows)
