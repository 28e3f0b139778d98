"""A verify step's acceptance and sampling as one batched pass: seeded outputs pinned to what the
per-request code produced (the draws and the processed distributions are the same numbers), a request's
decision independent of its batch, and exactly one device-to-host transfer per step."""

from __future__ import annotations

import pytest
import torch

from smartspec.bench.microbench import counting_host_reads
from smartspec.runtime import sampler
from smartspec.sampling import DRAFT, GREEDY, DraftDistribution, SamplingParams, uniform
from smartspec.tree import chain_parents
from verifier_svc import acceptance
from verifier_svc.acceptance import Proposal, decide

PARAMS = [
    SamplingParams(0.8, top_p=0.95), SamplingParams(1.0), SamplingParams(0.7, top_k=20),
    SamplingParams(1.3, top_p=0.8, top_k=50), SamplingParams(0.5, top_p=0.5), GREEDY,
]

# (accepted, emitted token) per request of `scenario()`, as the per-request acceptance and sampling code
# (before the batched pass) produced them.
PINNED = [
    (0, 92), (0, 106), (1, 226), (0, 141), (0, 417), (0, 204), (1, 226), (0, 433), (3, 62), (1, 79),
    (0, 206), (0, 216), (0, 436), (2, 214), (1, 431), (0, 141), (1, 484), (0, 321), (2, 28), (0, 74),
    (0, 118), (1, 115), (2, 218), (0, 127), (2, 376), (0, 333), (1, 111), (1, 348), (0, 312), (2, 179),
]


def scenario(vocab: int = 512) -> tuple[torch.Tensor, list[Proposal]]:
    """One step of 30 requests: every processing combination and greedy, 0 to 8 drafts, sampled and
    deterministic proposals, drafts close to the target (accepted about a fifth of the time)."""
    g = torch.Generator().manual_seed(11)
    proposals, rows, row = [], [], 0
    for b in range(30):
        base = PARAMS[b % len(PARAMS)]
        params = SamplingParams(base.temperature, base.top_p, base.top_k, seed=(b * 0x9E3779B97F4A7C15) % (1 << 64))
        k = [0, 1, 3, 5, 8][b % 5]
        target = torch.randn(k + 1, vocab, generator=g) * 3  # [k + 1, vocab]
        draft = target + torch.randn(k + 1, vocab, generator=g)  # close to the target, not equal
        tokens, dists = [], []
        for i in range(k):
            if params.greedy or b % 4 == 3:  # deterministic proposals: the draft's argmax
                tokens.append(int(draft[i].argmax()))
                dists.append(None)
            else:  # sampled from the draft's top 8
                top = torch.topk(torch.softmax(draft[i], -1), 8)
                dist = DraftDistribution(tuple(top.indices.tolist()), tuple(top.values.tolist()))
                tokens.append(dist.sample(uniform(params.seed, 40 + b + i, DRAFT)))
                dists.append(dist)
        proposals.append(Proposal(row, tokens, chain_parents(k), dists if not params.greedy else [None] * k, params, 40 + b))
        rows.append(target)
        row += k + 1
    return torch.cat(rows), proposals


def test_seeded_outputs_are_the_ones_the_per_request_code_produced():
    logits, proposals = scenario()
    assert [(len(d.path), d.token) for d in decide(logits, proposals)] == PINNED
    assert all(d.path == list(range(len(d.path))) for d in decide(logits, proposals))  # a chain accepts a prefix


def test_a_decision_does_not_depend_on_the_batch(monkeypatch):
    """Each request alone, the batch in one block, and the batch in reverse row order with a greedy tree
    among them: the same decisions."""
    logits, proposals = scenario()
    together = decide(logits, proposals)
    monkeypatch.setattr(acceptance, "HOST_BLOCK_ELEMENTS", 1 << 30)
    assert decide(logits, proposals) == together
    monkeypatch.undo()
    for proposal, decision in zip(proposals, together):
        alone = decide(logits[proposal.row : proposal.end], [Proposal(0, *_fields(proposal))])
        assert alone == [decision]
    flipped = torch.cat([logits[p.row : p.end] for p in reversed(proposals)])
    rows, moved = 0, []
    for p in reversed(proposals):
        moved.append(Proposal(rows, *_fields(p)))
        rows += p.end - p.row
    best = int(logits[0].argmax())  # the tree's rows all equal logits[0]: its argmax agrees everywhere
    tree = Proposal(rows, [best, (best + 1) % logits.shape[1], best], [-1, -1, 0], [None] * 3, GREEDY, 7)
    decisions = decide(torch.cat([flipped, logits[0:1].expand(4, -1)]), [*moved, tree])
    assert decisions[:-1] == together[::-1]
    assert decisions[-1].path == [0, 2] and decisions[-1].token == best


def _fields(p: Proposal) -> tuple:
    return p.tokens, p.parents, p.dists, p.sampling, p.first_index


def test_a_step_reads_back_once(monkeypatch):
    """With the accelerator's code path (a sorted nucleus rather than the host's candidate shortcut), a
    step of every kind of request reads tensor values back exactly once."""
    with counting_host_reads() as counts:
        torch.ones(2).tolist()
        assert counts["reads"] == 1  # the counter sees reads
    monkeypatch.setattr(sampler, "HOST_DEVICES", frozenset())
    logits, proposals = scenario()
    tree = Proposal(logits.shape[0], [3, 4, 5], [-1, -1, 0], [None] * 3, GREEDY, 9)
    logits = torch.cat([logits, torch.randn(4, logits.shape[1], generator=torch.Generator().manual_seed(2))])
    with counting_host_reads() as counts:
        decisions = decide(logits, [*proposals, tree])
    assert counts["reads"] == 1
    assert [(len(d.path), d.token) for d in decisions[:-1]] == PINNED  # the sorted nucleus is the same nucleus


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_the_host_shortcut_finds_the_sorted_nucleus(top_p):
    """Real-like logits, long tails: the floor from the candidates equals the one from a full sort."""
    uniform = torch.rand(16, 20000, generator=torch.Generator().manual_seed(3))
    logits = -2.0 * torch.log(-torch.log(uniform))  # [rows, vocab]: Gumbel noise, long-tailed like real logits
    probs = torch.softmax(logits, dim=-1)
    top = torch.full((16,), top_p)
    by_sort = sampler._floor_of_sorted(torch.sort(probs, dim=-1, descending=True).values, top)
    assert torch.equal(sampler._floor_among_candidates(probs, top, torch.ones(16, dtype=torch.bool)), by_sort)
