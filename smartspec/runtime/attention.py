"""Attention over a flat ragged step: every row's new tokens in one ``[1, N]`` forward, each seeing its own
request's cached history and its ancestors among the new tokens, read from the paged KV cache.

The model runs with ``attn_implementation=RAGGED``: its projections, MLP and head see only the step's N
new tokens, and at each layer ``ragged_attention`` (registered with transformers' AttentionInterface)
writes the new keys and values into the cache and attends group by group. A group is rows with the same
number of new tokens and similar context lengths: one SDPA call over ``[rows, heads, n, longest context]``
with only the key side padded, so the cost follows each request's own context (one call over every row
with a block-diagonal mask would cost N x total context) without one Python call per request.

SDPA gets the KV heads as they are (``enable_gqa``): nothing repeats them per query head. Models with
attention-logit soft-capping (Gemma 2) take an exact eager path, since SDPA cannot cap. No mask function
is registered for RAGGED, so transformers builds no mask at all (its mask helpers return None for an
attention implementation they do not know). See docs/engine.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from smartspec.runtime.kv_pool import PagedKVCache

RAGGED = "smartspec_ragged"


@dataclass
class AttentionGroup:
    """Rows sharing one SDPA call: ``rows`` rows of ``queries`` new tokens each, whose flat tokens are
    ``token_start .. token_start + rows * queries`` (row-major), attending over ``kv_len`` key columns."""

    token_start: int
    rows: int
    queries: int
    kv_len: int
    gather: torch.Tensor  # [rows * kv_len]: cache slot of each key column (padding columns: any slot)
    mask: torch.Tensor | None  # [rows, 1, queries, kv_len] bool; None: every query sees every column
    causal: bool  # one row without history: plain causal attention, no mask needed
    query_positions: torch.Tensor  # [rows, queries]
    starts: torch.Tensor  # [rows]: cached length of each row (its new tokens sit at columns start..)
    last_position: int  # the largest query position: no device sync to learn it per layer
    _windowed: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def token_stop(self) -> int:
        return self.token_start + self.rows * self.queries

    def mask_for(self, sliding_window: int | None) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for a layer with this sliding window (None: full attention)."""
        if sliding_window is None or self.last_position < sliding_window:
            return self.mask, self.causal
        if sliding_window not in self._windowed:
            # transformers' rule: a query at position q sees keys at positions k with q - k < window.
            near = (self.query_positions[:, :, None] - self._key_positions()[:, None, :]) < sliding_window  # [rows, queries, kv_len]
            base = self.mask if self.mask is not None else self._causal_mask()
            self._windowed[sliding_window] = base & near[:, None]
        return self._windowed[sliding_window], False

    def _key_positions(self) -> torch.Tensor:
        """[rows, kv_len]: the position of each key column: its column in the history, the new token's
        own position among the new columns, far in the future for key padding. Built only for layers
        with a sliding window that a query can reach past."""
        columns = torch.arange(self.kv_len, device=self.starts.device)[None, :]  # [1, kv_len]
        rel = columns - self.starts[:, None]  # [rows, kv_len]
        new = self.query_positions.gather(1, rel.clamp(0, self.queries - 1))
        return torch.where(rel < 0, columns, new).masked_fill(rel >= self.queries, 1 << 40)

    def _causal_mask(self) -> torch.Tensor:
        full = torch.ones(self.queries, self.kv_len, dtype=torch.bool, device=self.gather.device)
        return full.tril(self.kv_len - self.queries).expand(self.rows, 1, self.queries, self.kv_len)


@dataclass
class RaggedStep:
    """Everything a step's attention layers share: where the new tokens are written, and the groups."""

    cache: PagedKVCache
    write_slots: torch.Tensor  # [N]: cache slot of each new token, in flat order
    groups: list[AttentionGroup]
    num_tokens: int


def ragged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    ragged_step: RaggedStep | None = None,
    **_: object,
) -> tuple[torch.Tensor, None]:
    """query [1, heads, N, dim], key/value [1, kv_heads, N, dim] (the step's new tokens) ->
    [1, N, heads, dim], as transformers' attention functions return."""
    if ragged_step is None:
        raise RuntimeError(f"attention '{RAGGED}' runs only inside BatchedRunner.step (no ragged_step was passed)")
    step = ragged_step
    layer = module.layer_idx
    keys, values = step.cache.keys[layer], step.cache.values[layer]
    keys.index_copy_(0, step.write_slots, key[0].transpose(0, 1))  # [N, kv_heads, dim] into their slots
    values.index_copy_(0, step.write_slots, value[0].transpose(0, 1))
    _, heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    out = query.new_empty(step.num_tokens, heads, dim)  # [N, heads, dim]
    for g in step.groups:
        q = query[0, :, g.token_start : g.token_stop].reshape(heads, g.rows, g.queries, dim).transpose(0, 1)  # [rows, heads, n, dim]
        k = keys.index_select(0, g.gather).view(g.rows, g.kv_len, kv_heads, dim).transpose(1, 2)  # [rows, kv_heads, kv_len, dim]
        v = values.index_select(0, g.gather).view(g.rows, g.kv_len, kv_heads, dim).transpose(1, 2)
        mask, causal = g.mask_for(sliding_window)
        if softcap is None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=True)
        else:
            o = _capped_attention(q, k, v, mask if not causal else g._causal_mask(), scaling, softcap)
        out[g.token_start : g.token_stop] = o.transpose(1, 2).reshape(g.rows * g.queries, heads, dim)
    return out[None], None


def _capped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float | None, softcap: float
) -> torch.Tensor:
    """Eager attention with logit soft-capping (Gemma 2), query heads grouped over their KV head.
    q [rows, heads, n, dim], k/v [rows, kv_heads, kv_len, dim], mask [rows, 1, n, kv_len] -> [rows, heads, n, dim]."""
    rows, heads, n, dim = q.shape
    kv_heads = k.shape[1]
    per_kv = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    grouped = q.reshape(rows, kv_heads, per_kv * n, dim)  # head h uses KV head h // per_kv
    scores = torch.matmul(grouped, k.transpose(-1, -2)) * scale  # [rows, kv_heads, per_kv * n, kv_len]
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        full = mask[:, :, None].expand(rows, 1, per_kv, n, mask.shape[-1]).reshape(rows, 1, per_kv * n, mask.shape[-1])
        scores = scores.masked_fill(~full, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(weights, v).reshape(rows, heads, n, dim)


AttentionInterface.register(RAGGED, ragged_attention)
