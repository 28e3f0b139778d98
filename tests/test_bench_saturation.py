"""`smartspec bench` at saturation, without a stack: closed-loop loads keep exactly N requests in flight,
seeds pair the policies (same requests and controlled draws per seed), the paired intervals on latency
ratios, the fixed-k-slower-than-none mark, the stack sized for --max-batch 64, and argument errors."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random

import pytest

from smartspec.bench import runner
from smartspec.bench.metrics import RequestRecord, headline, inverse, paired_ratio
from smartspec.bench.runner import BenchConfig, RouterConnection, plan, replay_closed
from smartspec.bench.workload import Load, closed_loop_schedule, load_prompts

T_975_2 = 4.302652729911275  # Student's t, 97.5th percentile, 2 degrees of freedom


# --- the closed loop ----------------------------------------------------------------------------------
class CountingConnection:
    """Streams that take a random time; counts how many are open whenever one starts or ends."""

    def __init__(self, seed: int = 0) -> None:
        self.open = 0
        self.at_start: list[int] = []
        self.at_end: list[int] = []
        self.rng = random.Random(seed)

    async def stream(self, message, record: RequestRecord, clock, timeout_s: float) -> RequestRecord:
        record.sent_s = clock()
        self.open += 1
        self.at_start.append(self.open)
        await asyncio.sleep(self.rng.uniform(0.0, 0.01))
        self.at_end.append(self.open)
        self.open -= 1
        record.token_ids = [1, 2]
        record.first_token_s = record.done_s = clock()
        if message == 3:  # a failure frees its slot too
            record.error, record.done_s = "UNAVAILABLE: gone", None
        return record


@pytest.mark.parametrize("concurrency", [1, 4, 16])
def test_closed_loop_keeps_exactly_n_in_flight_and_each_completion_sends_the_next(concurrency):
    schedule = closed_loop_schedule(load_prompts("copy"), 40, seed=3)
    connection = CountingConnection()
    records = asyncio.run(replay_closed(connection, schedule, lambda position, arrival: position, 30.0, concurrency))
    assert [r.index for r in records] == list(range(40)) and [r.prompt_index for r in records] == [a.index for a in schedule]
    assert max(connection.at_start) == concurrency
    # the first N start together; after that every start replaces the request that just ended
    assert connection.at_start[:concurrency] == list(range(1, concurrency + 1))
    assert all(n == concurrency for n in connection.at_start[concurrency:])
    assert all(n == concurrency for n in connection.at_end[: 40 - concurrency + 1])  # full until the last one is sent
    assert sum(not r.ok for r in records) == 1
    assert all(0 <= r.sent_s - r.due_s < 0.005 for r in records)  # a closed-loop request's clock starts when it is sent


def test_closed_loop_schedule_takes_prompts_in_the_poisson_schedules_order():
    prompts = load_prompts("copy")
    loop = closed_loop_schedule(prompts, 30, seed=5)
    poisson = runner.workload_schedule("copy", 2.0, 30, 5, prompts)
    assert [a.index for a in loop] == [a.index for a in poisson] and all(a.at_s == 0.0 for a in loop)


# --- seeds pair the policies --------------------------------------------------------------------------
POLICIES = ("none", "fixed:3", "fixed:7", "uniform", "goodput")


def test_plan_runs_every_policy_once_per_seed_cell_on_one_schedule_with_rotated_order():
    config = BenchConfig(workloads=["copy"], drafters=["prompt_lookup", "controlled:0.7"], rates=[2.0], concurrency=[16, 1, 64],
                         policies=POLICIES, seeds=[11, 12, 13, 14, 15], requests=8)
    runs = plan(config)
    assert len(runs) == 5 * 2 * 4 * len(POLICIES)
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)  # seeds are the outer loop
    cells: dict = {}
    for r in runs:
        cells.setdefault((r.drafter.name, r.load, r.seed), []).append(r)
    for (drafter, load, seed), cell in cells.items():
        assert sorted(r.policy for r in cell) == sorted(POLICIES) and len({r.schedule for r in cell}) == 1
        assert len(cell[0].schedule) == (max(8, load.concurrency) if load.concurrency else 8)  # the top level sends 64
    loads = config.loads_of("copy")
    assert loads == [Load(rate=2.0), Load(concurrency=1), Load(concurrency=16), Load(concurrency=64)]
    for load in loads:  # each seed opens the cell with another policy; seeds differ in their requests
        first = [cells[("prompt_lookup", load, seed)][0].policy for seed in config.seeds]
        assert len(set(first)) == len(POLICIES)
        assert len({cells[("prompt_lookup", load, seed)][0].schedule for seed in config.seeds}) == len(config.seeds)


class RecordingConnection(RouterConnection):
    """RouterConnection without a channel: every request answered at once with the reference tokens;
    remembers what each run sent."""

    sent: list = []

    def __init__(self, address: str) -> None:
        self.address, self.stats_supported = address, None

    async def close(self) -> None:
        pass

    async def stats(self, reset: bool):
        return None

    async def stream(self, message, record, clock, timeout_s):
        record.sent_s = clock()
        await asyncio.sleep(0)
        RecordingConnection.sent.append((message.policy, message.messages[-1].content, message.benchmark.seed, message.drafter))
        record.token_ids, record.first_token_s, record.done_s, record.finish_reason = [7, 8, 9], clock(), clock(), "length"
        return record


def test_every_policy_of_a_seed_sends_the_same_prompts_and_controlled_draws(monkeypatch):
    monkeypatch.setattr(runner, "RouterConnection", RecordingConnection)
    RecordingConnection.sent = []
    config = BenchConfig(workloads=["copy"], drafters=["controlled:0.7"], concurrency=[2], rates=[50.0], policies=POLICIES,
                         seeds=[1, 2, 3], requests=4)
    rows = asyncio.run(runner.run_bench("fake:1", config, progress=runner.Progress(len(plan(config)), stream=open("/dev/null", "w"))))
    assert len(rows) == 3 * 2 * len(POLICIES)
    assert {(r["rate"], r["concurrency"]) for r in rows} == {(50.0, None), (None, 2)}  # closed-loop rows: rate null
    assert {r["seed"] for r in rows} == {1, 2, 3}
    timed = RecordingConnection.sent[-len(rows) * 4:]  # after the reference pass and the warm-up
    by_run: dict = {}
    for i, row in enumerate(rows):  # runs send 4 requests each, in order
        by_run.setdefault((row["concurrency"], row["seed"]), {})[row["policy"]] = [sent[1:] for sent in timed[4 * i : 4 * i + 4]]
        assert {sent[0] for sent in timed[4 * i : 4 * i + 4]} == {row["policy"]}
    for (concurrency, seed), by_policy in by_run.items():
        requests = by_policy["goodput"]
        assert all(sorted(sent) == sorted(requests) for sent in by_policy.values())  # same prompts, same draws
        assert {draw for _, draw, _ in requests} == {seed * 1_000_003 + i for i in range(4)}
    assert by_run[(2, 1)]["none"] != by_run[(2, 2)]["none"]


# --- intervals ----------------------------------------------------------------------------------------
def test_paired_ratio_is_the_geometric_mean_with_a_t_interval_on_the_log_ratios():
    goodput = {0: 2.0, 1: 3.0, 2: 5.0}
    other = {s: v * math.exp(0.1 * (s + 1)) for s, v in goodput.items()}  # log ratios 0.1, 0.2, 0.3
    r = paired_ratio(other, goodput)
    half = T_975_2 * 0.1 / math.sqrt(3)  # sd 0.1, n 3
    assert r["ratio"] == pytest.approx(math.exp(0.2)) and r["seeds"] == 3
    assert r["low"] == pytest.approx(math.exp(0.2 - half)) and r["high"] == pytest.approx(math.exp(0.2 + half))
    assert (r["low"], r["high"]) == pytest.approx((0.952742, 1.565838), rel=1e-5)
    back = inverse(r)
    assert back["ratio"] == pytest.approx(1 / r["ratio"]) and back["low"] == pytest.approx(1 / r["high"]) and back["high"] == pytest.approx(1 / r["low"])
    one = paired_ratio({0: 3.0}, {0: 2.0})  # one seed: no interval
    assert one == {"ratio": 1.5, "low": None, "high": None, "seeds": 1}
    same = paired_ratio({0: 2.0, 1: 4.0}, {0: 1.0, 1: 2.0})  # no spread: a point
    assert same["low"] == pytest.approx(2.0) and same["high"] == pytest.approx(2.0)
    assert paired_ratio({0: 1.0, 1: None}, {0: 2.0, 1: 1.0})["seeds"] == 1  # a lost run drops its seed
    assert paired_ratio({0: 1.0}, {1: 1.0}) is None


def _row(policy, latency, seed, concurrency=64, failed=0):
    return {"workload": "copy", "drafter": "prompt_lookup", "policy": policy, "rate": None, "concurrency": concurrency, "seed": seed,
            "controlled": False, "mean_latency_s": latency, "failed": failed}


def test_headline_pairs_by_seed_and_marks_a_fixed_k_slower_than_none():
    none = [10.0, 11.0, 9.0, 10.5, 9.5]
    rows = []
    for s, base in enumerate(none):
        rows += [_row("none", base, s), _row("fixed:7", base * (1.5 + 0.01 * s), s), _row("fixed:3", base * (1.2 if s % 2 else 0.85), s),
                 _row("goodput", base * 0.8, s), _row("uniform", base * 0.9, s)]
    (entry,) = headline(rows)
    assert entry["concurrency"] == 64 and entry["rate"] is None and entry["seeds"] == 5
    assert entry["best_other_policy"] == "uniform" and entry["vs_best_other"] == pytest.approx(0.8 / 0.9)
    assert entry["vs_best_other_low"] == pytest.approx(0.8 / 0.9) and entry["vs_none"] == pytest.approx(0.8)
    assert entry["ratios"]["none"]["ratio"] == pytest.approx(1.25)
    assert entry["slower_than_none"] == ["fixed:7"]  # fixed:3 is above 1 on average, but not significantly
    assert entry["fixed_vs_none"]["fixed:3"]["low"] < 1 < entry["fixed_vs_none"]["fixed:3"]["high"]
    assert entry["fixed_vs_none"]["fixed:7"]["low"] > 1.4
    from smartspec.bench.report import headline_text

    text = headline_text([entry])
    assert "concurrency=64, 5 seeds" in text and "** fixed:7 is slower than none: 1.52 [" in text and "** fixed:3" not in text
    assert "policy / goodput: none 1.25 [1.25, 1.25], fixed:3" in text
    # one seed: ratios, but no interval and so no mark
    (single,) = headline([r for r in rows if r["seed"] == 0])
    assert single["slower_than_none"] == [] and single["vs_none_low"] is None and single["fixed_vs_none"]["fixed:7"]["ratio"] == pytest.approx(1.5)


def test_report_shows_closed_loop_rows_per_seed_and_keys_include_load_and_seed(tmp_path):
    from smartspec.bench.metrics import summarize
    from smartspec.bench.report import check_rows, plot, shown, table

    rows = []
    for seed in (1, 2):
        for policy in ("none", "goodput"):
            for load in (Load(rate=2.0), Load(concurrency=16)):
                records = [RequestRecord(j, j, 0.0, 0.0, 0.1, 1.0 + seed, list(range(5)), "length", 4, 0, 0) for j in range(3)]
                rows.append({"workload": "copy", "drafter": "prompt_lookup", "policy": policy, "rate": load.rate, "concurrency": load.concurrency,
                             "seed": seed, "controlled": False, "trace": False, **summarize(records, None)})
    check_rows(rows)
    with pytest.raises(ValueError, match="repeat"):
        check_rows(rows + rows[:1])
    text = table(shown(rows))
    assert "== copy closed-loop / prompt_lookup ==" in text and "== copy / prompt_lookup ==" in text
    assert text.count("goodput ") == 4 and " seed " in text
    plot(shown(rows), tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10000


# --- the stack at --max-batch 64 ----------------------------------------------------------------------
def test_up_gives_the_verifier_slots_for_the_batch_only_when_it_needs_them():
    from smartspec.commands.up import service_argvs, stack_options

    def slots(**options):
        argvs = service_argvs(stack_options(drafters="prompt_lookup,draft_model", **options), "t", "d")
        return {role: argv[argv.index("--max-sequences") + 1] if "--max-sequences" in argv else None for role, argv in argvs.items()}

    assert slots() == {"verifier": None, "prompt_lookup": None, "draft_model": None}  # the services' own default (32)
    assert slots(max_batch=64) == {"verifier": "64", "prompt_lookup": None, "draft_model": "64"}
    assert slots(max_batch=64, verifiers=2) == {"verifier": None, "verifier2": None, "prompt_lookup": None, "draft_model": None}
    assert slots(max_sequences=8)["verifier"] == "8"


def test_the_kv_budget_holds_max_batch_of_the_longest_requests(tiny_target):
    from router.server import RouterSettings
    from smartspec.bench.capacity import kv_cache_gb, tokens_per_sequence
    from smartspec.runtime.kv_pool import BLOCK_SIZE

    prompts = load_prompts("copy") + load_prompts("chat")
    tokens = tokens_per_sequence(prompts, 40, RouterSettings.k_max)
    assert tokens >= 2 * max(len(p.messages[-1][1]) // 4 for p in prompts) + 40 + RouterSettings.k_max + BLOCK_SIZE
    assert tokens_per_sequence(prompts, None, 8) > tokens  # the prompts' own output lengths are longer than 40
    config = json.loads((tiny_target / "config.json").read_text())
    per_token = 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", config["num_attention_heads"]) * (
        config["hidden_size"] // config["num_attention_heads"]) * 4  # float32 keys and values
    big = kv_cache_gb(tiny_target, "float32", 64, 100_000, 0.0)
    assert big == pytest.approx(64 * 100_000 * per_token / 2**30, abs=0.011)  # rounded up to 0.01 GiB
    assert kv_cache_gb(tiny_target, "bfloat16", 64, 100_000, 0.0) == pytest.approx(big / 2, abs=0.011)
    assert kv_cache_gb(tiny_target, "float32", 64, tokens, 1.0) >= 1.0  # never below up's default


# --- arguments ----------------------------------------------------------------------------------------
def _args(*argv):
    from smartspec.commands import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def no_env(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("SMARTSPEC_") and name != "SMARTSPEC_CACHE_DIR":
            monkeypatch.delenv(name)


def test_concurrency_and_seeds_flags_build_the_grid(no_env):
    from smartspec.commands.bench import build_config

    config = build_config(_args("--workloads", "copy", "--drafters", "prompt_lookup", "controlled:0.7", "--concurrency", "1,16", "64",
                                "--seeds", "0", "1", "2", "3", "4", "--max-batch", "64", "--policies", *POLICIES))
    assert config.concurrency == [1, 16, 64] and config.rates == [] and list(config.seeds) == [0, 1, 2, 3, 4]
    assert build_config(_args("--concurrency", "4", "--rates", "2", "--workloads", "copy")).rates == [2.0]
    assert list(build_config(_args("--seed", "7")).seeds) == [7] and list(build_config(_args()).seeds) == [0]
    quick = build_config(_args("--quick"))
    assert quick.concurrency == [] and list(quick.seeds) == [0] and len(plan(quick)) == 42  # --quick is as it was


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "0", "--workloads", "copy"], "concurrency levels are whole numbers >= 1"),
    (["--concurrency", "2.5"], "--concurrency takes whole numbers"),
    (["--concurrency", "many"], "--concurrency takes numbers"),
    (["--concurrency", "4", "4", "--workloads", "copy"], "concurrency levels repeat"),
    (["--seed", "1", "--seeds", "1", "2"], "--seed or --seeds"),
    (["--seeds", "1", "1"], "seeds repeat"),
    (["--concurrency", "200"], "more than the router holds"),
    (["--concurrency", "100", "--max-queue", "100", "--workloads", "copy"], "above --max-in-flight 64"),
    (["--workloads", "copy-trace", "--concurrency", "4"], "give --rates or --trace-rates"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--max-step-tokens", "-1"], "--max-step-tokens and --kv-cache-gb at least 0"),
])
def test_bad_saturation_arguments_exit_2_with_a_clear_error(no_env, tmp_path, capsys, argv, message):
    from smartspec.commands.bench import run

    assert run(_args(*argv, "--out", str(tmp_path))) == 2
    assert message in capsys.readouterr().err
