"""Acceptance for a whole step at once: per request, which proposed tokens the target keeps and the
token it adds after them, in batched tensor ops on the logits' device, with one device-to-host transfer
for the step.

- Greedy: the accepted path is the longest root-to-node path of the proposal (a chain, or a token tree:
  per draft its parent's index, -1 for the root) whose every token is the target's argmax at its parent
  (ties: the path that ends at the lowest index); the target's argmax after the path follows it. This
  makes greedy speculation exactly plain greedy decoding, whatever the tree.
- Sampling (chains only): speculative rejection sampling (Leviathan et al. 2023, "Fast Inference from
  Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model Decoding
  with Speculative Sampling"). Draft x_i, sampled from q_i, is accepted with probability
  min(1, p_i(x_i) / q_i(x_i)); at the first rejection the target's token is sampled from
  norm(max(0, p_i - q_i)) and the rest discarded; if every draft is accepted, one more token is sampled
  from p_k. Each emitted token is then distributed exactly as p, whatever q is. A deterministic proposal
  (no distribution) has q one-hot on its token.

Drafts are padded to [requests, k] (k: the longest proposal) with a validity mask, as in vLLM v1's
rejection sampler, and every decision is a mask over that layout. Sampling requests whose logits rows
are adjacent share a block: one distributions pass over a view of the logits. The random draws are
``smartspec.sampling.uniforms`` keyed by (seed, token index, purpose), so a seeded request's tokens do
not depend on its batch; they are made on the host (unsigned 64-bit arithmetic) and sent with the
drafts. The inputs are trusted: the engine validated them where they entered the verifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from smartspec.runtime.sampler import HOST_DEVICES, RowParams, distributions, sample
from smartspec.sampling import ACCEPT, EMIT, DraftDistribution, SamplingParams, uniforms
from smartspec.tree import ROOT, depths

# Logits elements one block of sampling requests covers. On the host every allocation over a few MB is
# a fresh mapping, page-faulted at each use, so blocks stay at a few requests' rows and share one
# workspace (measured: 2^21-2^22 fastest at batch 32, k = 8; 2^23 and up 2x slower); on an accelerator
# the caching allocator has no such cost, and fewer blocks launch fewer kernels.
HOST_BLOCK_ELEMENTS = 1 << 21
DEVICE_BLOCK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class Proposal:
    """One request's part of a step. Its logits are rows `row`, `row` + 1, ... of the step's flat logits:
    the first after the context, the one at `row` + i + 1 after the path to draft i."""

    row: int
    tokens: Sequence[int]
    parents: Sequence[int]  # per draft, its parent's index or -1; a sampling request's are a chain (-1, 0, 1, ...)
    dists: Sequence[DraftDistribution | None]  # per draft (sampling only): what it was sampled from, or None
    sampling: SamplingParams
    first_index: int  # sequence index of tokens[0], or of the emitted token when there are no drafts

    @property
    def end(self) -> int:
        """One past the request's last logits row."""
        return self.row + len(self.tokens) + 1


@dataclass(frozen=True)
class Decision:
    path: list[int]  # the accepted drafts' indices, root first
    token: int  # the target's token after them


def decide(logits: torch.Tensor, proposals: Sequence[Proposal]) -> list[Decision]:
    """Accepts and samples for every proposal of a step. logits: [rows, vocab], the step's flat logits
    (unused when there are no proposals)."""
    if not proposals:
        return []
    device = logits.device
    end = torch.full((len(proposals),), ROOT, dtype=torch.long, device=device)  # [requests]: the accepted path's last draft
    token = torch.zeros_like(end)  # [requests]
    by_row = sorted(range(len(proposals)), key=lambda b: proposals[b].row)
    for greedy, run in ((True, _greedy), (False, _sampled)):
        chosen = [b for b in by_row if proposals[b].sampling.greedy == greedy]
        if chosen:
            at = _on(chosen, torch.long, device)
            end[at], token[at] = run(logits, [proposals[b] for b in chosen])
    ends = torch.stack([end, token], dim=1).tolist()  # the step's one device-to-host transfer
    return [Decision(_path(p.parents, last), tok) for p, (last, tok) in zip(proposals, ends)]


