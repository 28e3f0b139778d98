"""`smartspec simulate`: a deterministic world shared by every policy, the real controller in the loop,
the outcomes the world's costs imply, and acceptance replayed from recorded traces. Small cells only: each test takes a few seconds at most."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smartspec import cli
from smartspec.simulate import loop as sim_loop
from smartspec.simulate import world as sim_world
from router.prefill_budget import PREFILL_STRETCH, plan_chunks
from smartspec.simulate.load import RequestSpec
from smartspec.simulate.loop import Cell, simulate
from smartspec.simulate.sweep import BEST_FIXED, SweepConfig, best_fixed, cell_of, run_sweep
from smartspec.bench.traces import RequestTrace, TraceSet, write_traces
from smartspec.simulate.traces import TraceAcceptance, TraceTruth, load_traces, trace_names
from smartspec.simulate.world import AcceptanceModel, RequestTruth, StepCosts, interpolate, load_profile, profile_names

CPU = "cpu-smollm2"
GPU = "gpu-analytic-llama3-8b-h100"


def config(
    profile: str = CPU, mean: float = 0.7, std: float = 0.15, decay: float = 0.95, phases: float = 32.0, proposal_rate: float = 1.0, **kwargs
) -> SweepConfig:
    kwargs.setdefault("requests", 12)
    kwargs.setdefault("output_tokens", 24)
    acceptance = AcceptanceModel(mean, std, decay, phases, proposal_rate)
    return SweepConfig(costs=StepCosts(load_profile(profile)), acceptance=acceptance, **kwargs)


def latency(rows, policy: str) -> float:
    return next(r["mean_latency_s"] for r in rows if r["policy"] == policy)


def test_profiles_ship_and_name_their_sources():
    assert {CPU, GPU} <= set(profile_names())
    cpu, gpu = load_profile(CPU), load_profile(GPU)
    assert "bench/step_table.py" in cpu["source"] and cpu["noise_source"].startswith("measured")
    assert gpu["source"].startswith("analytic") and "3.35 TB/s" in gpu["roofline"]["hbm_source"] and "989" in gpu["roofline"]["flops_source"]


def test_table_interpolates_exactly_on_the_grid_and_extrapolates_linearly():
    axes = [[1.0, 3.0], [0.0, 10.0]]
    values = {(0, 0): 1.0, (0, 1): 2.0, (1, 0): 3.0, (1, 1): 4.0}
    assert interpolate(axes, values, (1, 0)) == pytest.approx(1.0)
    assert interpolate(axes, values, (2, 5)) == pytest.approx(2.5)
    assert interpolate(axes, values, (5, 0)) == pytest.approx(5.0)  # past the edge, the same slope
    profile = load_profile(CPU)
    axes = profile["verify"]["axes"]
    b, n, c = axes["batch"][2], axes["new_tokens_per_seq"][2], axes["context_per_seq"][1]
    measured = profile["verify"]["seconds"][2][2][1]
    assert StepCosts(profile).verify_s(b, b * n, b * c, b * n * c) == pytest.approx(measured, rel=1e-9)  # a measured point


def test_gpu_roofline_is_memory_bound_in_decode_and_compute_bound_at_large_steps():
    gpu = StepCosts(load_profile(GPU))
    one = gpu.verify_s(1, 1, 512, 512)
    assert one == pytest.approx(16.06e9 / 3.35e12 + 131072 * 512 / 3.35e12 + 0.003, rel=1e-3)
    assert gpu.verify_s(1, 8, 512, 8 * 512) == pytest.approx(one)  # a few more tokens are free when memory bound
    assert gpu.verify_s(256, 256 * 8, 256 * 512, 256 * 8 * 512) > 2 * gpu.verify_s(256, 256, 256 * 512, 256 * 512)


def test_beta_rates_have_the_asked_mean_and_std():
    model = AcceptanceModel(0.6, 0.1)
    rates = [RequestTruth(model, seed=3, index=i, positions=4).base for i in range(3000)]
    assert np.mean(rates) == pytest.approx(0.6, abs=0.01)
    assert np.std(rates) == pytest.approx(0.1, abs=0.01)


def test_deterministic_for_a_seed():
    cfg = config(policies=["none", "goodput"], concurrency=[2], rates=[3.0])
    first, second = run_sweep(cfg), run_sweep(cfg)
    assert first == second
    other = run_sweep(config(policies=["none", "goodput"], concurrency=[2], rates=[3.0], seed=1))
    assert [r["mean_latency_s"] for r in other] != [r["mean_latency_s"] for r in first]


def test_every_policy_sees_the_same_arrivals_and_acceptance_draws(monkeypatch):
    seen: dict[str, dict[int, tuple]] = {}
    current = {"policy": ""}

    class Spy(RequestTruth):
        def __init__(self, model, seed, index, positions):
            super().__init__(model, seed, index, positions)
            seen.setdefault(current["policy"], {})[index] = (self.base, self.rate.tobytes(), self.uniform.tobytes())

    monkeypatch.setattr(sim_world, "RequestTruth", Spy)
    cell = cell_of(config(rates=[4.0]), "rate", 4.0)
    arrivals = {}
    for policy in ("fixed:1", "goodput"):
        current["policy"] = policy
        records, _ = simulate(cell, policy)
        arrivals[policy] = sorted((r.index, r.due_s, r.prompt_index, r.tokens) for r in records)
    assert arrivals["fixed:1"] == arrivals["goodput"]
    assert seen["fixed:1"] == seen["goodput"] and len(seen["goodput"]) == 12


def test_no_speculation_wins_when_nothing_is_accepted():
    rows = run_sweep(config(CPU, mean=0.01, std=0.0, policies=["none", "fixed:7"], concurrency=[4]))
    assert latency(rows, "none") < latency(rows, "fixed:7")


def test_goodput_keeps_pace_with_none_where_prefill_bounds_a_saturated_cpu():
    """64 requests always in flight with long prompts and short outputs, drafts landing half the time:
    every draft's seconds delay the prompts being prefilled beside it, and fixed k = 7 turns slower than
    no speculation; goodput, which drafts only where the expected tokens pay for the step, is not."""
    rows = run_sweep(config(CPU, mean=0.5, std=0.0, decay=1.0, phases=0.0, policies=["none", "fixed:7", "goodput"], concurrency=[64],
                            requests=128, prompt_tokens=400, output_tokens=40, max_batch=64))
    assert latency(rows, "fixed:7") > latency(rows, "none") >= latency(rows, "goodput")


def test_deep_speculation_wins_alone_on_a_gpu_when_drafts_land():
    rows = run_sweep(config(GPU, mean=0.95, std=0.0, decay=1.0, phases=0.0, policies=["none", "fixed:7"], concurrency=[1], requests=4))
    assert latency(rows, "fixed:7") < 0.5 * latency(rows, "none")


def test_a_drafter_without_proposals_verifies_nothing():
    rows = run_sweep(config(proposal_rate=0.0, policies=["fixed:3", "goodput"], concurrency=[2]))
    assert all(r["proposed"] == 0 for r in rows)
    some = run_sweep(config(proposal_rate=0.5, policies=["fixed:3"], concurrency=[2]))
    assert 0 < some[0]["mean_k"] < 3


def test_the_controller_never_sees_the_truth_except_clairvoyant(monkeypatch):
    calls = {"gains": 0}
    gains = RequestTruth.gains

    def counted(self, generated, k):
        calls["gains"] += 1
        return gains(self, generated, k)

    monkeypatch.setattr(RequestTruth, "gains", counted)
    observed = []
    original = sim_loop.SpeculationController.observe_request

    def spy(self, request_id, drafter, proposed, accepted, asked=None, accepted_nodes=None):
        observed.append((type(request_id), type(drafter), type(proposed), type(accepted), proposed >= accepted))
        return original(self, request_id, drafter, proposed, accepted, asked=asked, accepted_nodes=accepted_nodes)

    monkeypatch.setattr(sim_loop.SpeculationController, "observe_request", spy)
    cell = cell_of(config(), "concurrency", 3)
    for policy in ("goodput", "uniform", "fixed:3"):
        simulate(cell, policy)
    assert calls["gains"] == 0  # only what the router has: views, proposal lengths, counts and seconds
    assert observed and set(observed) == {(str, str, int, int, True)}
    simulate(cell, "clairvoyant")
    assert calls["gains"] > 0


def test_clairvoyant_prices_the_steps_prefill_as_the_controller_does():
    """The reference differs from goodput in what it knows, not in what it maximises: a step's prefill
    chunk's own time is kept out of the goodput, and what a draft costs beside it is the true one."""
    from router.controller.profile import PrefillRow
    from router.policy import RequestView
    from smartspec.simulate.oracle import ClairvoyantPolicy

    costs = StepCosts(load_profile(CPU))
    chunks: list[PrefillRow] = []
    oracle = ClairvoyantPolicy(costs, {}, 8, lambda: chunks)
    views = [RequestView(request_id=f"r{i}", drafter="prompt_lookup", context_tokens=300, generated=5, max_k=8) for i in range(4)]
    alone = oracle.step_cost(views)
    assert alone.base_s == pytest.approx(costs.step_s([300] * 4, [0] * 4))
    chunks.append(PrefillRow(cached=100, tokens=48))
    beside = oracle.step_cost(views)
    assert beside.base_s == pytest.approx(alone.base_s)
    true_token_s = (costs.step_s([300] * 4, [4] * 4, chunks) - costs.step_s([300] * 4, [1] * 4, chunks)) / 12  # beside the chunk
    assert beside.token_s == pytest.approx(true_token_s)


