"""`smartspec bench` without a stack: workloads and schedules, metrics from synthetic records, the run plan,
the headline, the outputs' schema checks and the plot."""

from __future__ import annotations

import argparse
import math
import random
import statistics

import pytest

from smartspec.bench import workload as wl
from smartspec.bench.metrics import RequestRecord, headline, k_distribution, percentile, summarize
from smartspec.bench.runner import POLICIES, BenchConfig, parse_drafter, plan


# --- workloads ----------------------------------------------------------------------------------------
def test_shipped_prompt_sets_have_messages_and_output_lengths():
    for name in ("chat", "copy"):
        prompts = wl.load_prompts(name)
        assert len(prompts) >= 8
        assert all(p.messages and p.messages[-1][0] == "user" and p.messages[-1][1] for p in prompts)
        assert all(1 <= p.max_tokens <= 256 for p in prompts)
    with pytest.raises(ValueError, match="unknown workload"):
        wl.load_prompts("nope")


def test_poisson_schedule_is_reproducible_per_seed_and_sorted():
    prompts = wl.load_prompts("copy")
    a = wl.workload_schedule("copy", 2.0, 50, seed=7, prompts=prompts)
    b = wl.workload_schedule("copy", 2.0, 50, seed=7, prompts=prompts)
    c = wl.workload_schedule("copy", 2.0, 50, seed=8, prompts=prompts)
    assert a == b and [x.at_s for x in a] != [x.at_s for x in c]
    assert a[0].at_s == 0.0 and all(x.at_s <= y.at_s for x, y in zip(a, a[1:]))
    assert all(arrival.prompt == prompts[arrival.index] for arrival in a)
    assert len({arrival.index for arrival in a}) == len(prompts)  # every prompt is used


@pytest.mark.parametrize("rate", [0.5, 3.0, 40.0])
def test_poisson_schedule_has_the_asked_mean_rate_and_exponential_gaps(rate):
    schedule = wl.workload_schedule("chat", rate, 20000, seed=1)
    assert wl.mean_rate(schedule) == pytest.approx(rate, rel=0.03)
    gaps = [y.at_s - x.at_s for x, y in zip(schedule, schedule[1:])]
    assert statistics.pstdev(gaps) == pytest.approx(1 / rate, rel=0.05)  # exponential: sd == mean


def test_trace_rates_have_the_shape_and_the_asked_mean():
    rates = wl.trace_rates(3.0)
    assert len(rates) == len(wl.TRACE_SHAPE)
    assert [r / rates[0] for r in rates] == pytest.approx(list(wl.TRACE_SHAPE))
    n = 10  # equal arrivals per phase: mean rate = arrivals / expected span
    assert len(rates) * n / sum(n / r for r in rates) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        wl.trace_rates(0.0)


def test_trace_schedule_phases_change_rate_and_keep_the_mean():
    count, mean = 30000, 2.0
    schedule = wl.workload_schedule("copy-trace", mean, count, seed=3)
    assert schedule == wl.workload_schedule("copy-trace", mean, count, seed=3)
    counts = wl.phase_counts(count, len(wl.TRACE_SHAPE))
    assert sum(counts) == count and max(counts) - min(counts) <= 1
    measured, start = [], 0
    for n in counts:
        phase = schedule[start : start + n]
        measured.append(wl.mean_rate(phase))
        start += n
    assert measured == pytest.approx(wl.trace_rates(mean), rel=0.05)
    assert measured[1] > 3 * measured[0] and measured[1] > 3 * measured[2]  # low, high, low
    assert wl.mean_rate(schedule) == pytest.approx(mean, rel=0.05)
    assert wl.phase_counts(7, 3) == [3, 2, 2]
    assert wl.parse_workload("copy-trace") == ("copy", True) and wl.parse_workload("chat") == ("chat", False)


# --- metrics ------------------------------------------------------------------------------------------
def test_percentile_matches_linear_interpolation():
    rng = random.Random(0)
    values = [rng.random() for _ in range(101)]
    ordered = sorted(values)
    assert percentile(values, 50) == pytest.approx(ordered[50])
    assert percentile(values, 0) == ordered[0] and percentile(values, 100) == ordered[-1]
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([5.0], 99) == 5.0 and percentile([], 50) is None


def _record(index, due, first, done, tokens, steps, proposed, accepted, error=None):
    return RequestRecord(index, index, due, due, first, done, list(range(tokens)), "length", steps, proposed, accepted, error)


