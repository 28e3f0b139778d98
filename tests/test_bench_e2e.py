"""`smartspec bench` end to end, as a real subprocess on the tiny models: it starts its own stack, runs a
mini benchmark (2 drafters, one real and one controlled, x 3 policies x 1 rate x 3 requests) and leaves
results.json, headline.json, report.txt and a PNG behind. Every wait is bounded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

KEY = ("workload", "drafter", "policy", "rate")
REQUIRED = (
    *KEY, "controlled", "requests", "mean_latency_s", "p50_latency_s", "p99_latency_s", "ttft_s", "tpot_s", "throughput_tok_s",
    "goodput_tok_s", "mean_accepted", "cost_model_mape", "k_histogram", "k_distribution", "completed", "failed", "mismatched_outputs",
)
POLICIES = ("none", "fixed:3", "goodput")
DRAFTERS = ("prompt_lookup", "controlled:0.9")


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("SMARTSPEC_") or k == "SMARTSPEC_CACHE_DIR"}


def test_mini_bench_against_a_stack_it_starts(tiny_target, tiny_draft, tmp_path):
    out = tmp_path / "bench"
    argv = [
        sys.executable, "-m", "smartspec.cli", "bench", "--out", str(out), "--target-model", str(tiny_target), "--draft-model", str(tiny_draft),
        "--workloads", "copy", "--drafters", *DRAFTERS, "--policies", *POLICIES, "--rates", "4", "--requests", "3", "--max-tokens", "12",
        "--request-timeout-s", "60", "--seed", "5",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=_env())
    assert done.returncode == 0, done.stderr[-4000:]

    rows = json.loads((out / "results.json").read_text())
    assert isinstance(rows, list) and len(rows) == len(DRAFTERS) * len(POLICIES)
    keys = [tuple(row[k] for k in KEY) for row in rows]
    assert len(set(keys)) == len(keys)  # no key repeated
    assert {(d, p) for _, d, p, _ in keys} == {(d, p) for d in DRAFTERS for p in POLICIES}
    for row in rows:
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, (missing, row)
        assert row["workload"] == "copy" and row["rate"] == 4.0 and row["requests"] == 3
        assert row["controlled"] is (row["drafter"] == "controlled:0.9")
        assert row["completed"] == 3 and row["failed"] == 0, row["errors"]
        assert row["mismatched_outputs"] == 0, row  # lossless: every policy gives the greedy reference's tokens
        assert 0 < row["p50_latency_s"] <= row["p99_latency_s"] and row["mean_latency_s"] > 0
        assert 0 < row["ttft_s"] < row["mean_latency_s"] and row["tpot_s"] > 0
        assert row["goodput_tok_s"] > 0 and row["throughput_tok_s"] >= row["goodput_tok_s"] * 0.999
        # a fraction (not a percentage); on these tiny models the cost model can be far off, so no upper bound
        assert isinstance(row["cost_model_mape"], float) and math.isfinite(row["cost_model_mape"]) and row["cost_model_mape"] >= 0
        assert sum(row["k_histogram"]) > 0 and abs(sum(row["k_distribution"].values()) - 1) < 1e-9
        if row["policy"] == "none":
            assert row["mean_accepted"] == 0 and row["k_distribution"] == {"0": 1.0}
    by = {(row["drafter"], row["policy"]): row for row in rows}
    # the controlled drafter proposes the greedy reference, 90% of tokens kept: fixed:3 accepts most of it
    controlled = by[("controlled:0.9", "fixed:3")]
    assert controlled["mean_accepted"] > 1.0 and controlled["acceptance_rate"] > 0.6

    headline = json.loads((out / "headline.json").read_text())
    assert {(e["drafter"], e["rate"]) for e in headline} == {(d, 4.0) for d in DRAFTERS}
    assert all(e["vs_best_other"] is not None and e["vs_none"] is not None for e in headline)
    assert next(e for e in headline if e["drafter"] == "controlled:0.9")["controlled"] is True
    assert (out / "latency_vs_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.txt").read_text()
    assert report in done.stdout and "copy / controlled:0.9 [controlled acceptance]" in report and "Headline" in report
    assert "6/6 runs" in done.stderr  # the progress bar

    # the stack it started is gone: nothing answers at its addresses any more
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["stack"]) == {"router", "verifier", "prompt_lookup"}  # only the drafter services the drafters need
    assert not any(_serving(address) for address in meta["stack"].values())


def _serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def test_bench_records_traces_that_replay_what_the_live_stack_accepted(tiny_target, tiny_draft, tmp_path):
    """`--quick --record-traces` on the tiny models writes traces/copy.jsonl with both chain drafters; the
    prompt-lookup lengths are what prompt lookup proposes, and replaying fixed:3 over the trace in the
    simulator accepts exactly as many drafts as the live fixed:3 run did."""
    from drafter_svc.prompt_lookup import NgramIndex
    from smartspec.bench.traces import accepted_prefix, read_traces
    from smartspec.simulate.loop import simulate
    from smartspec.simulate.sweep import SweepConfig, cell_of
    from smartspec.simulate.traces import TraceAcceptance
    from smartspec.simulate.world import StepCosts, load_profile

    out = tmp_path / "bench"
    argv = [
        sys.executable, "-m", "smartspec.cli", "bench", "--quick", "--record-traces", "--out", str(out), "--target-model", str(tiny_target),
        "--draft-model", str(tiny_draft), "--drafters", "prompt_lookup", "draft_model", "--policies", "none", "fixed:3", "--rates", "4",
        "--requests", "3", "--max-tokens", "12", "--request-timeout-s", "60", "--seed", "5",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 4 and all(r["completed"] == 3 and r["mismatched_outputs"] == 0 for r in rows)
    assert json.loads((out / "meta.json").read_text())["traces"] == ["traces/copy.jsonl"]

    traces = read_traces(out / "traces" / "copy.jsonl")
    assert traces.workload == "copy" and traces.k_max == 8 and traces.drafters == ("prompt_lookup", "draft_model")
    assert traces.meta["target_model"] == tiny_target.name and traces.meta["draft_model"] == tiny_draft.name and traces.meta["max_tokens_cap"] == 12
    assert [r.prompt_index for r in traces.requests] == [5, 6, 7]  # the schedule's prompts: (seed + i) mod 11
    for request in traces.requests:
        output = request.output_token_ids
        assert len(output) == 12 and len(request.prompt_token_ids) > 30
        for p in range(len(output)):
            draft = NgramIndex(1, 3).propose([*request.prompt_token_ids, *output[:p]], 8)
            assert (request.proposed["prompt_lookup"][p], request.accepted["prompt_lookup"][p]) == (len(draft), accepted_prefix(draft, output, p, 8))

    live = next(r for r in rows if r["drafter"] == "prompt_lookup" and r["policy"] == "fixed:3")
    config = SweepConfig(costs=StepCosts(load_profile("cpu-smollm2")), acceptance=TraceAcceptance(traces, "copy.jsonl"), requests=3, concurrency=[1])
    records, _ = simulate(cell_of(config, "concurrency", 1), "fixed:3")
    assert (sum(r.proposed for r in records), sum(r.accepted for r in records)) == (live["proposed"], live["accepted"])


def test_closed_loop_seeded_bench_at_max_batch_64(tiny_target, tiny_draft, tmp_path):
    """Closed-loop levels over two seeds on a stack started with --max-batch 64: rows carry their
    concurrency (rate null) and seed, every request completes losslessly, and the headline pairs the
    policies by seed with intervals."""
    out = tmp_path / "bench"
    argv = [
        sys.executable, "-m", "smartspec.cli", "bench", "--out", str(out), "--target-model", str(tiny_target), "--draft-model", str(tiny_draft),
        "--workloads", "copy", "--drafters", "controlled:0.9", "--policies", *POLICIES, "--concurrency", "1", "8", "--seeds", "3", "4",
        "--requests", "3", "--max-tokens", "8", "--max-batch", "64", "--request-timeout-s", "60",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=_env())
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 2 * 2 * len(POLICIES)
    assert {(r["rate"], r["concurrency"], r["seed"]) for r in rows} == {(None, c, s) for c in (1, 8) for s in (3, 4)}
    for row in rows:
        assert row["requests"] == max(3, row["concurrency"]) and row["completed"] == row["requests"], row["errors"]
        assert row["mismatched_outputs"] == 0
    headline = json.loads((out / "headline.json").read_text())
    assert {(e["rate"], e["concurrency"], e["seeds"]) for e in headline} == {(None, 1, 2), (None, 8, 2)}
    for entry in headline:
        assert entry["vs_none_low"] <= entry["vs_none"] <= entry["vs_none_high"]
        assert set(entry["ratios"]) == {"none", "fixed:3"} and set(entry["fixed_vs_none"]) == {"fixed:3"}
    report = (out / "report.txt").read_text()
    assert "copy closed-loop / controlled:0.9" in report and "concurrency=8, 2 seeds" in report
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["max_batch"] == 64 and meta["stack_kv_cache_gb"] >= 1.0 and meta["config"]["max_step_tokens"] is None