def test_a_trace_load_runs_its_low_high_low_phases():
    rows = run_sweep(config(policies=["none"], trace_rates=[4.0]))
    row = rows[0]
    assert row["workload"] == "synthetic-trace" and row["trace"] and row["rate"] == 4.0
    low, high, last = row["phase_rates"]
    assert high == pytest.approx(4 * low) and last == pytest.approx(low)


def test_best_fixed_is_the_fastest_fixed_row():
    rows = [{"policy": "fixed:1", "mean_latency_s": 2.0}, {"policy": "fixed:3", "mean_latency_s": 1.5}, {"policy": "none", "mean_latency_s": 1.0}]
    best = best_fixed(rows)
    assert best["policy"] == BEST_FIXED and best["best_fixed_policy"] == "fixed:3" and best["mean_latency_s"] == 1.5
    assert best_fixed([{"policy": "none", "mean_latency_s": 1.0}]) is None


def test_help_works(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["simulate", "--help"])
    assert exit_.value.code == 0
    assert "--cost-profile" in capsys.readouterr().out


def test_cli_writes_bench_shaped_outputs(tmp_path, capsys):
    out = tmp_path / "sim"
    code = cli.main([
        "simulate", "--out", str(out), "--requests", "6", "--output-tokens", "16", "--concurrency", "2", "--rates", "5", "--trace-rates", "5",
        "--policies", "none", "fixed:1", "fixed:3", "goodput", "clairvoyant",
    ])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 3 * 6  # 5 policies and best-fixed, at three loads
    for row in rows:
        for field in ("policy", "rate", "concurrency", "mean_latency_s", "p50_latency_s", "p99_latency_s", "ttft_s", "tpot_s", "throughput_tok_s"):
            assert field in row
        assert (row["rate"] is None) != (row["concurrency"] is None)
        assert row["completed"] == 6
    entries = json.loads((out / "headline.json").read_text())
    assert len(entries) == 3 and all(e["vs_best_fixed"] is not None and e["vs_clairvoyant"] is not None for e in entries)
    assert (out / "latency_vs_load.png").stat().st_size > 0
    assert "vs best-fixed" in capsys.readouterr().out


