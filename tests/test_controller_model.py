"""The controller's estimates: acceptance posteriors, the cost model's online refit, closed-loop decisions."""

from __future__ import annotations

import random

import numpy as np
import pytest

from router.controller.acceptance import DrafterRates, RequestAcceptance, expected_tokens
from router.controller.controller import Slot, SpeculationController
from router.controller.profile import PrefillRow
from router.controller.cost_model import Breakpoints, VerifyCostModel, verify_features


def test_expected_tokens_is_the_sum_of_acceptance_powers():
    for a in (0.1, 0.5, 0.9):
        for k in range(6):
            assert expected_tokens(a, k) == pytest.approx(sum(a**j for j in range(k + 1)))
    assert expected_tokens(1.0, 4) == 5.0


def test_posterior_learns_a_requests_rate_from_geometric_outcomes():
    rng = random.Random(0)
    true_rate, k = 0.8, 4
    posterior = RequestAcceptance()
    assert posterior.mean(prior_rate=0.3) == pytest.approx(0.3)  # no evidence yet: the drafter's rate
    for _ in range(300):
        accepted = 0
        while accepted < k and rng.random() < true_rate:
            accepted += 1
        posterior.observe(k, accepted)
    assert posterior.mean(prior_rate=0.3) == pytest.approx(true_rate, abs=0.04)
    posterior.decay(0.0)
    assert posterior.mean(prior_rate=0.6) == pytest.approx(0.6)


def test_posterior_follows_runs_of_acceptance():
    """Drafts that copy a passage land verify after verify, and after a miss the next often misses:
    the estimate for the next verify depends on how the last one ended."""
    rng = random.Random(1)
    posterior, full = RequestAcceptance(), True
    for verify in range(400):
        full = rng.random() < (0.9 if full else 0.2)  # in a passage, then out of it
        posterior.observe(4, 4 if full else 0)
        posterior.decay(0.98)
        after = posterior.mean(prior_rate=0.5)
        if verify >= 50:  # one rate for all verifies would be ~0.89 (two in three land whole)
            assert after > 0.85 if full else after < 0.8
    assert posterior.by_state[True][0] > posterior.by_state[False][0]  # the evidence is kept per state


def _share_astray(prior_strength: float | None) -> float:
    """Share of request-steps whose estimate is more than 0.1 from a true 0.7 shared by every request,
    over 200 requests of 15 faded verifies (about a 40-token output) each."""
    rng = random.Random(0)
    estimates = []
    for _ in range(200):
        posterior = RequestAcceptance()
        for _ in range(15):
            accepted = 0
            while accepted < 3 and rng.random() < 0.7:
                accepted += 1
            posterior.observe(3, accepted)
            posterior.decay(0.9)  # the controller's evidence_decay
            strength = {} if prior_strength is None else {"prior_strength": prior_strength}
            estimates.append(posterior.mean(prior_rate=0.7, **strength))
    return sum(abs(estimate - 0.7) > 0.1 for estimate in estimates) / len(estimates)


def test_requests_at_their_drafters_rate_keep_estimates_near_it():
    """Where every request's drafts land at the drafter's rate, ten-odd faded verifies of luck must not
    send a request's estimate (and so its k) far from that rate, as a prior of 4 verifies did."""
    assert _share_astray(None) < 0.2  # the default prior
    assert _share_astray(4.0) > 0.4


def test_drafter_rate_is_smoothed_and_fades_back_when_unused():
    rates = DrafterRates(initial=0.5, prior_strength=4)
    assert rates.rate == 0.5
    rates.observe(4, 0)  # one unlucky verify does not condemn the drafter
    assert rates.rate == pytest.approx(2 / 5)
    for _ in range(50):
        rates.observe(4, 4)
    assert rates.rate > 0.98
    for _ in range(200):
        rates.observe(4, 0)
        rates.decay(0.98)
    assert rates.rate < 0.1
    for _ in range(1000):  # nobody speculates with it any more: the rate drifts back to the initial one
        rates.decay(0.98)
    assert rates.rate == pytest.approx(0.5, abs=0.01)
    assert rates.position_proposed[:4] == [251] * 4 and rates.position_accepted[0] == 50 and rates.samples == 251