def test_summarize_latency_ttft_tpot_throughput_goodput_and_acceptance():
    records = [
        _record(0, 0.0, 0.5, 2.5, 11, steps=5, proposed=10, accepted=5),  # latency 2.5, ttft .5, tpot .2
        _record(1, 1.0, 1.2, 2.2, 5, steps=4, proposed=0, accepted=0),  # latency 1.2, ttft .2, tpot .25
        _record(2, 1.5, 1.6, 4.0, 1, steps=0, proposed=0, accepted=0),  # latency 2.5, ttft .1, one token: no tpot
        _record(3, 2.0, None, None, 0, 0, 0, 0, error="RESOURCE_EXHAUSTED: full"),
    ]
    stats = {"k_histogram": [6, 0, 3], "step_time_mape": 0.125, "mean_batch_size": 1.5, "steps": 9}
    row = summarize(records, stats)
    assert (row["requests"], row["completed"], row["failed"]) == (4, 3, 1)
    assert row["errors"] == {"RESOURCE_EXHAUSTED: full": 1}
    assert row["mean_latency_s"] == pytest.approx((2.5 + 1.2 + 2.5) / 3)
    assert row["p50_latency_s"] == pytest.approx(2.5)
    assert row["p99_latency_s"] == pytest.approx(2.5)
    assert row["ttft_s"] == pytest.approx((0.5 + 0.2 + 0.1) / 3)
    assert row["tpot_s"] == pytest.approx((0.2 + 0.25) / 2)
    assert row["wall_s"] == pytest.approx(4.0)  # first arrival (0.0) to last completion (4.0)
    assert row["generated_tokens"] == 17
    assert row["goodput_tok_s"] == pytest.approx(17 / 4.0)
    assert row["throughput_tok_s"] == pytest.approx((17 + 10 - 5) / 4.0)  # rejected drafts count as verified work
    assert row["request_throughput_s"] == pytest.approx(3 / 4.0)
    assert row["mean_accepted"] == pytest.approx(5 / 9)
    assert row["acceptance_rate"] == pytest.approx(0.5)
    assert row["mean_k"] == pytest.approx(10 / 9)
    assert row["k_distribution"] == {"0": pytest.approx(6 / 9), "2": pytest.approx(3 / 9)}
    assert row["cost_model_mape"] == 0.125 and row["mean_batch_size"] == 1.5


def test_summarize_without_speculation_stats_or_successes():
    row = summarize([_record(0, 0.0, 0.1, 1.0, 10, 9, 0, 0)], None)
    assert row["mean_accepted"] == 0.0 and row["acceptance_rate"] is None
    assert row["k_histogram"] is None and row["cost_model_mape"] is None
    dead = summarize([_record(0, 0.0, None, None, 0, 0, 0, 0, error="UNAVAILABLE: x")] * 2, {"k_histogram": []})
    assert dead["completed"] == 0 and dead["mean_latency_s"] is None and dead["goodput_tok_s"] is None
    assert k_distribution([]) == {} and k_distribution([0, 0]) == {}


def _row(policy, latency, rate=1.0, drafter="prompt_lookup", failed=0, controlled=False):
    return {"workload": "copy", "drafter": drafter, "policy": policy, "rate": rate, "controlled": controlled,
            "mean_latency_s": latency, "failed": failed}


def test_headline_divides_goodput_latency_by_the_best_other_and_by_none():
    rows = [_row("none", 4.0), _row("fixed:3", 2.0), _row("fixed:7", 2.5), _row("uniform", 3.0), _row("goodput", 1.5),
            _row("none", 6.0, rate=5.0), _row("fixed:3", 1.0, rate=5.0, failed=1), _row("goodput", 3.0, rate=5.0),
            _row("none", 2.0, drafter="controlled:0.7", controlled=True), _row("fixed:1", 1.0, drafter="controlled:0.7", controlled=True)]
    by_key = {(e["drafter"], e["rate"]): e for e in headline(rows)}
    low = by_key[("prompt_lookup", 1.0)]
    assert low["best_other_policy"] == "fixed:3" and low["vs_best_other"] == pytest.approx(0.75) and low["vs_none"] == pytest.approx(0.375)
    high = by_key[("prompt_lookup", 5.0)]  # a run that lost requests is not comparable
    assert high["best_other_policy"] == "none" and high["vs_best_other"] == pytest.approx(0.5)
    missing = by_key[("controlled:0.7", 1.0)]
    assert missing["controlled"] is True and missing["vs_best_other"] is None and missing["vs_none"] is None


# --- plan and configuration ---------------------------------------------------------------------------
def test_parse_drafter_names_controlled_runs():
    spec = parse_drafter("controlled:0.7")
    assert (spec.name, spec.wire, spec.acceptance, spec.controlled) == ("controlled:0.7", "controlled", 0.7, True)
    assert parse_drafter("prompt_lookup").controlled is False and parse_drafter("auto").wire == "auto"
    for bad in ("controlled", "controlled:1.5", "controlled:x", "magic"):
        with pytest.raises(ValueError):
            parse_drafter(bad)