def test_bad_flags_exit_2(capsys):
    assert cli.main(["simulate", "--concurrency", "300"]) == 2
    assert cli.main(["simulate", "--policies", "bogus"]) == 2
    assert cli.main(["simulate", "--cost-profile", "nope"]) == 2
    assert "simulate:" in capsys.readouterr().err


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_a_stale_startup_profile_is_corrected_within_50_steps(scale, monkeypatch):
    """A cached profile 2x too slow or too fast for the machine: live steps pull the step-time
    prediction to the truth (error under 15%) within 50 steps."""
    from router.controller.controller import SpeculationController

    controllers = []

    class Recorded(SpeculationController):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            controllers.append(self)

    monkeypatch.setattr(sim_loop, "SpeculationController", Recorded)
    cell = cell_of(config(profile_scale=scale, requests=40, output_tokens=48, concurrency=[8]), "concurrency", 8)
    simulate(cell, "goodput")
    errors = list(controllers[-1]._step_errors)  # every step's |predicted - true| / true, in order
    assert 100 <= len(errors) < controllers[-1]._step_errors.maxlen
    assert np.mean(errors[:8]) > 0.3  # the stale profile was wrong at first (the first refit comes after 8 steps)
    assert np.mean(errors[50:]) < 0.15
    assert controllers[-1].verify_cost.recalibrations >= 1