def test_a_drafter_with_thin_evidence_looks_promising_and_one_measured_at_length_is_taken_at_its_word():
    rates = DrafterRates(initial=0.5, prior_strength=4)
    assert rates.optimistic_rate > rates.rate + 0.15  # never tried: worth a try
    for _ in range(300):
        rates.observe(4, 0)  # its drafts never land
    assert rates.optimistic_rate < 0.05
    for _ in range(1000):  # unused for long, the evidence fades: optimistic again, so it is tried again
        rates.decay(0.98)
    assert rates.optimistic_rate > 0.65


def test_online_refit_recovers_the_true_step_cost():
    true = np.array([0.04, 0.006, 0.00002, 0.000002, 0.003, 0.025, 0.001])
    model = VerifyCostModel(prior=[0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], breaks=Breakpoints(4, 48), window=200, refit_every=10)
    rng = np.random.default_rng(0)
    for _ in range(200):
        b = int(rng.integers(1, 17))
        ks = rng.integers(0, 6, size=b)
        shape = verify_features(b, int(b + ks.sum()), int(rng.integers(10, 800)) * b, int(ks.max()) + 1)
        model.observe(shape, float(model.design(shape) @ true) * float(rng.normal(1.0, 0.02)))
    probe = verify_features(8, 60, 4000, 7)
    assert model.predict(probe) == pytest.approx(float(model.design(probe) @ true), rel=0.05)
    assert model.error().mape < 0.2


def test_refit_with_a_constant_feature_stays_near_the_prior():
    """Batch size never varies in the window: its coefficient must not run off."""
    model = VerifyCostModel(prior=[0.04, 0.005, 0.00002, 0.000002, 0.003, 0.02, 0.0], refit_every=1)
    for n in range(1, 40):
        model.observe(verify_features(4, 4 + n % 5, 400, 1 + n % 5), 0.06 + 0.005 * (n % 5))
    assert 0 <= model.as_dict()["sequences"] < 0.05
    assert all(c >= 0 for c in model.coef)


def test_profile_fit_keeps_coefficients_non_negative_and_refits_the_rest():
    """A true cost with no context term, measured with noise: a free fit can give that term a small
    negative value; the profile's fit must give 0 and still predict the steps it measured."""
    true = np.array([0.05, 0.004, 0.0, 0.0, 0.003, 0.02, 0.0])
    truth = Breakpoints(2, None)
    rng = np.random.default_rng(1)
    rows, seconds = [], []
    for _ in range(60):
        b = int(rng.integers(1, 17))
        ks = rng.integers(0, 8, size=b)
        shape = verify_features(b, int(b + ks.sum()), int(rng.integers(16, 1400)) * b, int(ks.max()) + 1)
        rows.append(shape)
        seconds.append(float(truth.features(shape) @ true) * float(rng.normal(1.0, 0.05)))
    model = VerifyCostModel(prior=[0.0] * 7)
    model.fit_batch(rows, seconds)
    assert (model.coef >= 0).all() and (model.prior == model.coef).all()
    errors = [abs(model.predict(x) - y) / y for x, y in zip(rows, seconds)]
    assert np.mean(errors) < 0.06


@pytest.mark.parametrize("truth", [Breakpoints(4, None), Breakpoints(8, None), Breakpoints(2, 32), Breakpoints(4, 128)], ids=str)
def test_profile_fit_finds_where_the_step_cost_bends(truth):
    """A CPU whose steps jump once they carry a few tokens (the reference CPU: at 4), a GPU whose steps
    turn compute-bound past a knee: the profile's sweep, timed with noise, is fitted with the
    breakpoints that made it, and steps it did not time are predicted within 5%."""
    from router.controller.profile import ALL_CHUNKS, step_features, sweep_plan

    true = np.array([0.03, 0.0005, 0.00001, 0.0000005, 0.001, 0.02, 0.002])
    rng = np.random.default_rng(2)
    plan = sweep_plan(16, 1400, random.Random(0), chunk_room=ALL_CHUNKS)
    rows = [step_features([plan.contexts[i] for i in picked], ks, [chunk] if chunk else []) for picked, ks, chunk in plan.steps]
    seconds = [float(truth.features(row) @ true) * float(rng.normal(1.0, 0.03)) for row in rows]
    model = VerifyCostModel(prior=[0.0] * 7)
    model.fit_batch(rows, seconds)
    assert model.breaks == truth
    for contexts, ks in (([300], [2]), ([300], [5]), ([500] * 16, [7] * 16), ([500] * 12, [2] * 12), ([800] * 32, [1] * 32)):
        shape = step_features(contexts, ks)
        assert model.predict(shape) == pytest.approx(float(truth.features(shape) @ true), rel=0.05)