def residual(p: torch.Tensor, ids: torch.Tensor, q: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """What the target samples from after a draft: max(0, p - q) (unnormalised) where `rejected`, else p.
    p: [n, vocab]; ids, q: [n, s], q's support and probabilities (padded by repeating an entry);
    rejected: [n] bool. A residual that is all zero (p <= q everywhere, only up to rounding) is p again."""
    at = p.gather(1, ids)  # [n, s]
    out = p.scatter(1, ids, torch.where(rejected[:, None], (at - q).clamp(min=0.0), at))  # [n, vocab]
    return torch.where(out.sum(dim=-1, keepdim=True) <= 0.0, p, out)


# --- greedy ---------------------------------------------------------------------------------------
def _greedy(logits: torch.Tensor, proposals: list[Proposal]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per greedy request (in row order): the accepted path's last draft (-1: none) and the target's token
    after it."""
    device = logits.device
    top = torch.zeros(logits.shape[0], dtype=torch.long, device=device)  # [rows]: the argmax, at the greedy rows
    for first, last in _blocks(proposals, logits.shape[0]):
        rows = _rows(proposals, first, last)
        top[rows] = logits[rows].argmax(dim=-1)
    k = max(len(p.tokens) for p in proposals)
    tokens, valid, parent_rows, depth, ancestors = (
        _on(values, dtype, device)
        for values, dtype in zip(_tree_layout(proposals, k), (torch.long, torch.bool, torch.long, torch.long, torch.bool))
    )
    end = _deepest_agreeing(valid & (tokens == top[parent_rows]), valid, depth, ancestors)
    return end, top[_on([p.row for p in proposals], torch.long, device) + end + 1]


def _deepest_agreeing(agree: torch.Tensor, valid: torch.Tensor, depth: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """Per request, the deepest draft that agrees with the target and whose ancestors all do (ties: the
    lowest index), or -1. agree, valid, depth: [requests, k]; ancestors: [requests, k, k]."""
    requests, k = agree.shape
    if k == 0:
        return torch.full((requests,), ROOT, dtype=torch.long, device=agree.device)
    matched = ~(ancestors & ~agree[:, None, :]).any(dim=-1) & valid  # [requests, k]
    rank = torch.where(matched, depth * (k + 1) - torch.arange(k, device=agree.device), -1)  # deeper first, then the lower index
    score, end = rank.max(dim=-1)  # [requests]
    return torch.where(score >= 0, end, ROOT)


def _tree_layout(proposals: list[Proposal], k: int) -> tuple[np.ndarray, ...]:
    """Padded [requests, k] drafts, validity, the logits row after each draft's parent (which judges it),
    depth (1: a child of the root), and [requests, k, k] ancestry ([b, i, j]: j is i or above it)."""
    n = len(proposals)
    tokens, parent_rows, depth = (np.zeros((n, k), dtype=np.int64) for _ in range(3))
    valid = np.zeros((n, k), dtype=bool)
    ancestors = np.zeros((n, k, k), dtype=bool)
    for b, p in enumerate(proposals):
        count = len(p.tokens)
        tokens[b, :count] = p.tokens
        valid[b, :count] = True
        parent_rows[b] = p.row
        parent_rows[b, :count] += np.asarray(p.parents, dtype=np.int64) + 1
        depth[b, :count] = depths(p.parents)
        for i, parent in enumerate(p.parents):  # parents come before their children
            ancestors[b, i, i] = True
            if parent != ROOT:
                ancestors[b, i] |= ancestors[b, parent]
    return tokens, valid, parent_rows, depth, ancestors


# --- sampling -------------------------------------------------------------------------------------
def _sampled(logits: torch.Tensor, proposals: list[Proposal]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sampling request (chains, in row order): the last accepted draft (-1: none) and the target's
    token after the accepted ones."""
    device, vocab = logits.device, logits.shape[-1]
    packed = _Sampled.pack(proposals, vocab, device)
    accepted, token = torch.empty_like(packed.counts), torch.empty_like(packed.counts)  # [requests]
    blocks = _blocks(proposals, (HOST_BLOCK_ELEMENTS if device.type in HOST_DEVICES else DEVICE_BLOCK_ELEMENTS) // vocab)
    workspace = torch.empty(2, max(proposals[last - 1].end - proposals[first].row for first, last in blocks), vocab, device=device)
    for first, last in blocks:
        part, rows = slice(first, last), _rows(proposals, first, last)
        dist = distributions(logits[rows], packed.params[packed.param_rows[first] : packed.param_rows[last]], workspace)
        p = dist.at(packed.judge_rows[part].flatten() - rows.start, packed.tokens[part].flatten()).view(last - first, -1)  # [block, k]: p(x)
        accept = p > packed.thresholds[part]  # [block, k]: u < min(1, p(x) / q(x)), i.e. u q(x) < p(x) (q(x) > 0: x came from q)
        accepted[part] = n = accept.long().cumprod(dim=-1).sum(dim=-1)  # [block]: drafts before the first rejection
        token[part] = _emit(dist.dense(packed.rows[part] - rows.start + n), n, packed, part)
    return accepted - 1, token


def _emit(p: torch.Tensor, accepted: torch.Tensor, packed: "_Sampled", part: slice) -> torch.Tensor:
    """The target's tokens of requests `part`: sampled from the residual after the first rejected draft,
    or from p after all were accepted. p: [requests, vocab], after the accepted drafts; accepted: [requests]."""
    requests, rejected = packed.index[part], accepted.clamp(max=packed.tokens.shape[1] - 1)  # the rejected draft (any, where none was)
    weights = residual(p, packed.q_ids[requests, rejected], packed.q_probs[requests, rejected], accepted < packed.counts[part])
    return sample(weights, packed.emit_draws[requests, accepted])


@dataclass(frozen=True)
class _Sampled:
    """Sampling requests (chains, in row order), padded to [requests, k] with k = max(1, longest)."""

    params: RowParams  # per logits row of these requests, in order
    param_rows: list[int]  # per request, its first row in `params`, then their count
    index: torch.Tensor  # [requests]: 0, 1, ...
    rows: torch.Tensor  # [requests]: the request's first logits row
    judge_rows: torch.Tensor  # [requests, k]: the logits row that judges each draft (padding: the request's last row)
    counts: torch.Tensor  # [requests]: drafts
    tokens: torch.Tensor  # [requests, k]
    thresholds: torch.Tensor  # [requests, k] float64: u * q(x), the draft accepted when p(x) exceeds it (padding: inf)
    q_ids: torch.Tensor  # [requests, k, s]: q's support per draft, padded by repeating its first entry
    q_probs: torch.Tensor  # [requests, k, s] float32: q normalised as the drafter normalised it
    emit_draws: torch.Tensor  # [requests, k + 1] float64: for the token after i accepted drafts

    @classmethod
    def pack(cls, proposals: list[Proposal], vocab: int, device: torch.device) -> "_Sampled":
        requests, width = len(proposals), max(1, max(len(p.tokens) for p in proposals))
        rows = np.array([p.row for p in proposals], dtype=np.int64)
        counts = np.array([len(p.tokens) for p in proposals], dtype=np.int64)
        tokens, q_token = np.zeros((requests, width), dtype=np.int64), np.ones((requests, width), dtype=np.float64)
        for b, p in enumerate(proposals):
            tokens[b, : counts[b]] = p.tokens
            q_token[b, : counts[b]] = [1.0 if d is None else d.prob(t) for t, d in zip(p.tokens, p.dists)]
        q_ids, q_probs, totals = _supports(proposals, width)
        seeds, first = [p.sampling.seed for p in proposals], [p.first_index for p in proposals]
        return cls(
            params=RowParams.of([p.sampling for p in proposals for _ in range(p.end - p.row)], vocab, device),
            param_rows=np.cumsum([0, *(counts + 1)]).tolist(),
            index=torch.arange(requests, device=device),
            rows=_on(rows, torch.long, device),
            judge_rows=_on(rows[:, None] + np.minimum(np.arange(width), counts[:, None]), torch.long, device),
            counts=_on(counts, torch.long, device),
            tokens=_on(tokens, torch.long, device),
            thresholds=_on(np.where(np.arange(width) < counts[:, None], _draws(seeds, first, width, ACCEPT) * q_token, np.inf), torch.float64, device),
            q_ids=_on(q_ids, torch.long, device),
            q_probs=_on(q_probs, torch.float32, device) / _on(totals, torch.float32, device)[..., None],
            emit_draws=_on(_draws(seeds, first, width + 1, EMIT), torch.float64, device),
        )


def _supports(proposals: list[Proposal], width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per draft, q's support [requests, width, s], its float32 probabilities and their total (a
    deterministic draft: its token, 1). Short supports repeat their first entry."""
    size = max((len(d.token_ids) for p in proposals for d in p.dists if d is not None), default=1)
    ids = np.zeros((len(proposals), width, size), dtype=np.int64)
    probs = np.ones((len(proposals), width, size), dtype=np.float32)
    totals = np.ones((len(proposals), width), dtype=np.float64)
    for b, p in enumerate(proposals):
        for i, (token, dist) in enumerate(zip(p.tokens, p.dists)):
            if dist is None:
                ids[b, i] = token
                continue
            ids[b, i], probs[b, i], totals[b, i] = dist.token_ids[0], dist.probs[0], dist.total
            ids[b, i, : len(dist.token_ids)] = dist.token_ids
            probs[b, i, : len(dist.probs)] = dist.probs
    return ids, probs, totals


def _draws(seeds: list[int], first: list[int], width: int, stream: int) -> np.ndarray:
    """[requests, width]: each request's draws at token indices first, first + 1, ..."""
    indices = np.asarray(first, dtype=np.int64)[:, None] + np.arange(width)
    return uniforms([s for s in seeds for _ in range(width)], indices.ravel().tolist(), stream).reshape(len(seeds), width)


# --- layout ---------------------------------------------------------------------------------------
def _blocks(proposals: Sequence[Proposal], limit: int) -> list[tuple[int, int]]:
    """Ranges [first, last) of the requests (in row order) whose rows are adjacent, each of at most
    `limit` rows (or one request)."""
    blocks: list[tuple[int, int]] = []
    for b, p in enumerate(proposals):
        if blocks and proposals[b - 1].end == p.row and p.end - proposals[blocks[-1][0]].row <= limit:
            blocks[-1] = (blocks[-1][0], b + 1)
        else:
            blocks.append((b, b + 1))
    return blocks


def _rows(proposals: Sequence[Proposal], first: int, last: int) -> slice:
    """The logits rows of requests first .. last - 1, adjacent."""
    return slice(proposals[first].row, proposals[last - 1].end)


def _path(parents: Sequence[int], end: int) -> list[int]:
    """The draft indices from the root to `end` (none when -1)."""
    path: list[int] = []
    while end != ROOT:
        path.append(end)
        end = parents[end]
    return path[::-1]


def _on(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values (a list or a numpy array) as a tensor on the device."""
    return torch.as_tensor(np.asarray(values), dtype=dtype, device=device)