# --- acceptance replayed from recorded traces -------------------------------------------------------
def hand_traces() -> TraceAcceptance:
    """Two recorded requests of 10 output tokens: at each position how many drafts prompt lookup
    proposed (0: none) and how many of them the target agreed with."""
    requests = (
        RequestTrace(0, tuple(range(20)), tuple(range(10)), {"prompt_lookup": (8, 8, 0, 3, 8, 2, 8, 8, 2, 1)}, {"prompt_lookup": (5, 4, 0, 3, 6, 0, 4, 3, 2, 1)}),
        RequestTrace(1, tuple(range(30)), tuple(range(10)), {"prompt_lookup": (0, 0, 8, 8, 8, 8, 8, 3, 2, 1)}, {"prompt_lookup": (0, 0, 1, 0, 6, 5, 4, 3, 2, 1)}),
    )
    return TraceAcceptance(TraceSet("hand", 8, ("prompt_lookup",), requests), "hand.jsonl")


def walk(request: RequestTrace, k: int) -> tuple[int, int]:
    """fixed:k over one recorded request, by hand: (proposed, accepted) summed over its steps."""
    proposed, accepted = request.proposed["prompt_lookup"], request.accepted["prompt_lookup"]
    n, p, total_proposed, total_accepted = len(request.output_token_ids), 1, 0, 0  # the Prefill gives token 0
    while p < n:
        drafts = min(k, n - p - 1, proposed[p])
        landed = min(drafts, accepted[p])
        total_proposed, total_accepted, p = total_proposed + drafts, total_accepted + landed, p + landed + 1
    return total_proposed, total_accepted


def trace_config(acceptance, **kwargs) -> SweepConfig:
    kwargs.setdefault("requests", 12)
    return SweepConfig(costs=StepCosts(load_profile(CPU)), acceptance=acceptance, **kwargs)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_fixed_k_replay_accepts_min_of_k_and_the_recorded_prefix(k):
    acceptance = hand_traces()
    cell = cell_of(trace_config(acceptance, requests=5, concurrency=[2]), "concurrency", 2)
    records, _ = simulate(cell, f"fixed:{k}")
    assert len(records) == 5
    for record in records:
        request = acceptance.traces.requests[record.prompt_index]
        assert record.prompt_index == record.index % 2  # seed 0: recorded requests in turn
        assert record.tokens == len(request.output_token_ids)
        assert (record.proposed, record.accepted) == walk(request, k)


def test_a_trace_request_takes_its_lengths_and_is_cycled_by_seed_and_index():
    acceptance = hand_traces()
    for seed in (0, 3):
        cell = cell_of(trace_config(acceptance, requests=7, seed=seed, rates=[2.0]), "rate", 2.0)
        assert [r.prompt_index for r in cell.requests] == [(i + seed) % 2 for i in range(7)]
        assert [(r.prompt_tokens, r.output_tokens) for r in cell.requests] == [(20 + 10 * ((i + seed) % 2), 10) for i in range(7)]


def test_a_replay_is_deterministic_and_every_policy_sees_the_same_truth(monkeypatch):
    seen: dict[str, dict[int, tuple]] = {}
    current = {"policy": ""}
    truth = TraceAcceptance.truth

    def spy(self, seed, spec, drafter):
        made = truth(self, seed, spec, drafter)
        seen.setdefault(current["policy"], {})[spec.index] = (spec.prompt_index, tuple(made.proposed), tuple(made.landed))
        return made

    monkeypatch.setattr(TraceAcceptance, "truth", spy)
    cell = cell_of(trace_config(TraceAcceptance.load("copy"), requests=30, rates=[6.0]), "rate", 6.0)
    arrivals = {}
    for policy in ("fixed:1", "goodput", "clairvoyant"):
        current["policy"] = policy
        records, _ = simulate(cell, policy)
        arrivals[policy] = sorted((r.index, r.due_s, r.prompt_index, r.tokens) for r in records)
    assert arrivals["fixed:1"] == arrivals["goodput"] == arrivals["clairvoyant"]
    assert seen["fixed:1"] == seen["goodput"] == seen["clairvoyant"] and len(seen["goodput"]) == 30
    cfg = trace_config(TraceAcceptance.load("copy"), requests=20, policies=["fixed:3", "goodput"], concurrency=[4])
    assert run_sweep(cfg) == run_sweep(cfg)


