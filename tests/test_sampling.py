"""Sampling building blocks: the processing (against transformers' own warpers), the counter-based
random stream, the wire form of draft distributions, and the rejection sampler on synthetic p and q.

The sampler tests are exact in the statistical sense: with many draws the emitted tokens must follow
p, whatever q is; a chi-square test at alpha = 1e-4 (fixed seeds, so the outcome is the same every
run) and a deliberately wrong rule that the same test rejects show that the test has power.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from smartspec.errors import RequestError
from smartspec.runtime import sampler
from smartspec.runtime.sampler import draft_distribution, processed_probs, sample
from smartspec.sampling import (
    ACCEPT,
    DRAFT,
    EMIT,
    DraftDistribution,
    SamplingParams,
    pack_distributions,
    uniform,
    uniforms,
    unpack_distributions,
)
from smartspec.tree import chain_parents
from tests.support import goodness_of_fit
from verifier_svc import acceptance

ALPHA = 1e-4


# --- processing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params",
    [SamplingParams(1.0), SamplingParams(0.7, top_k=5), SamplingParams(1.3, top_p=0.8), SamplingParams(2.0, top_p=0.5, top_k=20)],
    ids=["plain", "top-k", "top-p", "both"],
)
def test_processing_matches_the_transformers_warpers(params):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(3)) * 3  # [rows, vocab]
    scores = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    want = torch.softmax(scores, dim=-1)
    got = processed_probs(logits, params)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(got > 0, want > 0)  # the same support, not only close values


def test_one_batch_of_rows_with_their_own_parameters_equals_each_row_alone():
    """The verifier processes every request's rows in one call, each with its own parameters: the same
    floats as processing each request alone, whichever way the top-p nucleus is found."""
    logits = torch.randn(12, 3000, generator=torch.Generator().manual_seed(5)) * 4  # [rows, vocab]
    params = [SamplingParams(0.8, top_p=0.95), SamplingParams(1.0), SamplingParams(0.7, top_k=20), SamplingParams(1.3, top_p=0.8, top_k=50)] * 3
    batched = sampler.distributions(logits, sampler.RowParams.of(params, 3000, logits.device)).dense()
    alone = torch.cat([processed_probs(row[None], p) for row, p in zip(logits, params)])
    assert torch.equal(batched, alone)
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([0.5, 0.9, 0.95, 0.999] * 3)
    on = torch.ones(12, dtype=torch.bool)
    by_sort = sampler._floor_of_sorted(torch.sort(probs, dim=-1, descending=True).values, top_p)
    assert torch.equal(sampler._floor_among_candidates(probs, top_p, on), by_sort)  # the host's shortcut, exactly


def test_sampling_by_inverse_cdf_never_picks_an_impossible_token():
    probs = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0])
    draws = torch.tensor([0.0, 0.2499, 0.25, 0.9999999], dtype=torch.float64)
    assert sample(probs.expand(4, -1), draws).tolist() == [1, 1, 3, 3]
    logits = torch.tensor([0.1, 0.0, 0.6, 0.3]).log()  # probabilities 0.1, 0, 0.6, 0.3
    dist = draft_distribution(logits, SamplingParams(1.0), 2)  # the top 2, renormalised
    assert dist.token_ids == (2, 3) and sum(dist.probs) == pytest.approx(1.0) and dist.probs[0] == pytest.approx(2 / 3)
    assert draft_distribution(logits, SamplingParams(1.0, top_p=0.5), 8).token_ids == (2,)  # processed among the top N
    assert draft_distribution(logits, SamplingParams(1.0), 8).token_ids == (2, 3, 0)  # probability 0 is not sent


def test_params_are_validated_with_the_value_named():
    for bad, words in [
        (SamplingParams(-0.5), "temperature"),
        (SamplingParams(float("nan")), "temperature"),
        (SamplingParams(1.0, top_p=0.0), "top_p"),
        (SamplingParams(1.0, top_p=1.5), "top_p"),
        (SamplingParams(1.0, top_k=-1), "top_k"),
    ]:
        with pytest.raises(RequestError) as err:
            bad.check()
        assert err.value.status == "INVALID_ARGUMENT" and words in err.value.message
    assert SamplingParams().greedy and not SamplingParams(0.1).greedy
    assert SamplingParams(1e-30).greedy  # would overflow logits / temperature: a point mass on the argmax anyway


# --- the random stream --------------------------------------------------------------------------------
def test_the_random_stream_is_a_pure_function_of_seed_index_and_purpose():
    assert uniform(7, 100, ACCEPT) == uniform(7, 100, ACCEPT)
    draws = {uniform(seed, index, stream) for seed in range(20) for index in range(50) for stream in (DRAFT, ACCEPT, EMIT)}
    assert len(draws) == 20 * 50 * 3  # no collisions between seeds, indices or purposes
    values = [uniform(1, i, EMIT) for i in range(20000)]
    assert all(0.0 <= v < 1.0 for v in values)
    counts = Counter(int(v * 10) for v in values)
    _, _, p_value = goodness_of_fit(counts, {b: 0.1 for b in range(10)})
    assert p_value > ALPHA


def test_the_draws_are_fixed_and_vectorised_draws_are_the_same_numbers():
    """Seeded outputs depend on these exact numbers: values pinned from the original scalar SplitMix64
    code, and the vectorised form (numpy uint64) equal to the scalar one bit for bit, seeds over 2^63 included."""
    assert uniform(7, 100, ACCEPT) == 0.7540153786505487
    assert uniform(0, 0, EMIT) == 0.5320218361263253
    assert uniform(2**64 - 1, 12345, DRAFT) == 0.5309364996838499
    seeds = [0, 1, 2**63, 2**64 - 1, 0x9E3779B97F4A7C15] * 3
    indices = list(range(len(seeds)))
    assert uniforms(seeds, indices, EMIT).tolist() == [uniform(s, i, EMIT) for s, i in zip(seeds, indices)]


# --- wire form ----------------------------------------------------------------------------------------
def test_distributions_round_trip_and_deterministic_drafts_cost_nothing():
    a = DraftDistribution((5, 9), (0.75, 0.25))
    b = DraftDistribution((1,), (1.0,))
    per_request = [[a, None], [], [b]]
    message = pack_distributions(per_request)
    assert list(message.support_counts) == [2, 0, 1]
    assert unpack_distributions(message, [2, 0, 1]) == per_request
    assert pack_distributions([[None, None], [None]]).ByteSize() == 0
    assert unpack_distributions(pack_distributions([[None]]), [1]) == [[None]]
    with pytest.raises(RequestError, match="support counts"):
        unpack_distributions(message, [1, 1])


def test_a_distribution_a_draft_cannot_have_come_from_is_named():
    assert DraftDistribution((5, 9), (0.75, 0.25)).problem(5, 10) is None
    assert "twice" in DraftDistribution((5, 5), (0.5, 0.5)).problem(5, 10)
    assert "outside" in DraftDistribution((5, 12), (0.5, 0.5)).problem(5, 10)
    assert "not probabilities" in DraftDistribution((5, 9), (1.5, float("nan"))).problem(5, 10)
    assert "probability 0" in DraftDistribution((5, 9), (1.0, 0.0)).problem(9, 10)


# --- the rejection sampler on synthetic distributions --------------------------------------------------
P = torch.tensor([0.05, 0.30, 0.10, 0.35, 0.0, 0.20])  # the target; token 4 impossible
Q = DraftDistribution((0, 1, 3, 4), (0.40, 0.10, 0.20, 0.30))  # a poor draft, sure of tokens the target dislikes


def _verify_per_seed(target: torch.Tensor, dists: list[DraftDistribution | None], fixed: list[int], draws: int, first: int) -> list[list[int]]:
    """The tokens emitted for one chain per seed 0..draws-1, verified in one step: draft i is sampled from
    dists[i] (or is fixed[i] where dists[i] is None); target: [k + 1, vocab] probabilities, the same for
    every seed."""
    k = len(dists)
    proposals, tokens = [], []
    for seed in range(draws):
        draft = [d.sample(uniform(seed, first + i, DRAFT)) if d is not None else fixed[i] for i, d in enumerate(dists)]
        proposals.append(acceptance.Proposal(seed * (k + 1), draft, chain_parents(k), dists, SamplingParams(1.0, seed=seed), first))
        tokens.append(draft)
    decisions = acceptance.decide(target.log().repeat(draws, 1), proposals)  # softmax(log p) = p
    return [[*draft[: len(d.path)], d.token] for draft, d in zip(tokens, decisions)]


def _first_tokens(q: DraftDistribution | None, draws: int, draft_token: int | None = None) -> Counter:
    """Distribution of the first emitted token when one draft token (from q, or fixed) is verified."""
    return Counter(emitted[0] for emitted in _verify_per_seed(torch.stack([P, P]), [q], [draft_token], draws, 10))


def _wrong_residual(p, ids, q, rejected):
    """The classic mistake: on rejection, sample from p instead of the residual norm(max(0, p - q))."""
    return p


EXPECTED = {token: float(p) for token, p in enumerate(P) if p > 0}


@pytest.mark.parametrize("case", ["sampled draft", "deterministic draft"])
def test_rejection_sampling_reproduces_the_target_distribution(case, monkeypatch):
    q, fixed = (Q, None) if case == "sampled draft" else (None, 3)
    counts = _first_tokens(q, 20000, fixed)
    assert counts[4] == 0  # a token the target cannot produce never comes out
    _, _, p_value = goodness_of_fit(counts, EXPECTED)
    assert p_value > ALPHA, (p_value, counts)
    monkeypatch.setattr(acceptance, "residual", _wrong_residual)
    wrong = _first_tokens(q, 20000, fixed)
    assert goodness_of_fit(wrong, EXPECTED)[2] < ALPHA  # the test can tell a wrong rule


def test_a_chain_of_drafts_keeps_every_position_exact():
    """k = 2 with a different target at each position: the first emitted token follows p_0, and the
    second (present when the first draft was accepted) follows p_1."""
    p1 = torch.tensor([0.5, 0.0, 0.25, 0.0, 0.25, 0.0])
    q1 = DraftDistribution((0, 1, 2), (0.2, 0.5, 0.3))
    first, second = Counter(), Counter()
    for emitted in _verify_per_seed(torch.stack([P, p1, P]), [Q, q1], [], 20000, 0):
        first[emitted[0]] += 1
        if len(emitted) >= 2:
            second[emitted[1]] += 1
    assert goodness_of_fit(first, EXPECTED)[2] > ALPHA
    assert goodness_of_fit(second, {t: float(p) for t, p in enumerate(p1) if p > 0})[2] > ALPHA
    assert sum(second.values()) > 5000  # enough accepted first drafts for the second test to mean something