def test_plan_interleaves_policies_and_replays_one_schedule_per_group():
    config = BenchConfig(workloads=["copy", "chat-trace"], drafters=["prompt_lookup", "controlled:0.9"], rates=[1.0, 3.0, 9.0], requests=5)
    runs = plan(config)
    keys = [(r.workload, r.drafter.name, r.policy, r.rate) for r in runs]
    assert len(keys) == len(set(keys)) == 2 * (3 + 1) * len(POLICIES)  # the trace runs at one (median) rate
    assert {r.rate for r in runs if r.workload == "chat-trace"} == {3.0}
    groups: dict = {}
    for r in runs:
        groups.setdefault((r.workload, r.rate), set()).add(r.schedule)
    assert all(len(schedules) == 1 for schedules in groups.values())  # every policy and drafter: same arrivals
    # interleaved: within a (workload, drafter) the rates come in order, each with all policies in turn
    first = [r for r in runs if r.workload == "copy" and r.drafter.name == "prompt_lookup"]
    for i, rate in enumerate([1.0, 3.0, 9.0]):
        chunk = first[i * len(POLICIES) : (i + 1) * len(POLICIES)]
        assert {r.rate for r in chunk} == {rate} and sorted(r.policy for r in chunk) == sorted(POLICIES)
    assert len({chunk.policy for chunk in first[:: len(POLICIES)]}) == 3  # a different policy opens each rate
    assert config.services() == ["prompt_lookup"]
    assert BenchConfig(workloads=["copy"], drafters=["auto"], rates=[1.0]).services() == ["prompt_lookup", "draft_model"]
    with pytest.raises(ValueError):
        BenchConfig(workloads=["copy"], drafters=["prompt_lookup"], rates=[1.0], policies=["none", "none"])
    with pytest.raises(ValueError):
        BenchConfig(workloads=["copy"], drafters=["prompt_lookup"], rates=[0.0])


def _args(*argv):
    from smartspec.commands import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_quick_profile_covers_what_the_issue_asks(monkeypatch):
    from smartspec.commands.bench import build_config

    for name in list(__import__("os").environ):
        if name.startswith("SMARTSPEC_") and name != "SMARTSPEC_CACHE_DIR":
            monkeypatch.delenv(name)
    quick = build_config(_args("--quick"))
    assert "copy" in quick.workloads and {"prompt_lookup", "controlled:0.7"} <= set(quick.drafters)
    assert len(quick.rates) >= 3 and list(quick.policies) == list(POLICIES)
    assert quick.requests <= 8 and quick.max_tokens <= 48
    full = build_config(_args())
    assert {"chat", "copy"} <= set(full.workloads) and any(w.endswith("-trace") for w in full.workloads)
    assert {"prompt_lookup", "draft_model", "auto", "controlled:0.5", "controlled:0.7", "controlled:0.9"} <= set(full.drafters)
    custom = build_config(_args("--quick", "--rates", "1,2", "4", "--drafters", "auto", "--requests", "3", "--max-tokens", "0"))
    assert custom.rates == [1.0, 2.0, 4.0] and list(custom.drafters) == ["auto"] and custom.requests == 3 and custom.max_tokens is None
    assert custom.requests_of("copy-trace") == 3 and full.requests_of("copy-trace") > full.requests_of("copy")
    assert build_config(_args("--requests", "4", "--trace-requests", "9")).requests_of("chat-trace") == 9


def test_bad_arguments_exit_2_without_starting_anything(tmp_path, capsys):
    from smartspec.commands.bench import run

    assert run(_args("--drafters", "controlled", "--out", str(tmp_path))) == 2
    assert "controlled:0.7" in capsys.readouterr().err
    assert run(_args("--rates", "fast", "--out", str(tmp_path))) == 2


# --- outputs ------------------------------------------------------------------------------------------
def test_check_rows_rejects_a_repeated_key():
    from smartspec.bench.report import check_rows

    check_rows([_row("none", 1.0), _row("goodput", 1.0)])
    with pytest.raises(ValueError, match="repeat"):
        check_rows([_row("none", 1.0), _row("none", 2.0)])


def test_table_and_plot_from_synthetic_rows(tmp_path):
    from smartspec.bench.report import headline_text, plot, table

    rows = []
    for drafter, controlled in (("prompt_lookup", False), ("controlled:0.7", True)):
        for rate in (0.5, 2.0, 8.0):
            for i, policy in enumerate(POLICIES):
                records = [_record(j, j * 0.5, j * 0.5 + 0.1, j * 0.5 + 1.0 + i * 0.1 * rate, 10, 5, 4 if policy != "none" else 0, 2 if policy != "none" else 0) for j in range(3)]
                rows.append({"workload": "copy", "drafter": drafter, "policy": policy, "rate": rate, "controlled": controlled,
                             "trace": False, **summarize(records, {"k_histogram": [3, 0, 5], "step_time_mape": 0.1})})
    text = table(rows)
    assert "copy / controlled:0.7 [controlled acceptance]" in text and "copy / prompt_lookup ==" in text
    assert text.count("goodput ") >= 6 and "0:38% 2:62%" in text
    assert "[controlled]" in headline_text(headline(rows))
    path = tmp_path / "plot.png"
    plot(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10000
    assert not math.isnan(rows[0]["mean_latency_s"])
