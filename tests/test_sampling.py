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
from smartspec.runtime.sampler import draft_distribution, processed_probs, sample_index
from smartspec.sampling import (
    ACCEPT,
    DRAFT,
    EMIT,
    DraftDistribution,
    SamplingParams,
    pack_distributions,
    uniform,
    unpack_distributions,
)
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


def test_sampling_by_inverse_cdf_never_picks_an_impossible_token():
    probs = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0])
    assert [sample_index(probs, u) for u in (0.0, 0.2499, 0.25, 0.9999999)] == [1, 1, 3, 3]
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


def _first_tokens(rule, q: DraftDistribution | None, draws: int, draft_token: int | None = None) -> Counter:
    """Distribution of the first emitted token when one draft token (from q, or fixed) is verified."""
    target = torch.stack([P, P])  # [k + 1, vocab]
    out: Counter = Counter()
    for seed in range(draws):
        token = q.sample(uniform(seed, 10, DRAFT)) if q is not None else draft_token
        accepted, bonus = rule([token], [q], target, seed, 10)
        out[token if accepted else bonus] += 1
    return out


def _wrong_rule(draft, dists, target_probs, seed, first_index):
    """The classic mistake: on rejection, sample from p instead of the residual norm(max(0, p - q))."""
    for i, (token, dist) in enumerate(zip(draft, dists)):
        q_token = 1.0 if dist is None else dist.prob(token)
        if uniform(seed, first_index + i, ACCEPT) * q_token < float(target_probs[i][token]):
            continue
        return i, sample_index(target_probs[i], uniform(seed, first_index + i, EMIT))
    return len(draft), sample_index(target_probs[len(draft)], uniform(seed, first_index + len(draft), EMIT))


EXPECTED = {token: float(p) for token, p in enumerate(P) if p > 0}


@pytest.mark.parametrize("case", ["sampled draft", "deterministic draft"])
def test_rejection_sampling_reproduces_the_target_distribution(case):
    q, fixed = (Q, None) if case == "sampled draft" else (None, 3)
    counts = _first_tokens(acceptance.speculative_accept, q, 20000, fixed)
    assert counts[4] == 0  # a token the target cannot produce never comes out
    _, _, p_value = goodness_of_fit(counts, EXPECTED)
    assert p_value > ALPHA, (p_value, counts)
    wrong = _first_tokens(_wrong_rule, q, 20000, fixed)
    assert goodness_of_fit(wrong, EXPECTED)[2] < ALPHA  # the test can tell a wrong rule


def test_a_chain_of_drafts_keeps_every_position_exact():
    """k = 2 with a different target at each position: the first emitted token follows p_0, and the
    second (present when the first draft was accepted) follows p_1."""
    p1 = torch.tensor([0.5, 0.0, 0.25, 0.0, 0.25, 0.0])
    target = torch.stack([P, p1, P])  # [k + 1, vocab]
    q1 = DraftDistribution((0, 1, 2), (0.2, 0.5, 0.3))
    first, second = Counter(), Counter()
    for seed in range(20000):
        drafts = [Q.sample(uniform(seed, 0, DRAFT)), q1.sample(uniform(seed, 1, DRAFT))]
        n, bonus = acceptance.speculative_accept(drafts, [Q, q1], target, seed, 0)
        emitted = [*drafts[:n], bonus]
        first[emitted[0]] += 1
        if n >= 1:
            second[emitted[1]] += 1
    assert goodness_of_fit(first, EXPECTED)[2] > ALPHA
    assert goodness_of_fit(second, {t: float(p) for t, p in enumerate(p1) if p > 0})[2] > ALPHA
    assert sum(second.values()) > 5000  # enough accepted first drafts for the second test to mean something