def test_the_controller_never_sees_the_trace_except_clairvoyant(monkeypatch):
    calls = {"gains": 0}
    gains = TraceTruth.gains

    def counted(self, generated, k):
        calls["gains"] += 1
        return gains(self, generated, k)

    monkeypatch.setattr(TraceTruth, "gains", counted)
    cell = cell_of(trace_config(TraceAcceptance.load("copy"), requests=12), "concurrency", 3)
    for policy in ("goodput", "uniform", "fixed:3"):
        simulate(cell, policy)
    assert calls["gains"] == 0
    records, _ = simulate(cell, "clairvoyant")
    assert calls["gains"] > 0
    assert sum(r.proposed for r in records) > 0


def test_trace_gains_are_certain():
    truth = hand_traces().truth(0, cell_of(trace_config(hand_traces(), requests=1, concurrency=[1]), "concurrency", 1).requests[0], "prompt_lookup")
    assert truth.gains(0, 7) == (1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0)
    assert truth.gains(2, 3) == (0.0, 0.0, 0.0) and truth.proposal(2, 5) == 0  # no proposal there
    assert truth.proposal(3, 5) == 3 and truth.accepted(3, 2) == 2 and truth.accepted(4, 8) == 6
    assert truth.proposal(10, 5) == 0 and truth.accepted(10, 5) == 0  # past the recorded output


def test_shipped_traces_cover_the_shipped_prompts_and_replay_prompt_lookup_exactly():
    from drafter_svc.prompt_lookup import NgramIndex
    from smartspec.bench.traces import accepted_prefix
    from smartspec.bench.workload import load_prompts

    assert {"copy", "chat"} <= set(trace_names())
    rates = {}
    for name in ("copy", "chat"):
        traces = load_traces(name)
        prompts = load_prompts(name)
        assert traces.workload == name and traces.k_max == 8 and set(traces.drafters) == {"prompt_lookup", "draft_model"}
        assert [r.prompt_index for r in traces.requests] == list(range(len(prompts)))
        for request, prompt in zip(traces.requests, prompts):
            assert 0 < len(request.output_token_ids) <= prompt.max_tokens
            output = request.output_token_ids
            for p in range(len(output)):  # the file holds what prompt lookup proposes there
                draft = NgramIndex(1, 3).propose([*request.prompt_token_ids, *output[:p]], 8)
                assert (request.proposed["prompt_lookup"][p], request.accepted["prompt_lookup"][p]) == (len(draft), accepted_prefix(draft, output, p, 8))
        landed = [a for r in traces.requests for a in r.accepted["prompt_lookup"]]
        rates[name] = sum(landed) / len(landed)
    assert rates["copy"] > 2 * rates["chat"]  # the copy prompts are where prompt lookup shines