def test_sweep_plan_varies_batch_context_and_k_independently():
    from router.controller.profile import ALL_CHUNKS, BATCHES, CHUNK_TOKENS, CONTEXT_RANGE, K_MAX, ROUNDS, sweep_plan

    plan = sweep_plan(16, 1200, random.Random(0), chunk_room=ALL_CHUNKS, largest_chunk=max(CHUNK_TOKENS))
    assert plan.contexts[0] == CONTEXT_RANGE[0] and plan.contexts[-1] == 1200 and plan.contexts == sorted(plan.contexts)
    assert {len(ks) for _, ks, _ in plan.steps} == set(BATCHES)
    assert all(len(set(picked)) == len(picked) == len(ks) and 0 <= min(ks) and max(ks) <= K_MAX for picked, ks, _ in plan.steps)
    # at one batch size, the mean context of the steps differs: context is not tied to batch size
    singles = [plan.contexts[picked[0]] for picked, ks, _ in plan.steps if len(ks) == 1]
    assert max(singles) - min(singles) > 400
    # steps of every batch size are spread over the sweep, not run one size after the other
    first_half = {len(ks) for _, ks, _ in plan.steps[: len(plan.steps) // 2]}
    assert first_half == set(BATCHES)
    # every chunk size, in every round, beside decoding requests: the paced steps of serving under load;
    # the chunks follow one another through the chunked request's context, in the order they run
    chunks = [chunk for _, _, chunk in plan.steps if chunk]
    assert sorted(chunk.tokens for chunk in chunks) == sorted(CHUNK_TOKENS * ROUNDS)
    assert [chunk.cached for chunk in chunks] == [sum(c.tokens for c in chunks[:i]) for i in range(len(chunks))]
    assert plan.chunk_tokens == ALL_CHUNKS
    assert sweep_plan(16, 1200, random.Random(0), chunk_room=ALL_CHUNKS, largest_chunk=max(CHUNK_TOKENS)) == plan  # reproducible
    capped = sweep_plan(16, 1200, random.Random(0), chunk_room=ALL_CHUNKS, largest_chunk=300)  # --max-step-tokens 300
    assert {chunk.tokens for _, _, chunk in capped.steps if chunk} == {size for size in CHUNK_TOKENS if size <= 300}
    small = sweep_plan(3, 10, random.Random(0), chunk_room=ROUNDS * (CHUNK_TOKENS[0] + CHUNK_TOKENS[1]))  # a tiny model, a small cache
    assert max(small.contexts) == 10 and {len(ks) for _, ks, _ in small.steps} == {1}
    assert {chunk.tokens for _, _, chunk in small.steps if chunk} == {CHUNK_TOKENS[0], CHUNK_TOKENS[1]}  # the chunks that fit
    assert sweep_plan(3, 10, random.Random(0)).chunk_tokens == 0  # no room: no chunk steps


def test_a_prefill_chunk_is_a_row_of_its_tokens_over_its_context():
    """The profile and the controller describe a chunk alike: its tokens are new tokens, it leaves
    cached + tokens in the KV cache, and each of its tokens attends causally (the mean: cached + (tokens + 1) / 2)."""
    from router.controller.profile import step_features

    row = step_features([100, 50], [3, 0], [PrefillRow(cached=200, tokens=64)])
    assert list(row) == [1, 4 + 1 + 64, 150 + 264, 4 * 100 + 1 * 50 + 64 * 200 + 64 * 65 / 2, 3, 64]  # its longest row: the chunk
    assert step_features([100, 50], [0, 0])[-1] == 1  # nobody speculates: one token a row


def controller_with(step_cost: tuple[float, ...], initial_rate: float = 0.5, breaks: Breakpoints = Breakpoints()) -> SpeculationController:
    controller = SpeculationController(k_max=8, initial_rate=initial_rate)
    controller.verify_cost.reset_prior(step_cost, breaks)
    controller.drafter_cost("prompt_lookup")
    return controller


def test_closed_loop_speculates_when_drafts_land_and_stops_when_they_miss():
    controller = controller_with((0.03, 0.004, 0.0, 0.0, 0.001, 0.015, 0.0))
    slots = [Slot("r", "prompt_lookup", cap=8, context_tokens=100)]
    history = []
    def step(accept_all: bool) -> int:
        (k,) = controller.decide(slots)
        controller.record(slots, [k])
        controller.observe_request("r", "prompt_lookup", k, k if accept_all else 0)
        return k

    for _ in range(20):
        history.append(step(accept_all=True))
    assert history[-1] >= 6
    for n in range(40):
        if step(accept_all=False) == 0:  # the copied passage ended: every draft rejected
            break
    assert controller.decide(slots) == [0], "speculation never stopped although every draft was rejected"
    assert n >= 5  # one bad step does not outweigh twenty good ones
    # with no new evidence the estimate drifts back to the prior and speculation is tried again
    assert any(step(accept_all=False) > 0 for _ in range(40))


def test_load_turns_speculation_off():
    """Same acceptance; a cheap step speculates, a step where tokens are dear does not."""
    light = controller_with((0.05, 0.001, 0.0, 0.0, 0.0, 0.01, 0.0), initial_rate=0.8)
    heavy = controller_with((0.05, 0.03, 0.0, 0.0, 0.0, 0.05, 0.0), initial_rate=0.8)
    slots = [Slot(f"r{i}", "prompt_lookup", cap=8, context_tokens=200) for i in range(16)]
    assert sum(light.decide(slots)) > 16
    assert sum(heavy.decide(slots)) == 0


def test_hysteresis_keeps_k_when_the_gain_is_marginal():
    controller = controller_with((0.05, 0.004, 0.0, 0.0, 0.0, 0.01, 0.0))
    slots = [Slot("r", "prompt_lookup", cap=8, context_tokens=10)]
    first = controller.decide(slots)
    controller.record(slots, [first[0] - 1])  # last step verified one less: nearly as good
    assert controller.decide(slots) == [first[0] - 1]
    controller.hysteresis = 0.0
    assert controller.decide(slots) == first


def test_step_error_is_measured_and_requests_are_forgotten():
    controller = controller_with((0.05, 0.004, 0.0, 0.0, 0.0, 0.01, 0.0))
    slots = [Slot("r", "prompt_lookup", cap=4, context_tokens=10)]
    ks = controller.decide(slots)
    controller.record(slots, ks)
    controller.observe_step([10], ks, {"prompt_lookup": (ks, 0.001)}, step_s=controller.last.predicted_s * 2)
    assert controller.step_error() == pytest.approx(0.5)
    assert controller.steps == 1 and controller.k_histogram[ks[0]] == 1
    controller.observe_request("r", "prompt_lookup", 3, 1)
    controller.forget("r")
    assert controller._posteriors == {} and controller._previous == {}
    assert controller.drafter_rates("prompt_lookup").samples == 1
    profiled = controller.verify_cost.prior.copy()
    controller.reset()
    assert controller.steps == 0 and controller.rates == {} and (controller.verify_cost.coef == profiled).all()


def test_a_prefill_chunks_time_is_predicted_but_kept_out_of_the_goodput():
    """Chunked prefill: the step's prediction counts the chunk (which also takes the step past its
    jump), the goodput a draft must beat is the decoding rows' own (the pacer sized the chunk at k = 0,
    so drafts add time but displace no prompt tokens), and the refit sees the chunk as one more row."""
    controller = controller_with((0.05, 0.004, 0.0, 0.0, 0.0, 0.04, 0.0), breaks=Breakpoints(jump_tokens=2))
    slots = [Slot(f"r{i}", "prompt_lookup", cap=8, context_tokens=100) for i in range(4)]
    for slot in slots:
        for _ in range(20):
            controller.observe_request(slot.request_id, "prompt_lookup", 4, 1)  # a quarter of its drafts land
    alone = controller.decide(slots)
    assert alone == [0] * 4  # the jump is not worth paying for these drafts
    chunk = PrefillRow(cached=200, tokens=150)
    controller.begin_step([chunk])
    cost = controller.step_cost(slots)
    assert cost.jump_s == 0 and cost.base_s == pytest.approx(0.05 + 0.004 * 4)  # the chunk paid the jump; its time is apart
    ks = controller.decide(slots)
    assert sum(ks) > 0  # beside the chunk a draft costs only its token
    record = controller.record(slots, ks)
    drafting = 0.0001 + 0.000001 * sum(ks)  # prompt lookup's default cost
    assert record.predicted_s == pytest.approx(0.05 + 0.004 * (4 + sum(ks) + 150) + 0.04 + drafting)  # the jump once, paid by the chunk
    controller.observe_step([100] * 4, ks, {}, step_s=0.5, prefill=[chunk])
    row = controller.verify_cost._x[-1]  # VERIFY_FEATURES: const, new tokens, context, attended, sequences, multi-token, excess
    assert list(row) == [1, 4 + sum(ks) + 150, 400 + 350, 100 * (4 + sum(ks)) + 150 * (200 + 151 / 2), 5, 1, 0]
    controller.begin_step()  # the next step prefills nothing
    assert controller.decide(slots) == alone


def test_auto_prefers_the_drafter_whose_drafts_land_for_this_request():
    controller = controller_with((0.05, 0.004, 0.0, 0.0, 0.0, 0.01, 0.0))
    controller.drafter_cost("draft_model").reset_prior((0.001, 0.002, 0.0005))  # a cheap draft model
    for _ in range(10):
        controller.observe_request("r", "prompt_lookup", 4, 0)
        controller.observe_request("r", "draft_model", 4, 4)
    assert controller.choose_drafter("r", ["prompt_lookup", "draft_model"], cap=8, context_tokens=100) == "draft_model"
    for _ in range(30):
        controller.observe_request("r", "prompt_lookup", 4, 4)
        controller.observe_request("r", "draft_model", 4, 3)
    # equal-ish acceptance now, and prompt lookup costs next to nothing per token
    assert controller.choose_drafter("r", ["prompt_lookup", "draft_model"], cap=8, context_tokens=100) == "prompt_lookup"
    # a drafter that never has anything to propose for this request loses its appeal
    for _ in range(30):
        controller.observe_request("r", "prompt_lookup", 0, 0, asked=8)
    assert controller.choose_drafter("r", ["prompt_lookup", "draft_model"], cap=8, context_tokens=100) == "draft_model"
    assert controller.choose_drafter("r", ["prompt_lookup"], cap=0, context_tokens=100) == "none"
    assert controller.choose_drafter("r", [], cap=8, context_tokens=100) == "none"


def test_an_unlucky_first_verify_does_not_stop_speculation_for_good():
    """Regression: a drafter whose first verify rejected everything once pinned its global rate near 0,
    so no request speculated again and no evidence could ever lift it."""
    controller = controller_with((0.045, 0.0014, 0.00001, 0.0, 0.004, 0.014, 0.0))  # the embedded model's profile
    rng = random.Random(1)
    slots = [Slot(f"r{i}", "controlled", cap=8, context_tokens=100) for i in range(4)]
    chosen = []
    for step in range(60):
        ks = controller.decide(slots)
        controller.record(slots, ks)
        for slot, k in zip(slots, ks):
            accepted = 0
            while accepted < k and step > 0 and rng.random() < 0.7:  # step 0: everything rejected
                accepted += 1
            controller.observe_request(slot.request_id, "controlled", k, accepted, asked=k)
        controller.observe_step([100] * 4, ks, {"controlled": (ks, 0.0001)}, step_s=0.06)
        chosen.append(sum(ks) / len(ks))
    assert sum(chosen[-30:]) / 30 >= 1.5  # at a = 0.7 and this cost, speculating pays
    assert controller.drafter_rates("controlled").rate == pytest.approx(0.7, abs=0.1)


def test_a_sibling_for_another_replica_has_the_settings_and_the_prior_but_nothing_learned():
    controller = SpeculationController(k_max=5, request_prior_strength=8.0, tree_prior_strength=2.0, hysteresis=0.1, initial_rate=0.3, evidence_decay=0.8, rate_decay=0.99)
    controller.verify_cost.reset_prior((0.05, 0.004, 0.0, 0.0, 0.0, 0.01, 0.0))
    controller.hysteresis = 0.0  # a setting changed after construction is what the sibling copies
    controller.verify_cost.on_recalibrate = saved = lambda prior: None
    controller.observe_request("r", "prompt_lookup", 3, 1)
    sibling = controller.sibling()
    settings = ("k_max", "request_prior_strength", "tree_prior_strength", "hysteresis", "initial_rate", "evidence_decay", "rate_decay")
    assert [getattr(sibling, name) for name in settings] == [5, 8.0, 2.0, 0.0, 0.3, 0.8, 0.99]
    assert sibling.verify_cost.prior.tolist() == controller.verify_cost.prior.tolist() and sibling.verify_cost.on_recalibrate is saved
    assert sibling.rates == {} and sibling._posteriors == {}