def test_cli_replays_a_shipped_trace_into_bench_shaped_outputs(tmp_path, capsys):
    out = tmp_path / "sim"
    code = cli.main(["simulate", "--workload", "copy", "--out", str(out), "--requests", "24", "--concurrency", "4", "--rates", "3",
                     "--policies", "none", "fixed:3", "goodput", "clairvoyant"])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 2 * 5  # 4 policies and best-fixed, at two loads
    lengths = {len(r.output_token_ids) for r in load_traces("copy").requests}
    for row in rows:
        assert row["workload"] == "copy" and row["acceptance_trace"] == "copy" and row["acceptance_mean"] is None
        assert row["completed"] == 24 and row["generated_tokens"] <= 24 * max(lengths)
    assert next(r for r in rows if r["policy"] == "fixed:3")["accepted"] > 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["workload"] == "copy" and meta["trace"]["k_max"] == 8
    assert "copy closed-loop" in (out / "report.txt").read_text()
    assert cli.main(["simulate", "--workload", "copy", "--drafter", "controlled", "--out", str(out)]) == 2
    assert cli.main(["simulate", "--workload", "copy", "--output-tokens", "5", "--out", str(out)]) == 2
    assert cli.main(["simulate", "--workload", "nope", "--out", str(out)]) == 2
    assert cli.main(["simulate", "--workload", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "recorded prompt_lookup" in capsys.readouterr().err


def test_cli_replays_a_trace_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    write_traces(path, hand_traces().traces)
    out = tmp_path / "sim"
    assert cli.main(["simulate", "--workload", str(path), "--out", str(out), "--requests", "6", "--concurrency", "2", "--policies", "fixed:3"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert {r["workload"] for r in rows} == {"mine"}
    want = [walk(hand_traces().traces.requests[i % 2], 3) for i in range(6)]
    fixed = next(r for r in rows if r["policy"] == "fixed:3")
    assert (fixed["proposed"], fixed["accepted"]) == tuple(map(sum, zip(*want)))


@pytest.mark.parametrize(
    ("decoding", "left", "expected"),
    [
        (8, [100, 30], [40, 0]),  # the step's room, first come first served
        (8, [30, 100], [30, 10]),
        (0, [100, 30], [100, 0]),  # nothing decodes: the first prompt in line goes whole
        (0, [30, 100], [30, 10]),
    ],
)
def test_prefill_chunks_fill_the_room_in_admission_order(decoding, left, expected):
    assert plan_chunks(40, decoding, left) == expected


def test_a_long_prompt_is_prefilled_in_paced_chunks_beside_the_decoding_requests(monkeypatch):
    """As in the router: the long prompt goes in pieces while the others decode, never whole, and a step
    that prefills takes about PREFILL_STRETCH times one that only decodes: the pacer prices steps with
    the controller's cost model, fitted from the startup profile, and the world's true times agree."""
    steps = []
    original, profile = StepCosts.step_s, sim_loop.startup_profile

    def spy(self, contexts, ks, chunks=()):
        seconds = original(self, contexts, ks, chunks)
        steps.append((len(ks), sum(c.tokens for c in chunks), seconds))
        return seconds

    def profile_unseen(*args, **kwargs):  # the startup sweep's steps are not the loop's
        profile(*args, **kwargs)
        steps.clear()

    monkeypatch.setattr(StepCosts, "step_s", spy)
    monkeypatch.setattr(sim_loop, "startup_profile", profile_unseen)
    requests = [RequestSpec(i, 0, 40, 200, arrival_s=0.0) for i in range(4)] + [RequestSpec(4, 0, 1500, 8, arrival_s=2.0)]
    cell = Cell(StepCosts(load_profile(CPU)), AcceptanceModel(0.7, 0.1), tuple(requests), "prompt_lookup", 8, None, 0, 0.0)
    records, _ = simulate(cell, "none")
    assert len(records) == 5
    stretches, decode_s = [], None
    for decoding, tokens, seconds in steps:
        if decoding and not tokens:
            decode_s = seconds
        elif decoding and decode_s is not None:
            stretches.append(seconds / decode_s)
    assert len(stretches) >= 10  # the long prompt went in pieces while the others decoded, never whole
    assert np.median(stretches[2:]) == pytest.approx(PREFILL_STRETCH, rel=0.1)
    assert max(stretches[2:]) < 1.25 * PREFILL_STRETCH  # paced as its context grows, not only on average


def test_max_tokens_caps_every_output_a_trace_requests_too():
    """As `smartspec bench --max-tokens`: what the real runs it is compared with generate."""
    acceptance = TraceAcceptance.load("chat")
    capped = SweepConfig(costs=StepCosts(load_profile(CPU)), acceptance=acceptance, requests=8, max_tokens=10)
    cell = cell_of(capped, "concurrency", 2)
    own = cell_of(SweepConfig(costs=StepCosts(load_profile(CPU)), acceptance=acceptance, requests=8), "concurrency", 2)
    assert [r.output_tokens for r in cell.requests] == [min(r.output_tokens, 10) for r in own.requests]
    assert max(r.output_tokens for r in own.requests) > 10
    records, _ = simulate(cell, "goodput")
    assert all(len(r.token_ids) <= 10 for r in records)
