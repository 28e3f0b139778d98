"""Drives one benchmark against a router: plans the runs, replays each run's schedule with asyncio gRPC
streams, resets and reads the router's Stats around every run, and turns each run into a results row.

A run is one (workload, drafter, load, seed, policy). A load is a Poisson rate (a seeded schedule of
arrivals replayed against the router) or a closed-loop concurrency N (N requests always in flight, each
completion sending the next). Every policy of a (workload, drafter, load, seed) cell replays the same
requests (and the same controlled draws), back to back, starting at a different policy at each load and
seed so that drift favours none; the router's controller state is reset (Stats reset=true) before
every run. Seeds are the outer loop, so an interrupted benchmark has whole seeds of every cell.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from smartspec.bench.metrics import RequestRecord, summarize
from smartspec.bench.workload import (
    Arrival, Load, Prompt, closed_loop_schedule, load_prompts, parse_workload, phase_counts, trace_rates, workload_schedule,
)

POLICIES = ("none", "fixed:1", "fixed:3", "fixed:5", "fixed:7", "uniform", "goodput")
REAL_DRAFTERS = ("prompt_lookup", "draft_model", "tree", "auto")
CONTROLLED = "controlled"
# Drafter services each drafter needs behind the router ('controlled' lives in the router itself).
SERVICES = {"prompt_lookup": ("prompt_lookup",), "draft_model": ("draft_model",), "tree": ("tree",), "auto": ("prompt_lookup", "draft_model")}


@dataclass(frozen=True)
class DrafterSpec:
    """A drafter as results name it ('prompt_lookup', 'controlled:0.7') and as the wire sends it."""

    name: str
    wire: str
    acceptance: float | None = None  # controlled drafters only

    @property
    def controlled(self) -> bool:
        return self.acceptance is not None


def parse_drafter(name: str) -> DrafterSpec:
    """'prompt_lookup' | 'draft_model' | 'tree' | 'auto' | 'none' | 'controlled:A' (0 <= A <= 1)."""
    name = name.strip()
    if name.startswith(CONTROLLED + ":"):
        raw = name.split(":", 1)[1]
        try:
            a = float(raw)
        except ValueError:
            raise ValueError(f"drafter {name!r}: the acceptance after 'controlled:' must be a number in [0, 1]") from None
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"drafter {name!r}: the acceptance must be in [0, 1]")
        return DrafterSpec(f"{CONTROLLED}:{raw}", CONTROLLED, a)
    if name == CONTROLLED:
        raise ValueError("drafter 'controlled' needs its acceptance rate, e.g. controlled:0.7")
    if name not in (*REAL_DRAFTERS, "none"):
        raise ValueError(f"unknown drafter {name!r}; use prompt_lookup, draft_model, tree, auto, none or controlled:A")
    return DrafterSpec(name, name)


def check_policy(name: str) -> str:
    if name in POLICIES or name.startswith("fixed:"):
        return name
    raise ValueError(f"unknown policy {name!r}; the benchmark's policies are {', '.join(POLICIES)}")


@dataclass
class BenchConfig:
    """What to run. `max_tokens` caps every prompt's own output length (None: the prompt's own)."""

    workloads: Sequence[str]
    drafters: Sequence[str]
    rates: Sequence[float] = ()
    policies: Sequence[str] = POLICIES
    trace_rates: Sequence[float] | None = None  # mean rates of '-trace' workloads (None: the median of `rates`)
    requests: int = 6  # per run; a closed-loop run at concurrency N sends max(requests, N)
    trace_requests: int | None = None  # requests per run of a '-trace' workload (None: `requests`)
    seeds: Sequence[int] = (0,)
    concurrency: Sequence[int] = ()  # closed-loop levels (requests in flight)
    max_tokens: int | None = None
    request_timeout_s: float = 120.0
    max_in_flight: int = 64

    def __post_init__(self) -> None:
        self.drafter_specs = [parse_drafter(d) for d in self.drafters]
        self.policies = [check_policy(p) for p in self.policies]
        for name in self.workloads:
            load_prompts(parse_workload(name)[0])  # fails early on an unknown workload
        if not self.rates and not self.concurrency:
            raise ValueError("give at least one rate or concurrency level")
        if self.rates and min(self.rates) <= 0:
            raise ValueError("rates must be > 0")
        if any(int(n) != n or n < 1 for n in self.concurrency):
            raise ValueError(f"concurrency levels are whole numbers >= 1 (got {' '.join(map(str, self.concurrency))})")
        self.concurrency = [int(n) for n in self.concurrency]
        if max(self.concurrency, default=0) > self.max_in_flight:
            raise ValueError(f"concurrency {max(self.concurrency)} is above --max-in-flight {self.max_in_flight}; raise it")
        if not self.seeds:
            raise ValueError("give at least one seed")
        for name in self.workloads:
            if parse_workload(name)[1] and not self.rates and self.trace_rates is None:
                raise ValueError(f"workload {name} is a time-varying rate, not a closed loop: give --rates or --trace-rates, or leave it out of --workloads")
        if self.trace_rates is not None and (not self.trace_rates or min(self.trace_rates) <= 0):
            raise ValueError("trace rates must be > 0")
        if self.requests < 1 or (self.trace_requests is not None and self.trace_requests < 1):
            raise ValueError("--requests and --trace-requests must be at least 1")
        named = (("workloads", self.workloads), ("drafters", [d.name for d in self.drafter_specs]), ("policies", self.policies),
                 ("seeds", list(map(str, self.seeds))), ("concurrency levels", list(map(str, self.concurrency))))
        for label, values in named:
            if len(set(values)) != len(values):
                raise ValueError(f"{label} repeat a name: {', '.join(values)}")

    def rates_of(self, workload: str) -> list[float]:
        if not parse_workload(workload)[1]:
            return sorted(self.rates)
        if self.trace_rates is not None:
            return sorted(self.trace_rates)
        ordered = sorted(self.rates)
        return [ordered[(len(ordered) - 1) // 2]]

    def loads_of(self, workload: str) -> list[Load]:
        """The rates, then the closed-loop levels, of `workload` (a '-trace' workload: its rates only)."""
        rates = [Load(rate=r) for r in self.rates_of(workload)]
        return rates + ([] if parse_workload(workload)[1] else [Load(concurrency=n) for n in sorted(self.concurrency)])

    def requests_of(self, workload: str, load: Load | None = None) -> int:
        """Requests per run: at least N at concurrency N, so that every level reaches its N in flight."""
        if load is not None and load.concurrency is not None:
            return max(self.requests, load.concurrency)
        if parse_workload(workload)[1] and self.trace_requests is not None:
            return self.trace_requests
        return self.requests

    def services(self) -> list[str]:
        """Drafter services the stack must run for these drafters."""
        out: list[str] = []
        for spec in self.drafter_specs:
            for service in SERVICES.get(spec.wire, ()):
                if service not in out:
                    out.append(service)
        return out


@dataclass(frozen=True)
class RunSpec:
    workload: str
    drafter: DrafterSpec
    policy: str
    load: Load
    seed: int
    schedule: tuple[Arrival, ...]

    @property
    def rate(self) -> float | None:
        return self.load.rate

    @property
    def concurrency(self) -> int | None:
        return self.load.concurrency

    @property
    def label(self) -> str:
        tag = " [controlled]" if self.drafter.controlled else ""
        return f"{self.workload}/{self.drafter.name}{tag} {self.load.label} seed={self.seed} policy={self.policy}"


def schedule_of(workload: str, load: Load, count: int, seed: int, prompts: Sequence[Prompt]) -> list[Arrival]:
    """The requests of a run: a seeded Poisson (or trace) schedule, or a closed loop's prompts in turn."""
    if load.concurrency is not None:
        return closed_loop_schedule(prompts, count, seed)
    return workload_schedule(workload, load.rate, count, seed, prompts)


def plan(config: BenchConfig) -> list[RunSpec]:
    """Every run, in order: for each seed, per workload, drafter and load, the policies back to back
    (rotated by one at each load and each seed so that no policy always runs first). Schedules depend
    only on (workload, load, count, seed): the same for every policy and every drafter."""
    runs = []
    n = len(config.policies)
    for s, seed in enumerate(config.seeds):
        for workload in config.workloads:
            prompts = load_prompts(parse_workload(workload)[0])
            for drafter in config.drafter_specs:
                for i, load in enumerate(config.loads_of(workload)):
                    schedule = tuple(schedule_of(workload, load, config.requests_of(workload, load), seed, prompts))
                    for j in range(n):
                        runs.append(RunSpec(workload, drafter, config.policies[(i + s + j) % n], load, seed, schedule))
    return runs


def max_tokens_of(prompt: Prompt, cap: int | None) -> int:
    return min(prompt.max_tokens, cap) if cap else prompt.max_tokens


# --- talking to the router -----------------------------------------------------------------------------
class RouterConnection:
    """One grpc.aio channel to the router (loopback), with the calls the benchmark makes."""

    def __init__(self, address: str) -> None:
        import grpc

        from smartspec.wire import router_pb2_grpc

        self.address = address
        self._grpc = grpc
        self.channel = grpc.aio.insecure_channel(
            address, options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        )
        self.stub = router_pb2_grpc.RouterServiceStub(self.channel)
        self.stats_supported: bool | None = None

    async def close(self) -> None:
        await self.channel.close()

    def request(self, prompt: Prompt, max_tokens: int, drafter: DrafterSpec, policy: str, reference: Sequence[int] | None, seed: int):
        from smartspec.wire import router_pb2

        message = router_pb2.GenerateRequest(max_tokens=max_tokens, drafter=drafter.wire, policy=policy)
        for role, content in prompt.messages:
            message.messages.add(role=role, content=content)
        if drafter.controlled:
            message.benchmark.CopyFrom(
                router_pb2.BenchmarkOptions(reference_token_ids=list(reference or ()), controlled_acceptance=drafter.acceptance, seed=seed)
            )
        return message

    async def stream(self, message, record: RequestRecord, clock: Callable[[], float], timeout_s: float) -> RequestRecord:
        """Sends one streaming request and fills `record` as chunks arrive."""
        from smartspec.wire import router_pb2

        record.sent_s = clock()
        try:
            call = self.stub.GenerateStream(message, timeout=timeout_s)
            async for reply in call:
                if reply.token_ids:
                    if record.first_token_s is None:
                        record.first_token_s = clock()
                    record.token_ids.extend(reply.token_ids)
                if reply.finish_reason != router_pb2.FINISH_REASON_UNSPECIFIED:
                    record.done_s = clock()
                    record.finish_reason = router_pb2.FinishReason.Name(reply.finish_reason).removeprefix("FINISH_REASON_").lower()
                    record.steps, record.proposed, record.accepted = reply.stats.steps, reply.stats.proposed, reply.stats.accepted
                    record.prompt_tokens = reply.stats.prompt_tokens or None
            if record.done_s is None:
                record.error = "INTERNAL: the stream ended without a finish reason"
        except self._grpc.aio.AioRpcError as err:
            record.error = f"{err.code().name}: {err.details()}"
            record.done_s = None
        return record

    async def stats(self, reset: bool) -> dict | None:
        """The router's Stats as a dict (resetting them when asked), or None when the router has no
        Stats RPC (UNIMPLEMENTED); then the Stats columns of the results are null."""
        from smartspec.wire import router_pb2

        if self.stats_supported is False:
            return None
        try:
            reply = await self.stub.Stats(router_pb2.StatsRequest(reset=reset), timeout=30)
        except self._grpc.aio.AioRpcError as err:
            if err.code() == self._grpc.StatusCode.UNIMPLEMENTED:
                self.stats_supported = False
                return None
            raise
        self.stats_supported = True
        return {
            "steps": reply.steps,
            "mean_batch_size": reply.mean_batch_size,
            "step_time_mape": reply.step_time_mape,
            "k_histogram": list(reply.k_histogram),
            "drafters": [
                {
                    "name": d.name, "acceptance_rate": d.acceptance_rate, "proposed": d.proposed, "accepted": d.accepted,
                    "acceptance_by_position": list(d.acceptance_by_position),
                }
                for d in reply.drafters
            ],
            "verify_cost": dict(reply.verify_cost),
        }


async def replay(
    connection: RouterConnection,
    schedule: Sequence[Arrival],
    make_request: Callable[[int, Arrival], object],
    timeout_s: float,
    max_in_flight: int,
) -> list[RequestRecord]:
    """Sends each arrival when it is due (at most `max_in_flight` at once; a held request's clock still
    starts when it was due) and waits for all of them. Each call has a deadline, so this ends by itself."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    clock = lambda: loop.time() - start  # noqa: E731
    bound = asyncio.Semaphore(max_in_flight)

    async def one(position: int, arrival: Arrival) -> RequestRecord:
        record = RequestRecord(position, arrival.index, arrival.at_s)
        delay = arrival.at_s - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        async with bound:
            return await connection.stream(make_request(position, arrival), record, clock, timeout_s)

    tasks = [asyncio.create_task(one(position, arrival)) for position, arrival in enumerate(schedule)]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def replay_closed(
    connection: RouterConnection,
    schedule: Sequence[Arrival],
    make_request: Callable[[int, Arrival], object],
    timeout_s: float,
    concurrency: int,
) -> list[RequestRecord]:
    """A closed loop: `concurrency` requests in flight from the start, each completion (or failure)
    sending the next request of `schedule` at once, until none is left. A request's clock starts when it
    is sent: the load is the concurrency, so there is no arrival to be late for."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    clock = lambda: loop.time() - start  # noqa: E731
    records: list[RequestRecord] = []
    pending = iter(enumerate(schedule))  # shared by the workers: each takes the next request when free

    async def worker() -> None:
        for position, arrival in pending:
            record = RequestRecord(position, arrival.index, clock())
            records.append(record)
            await connection.stream(make_request(position, arrival), record, clock, timeout_s)

    tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(schedule)))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return sorted(records, key=lambda r: r.index)


# --- the whole benchmark ------------------------------------------------------------------------------
@dataclass
class Progress:
    """A plain-text progress bar on stderr: redrawn in place on a terminal, one line per run otherwise."""

    total: int
    stream: object = field(default_factory=lambda: sys.stderr)
    width: int = 24
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    runs_started: float | None = None  # when the first timed run began (the ETA ignores the setup before it)

    def begin(self) -> None:
        self.runs_started = time.monotonic()

    def show(self, label: str, final: bool = False) -> None:
        """Redraws the bar with `label`; without a terminal only run ends (final) and notes get a line."""
        elapsed = time.monotonic() - self.started
        per_run = (time.monotonic() - (self.runs_started or self.started)) / self.done if self.done else None
        eta = per_run * (self.total - self.done) if per_run is not None else None
        filled = int(self.width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        text = f"[{bar}] {self.done}/{self.total} runs  {_clock(elapsed)} elapsed"
        text += f", ~{_clock(eta)} left" if eta is not None else ""
        text += f"  {label}"
        tty = getattr(self.stream, "isatty", lambda: False)()
        if tty:
            self.stream.write("\r\033[K" + text)
            if self.done == self.total:
                self.stream.write("\n")
        elif final or self.done == 0:
            self.stream.write(text + "\n")
        self.stream.flush()

    def step(self, label: str) -> None:
        self.done += 1
        self.show(label, final=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


async def fetch_references(
    connection: RouterConnection, config: BenchConfig, timeout_s: float, concurrency: int = 8
) -> dict[tuple[str, int], RequestRecord]:
    """The target's greedy output (policy none, drafter none) of every prompt the runs use, keyed by
    (prompt set, prompt index): what the controlled drafters propose, what every run's output is
    checked against (greedy output is the same under every policy), and what acceptance traces replay."""
    wanted: dict[tuple[str, int], Prompt] = {}
    for run in plan(config):
        for arrival in run.schedule:
            wanted[(parse_workload(run.workload)[0], arrival.index)] = arrival.prompt
    bound = asyncio.Semaphore(concurrency)
    none = DrafterSpec("none", "none")

    async def one(key: tuple[str, int], prompt: Prompt) -> tuple[tuple[str, int], RequestRecord]:
        async with bound:
            record = RequestRecord(0, key[1], 0.0)
            message = connection.request(prompt, max_tokens_of(prompt, config.max_tokens), none, "none", None, 0)
            return key, await connection.stream(message, record, time.monotonic, timeout_s)

    results = await asyncio.gather(*(one(key, prompt) for key, prompt in wanted.items()))
    failed = [f"{key}: {record.error}" for key, record in results if not record.ok]
    if failed:
        raise RuntimeError("the reference pass (policy none, drafter none) failed: " + "; ".join(failed[:3]))
    return dict(results)


async def warm_up(connection: RouterConnection, config: BenchConfig, timeout_s: float) -> None:
    """One short request per real drafter, so no timed run pays a first call's lazy setup."""
    prompt = load_prompts(parse_workload(config.workloads[0])[0])[0]
    names = [d for d in config.drafter_specs if not d.controlled and d.wire != "none"]

    async def one(drafter: DrafterSpec) -> None:
        record = await connection.stream(connection.request(prompt, 8, drafter, "fixed:3", None, 0), RequestRecord(0, 0, 0.0), time.monotonic, timeout_s)
        if not record.ok:
            print(f"smartspec bench: warm-up with drafter {drafter.name} failed: {record.error}", file=sys.stderr, flush=True)

    await asyncio.gather(*(one(d) for d in names))


def row_of(run: RunSpec, records: Sequence[RequestRecord], stats: Mapping | None, references: Mapping, cap: int | None) -> dict:
    """The results row of one run: its key, its labels, then the metrics (see smartspec.bench.metrics)."""
    base, is_trace = parse_workload(run.workload)
    mismatched = sum(
        1 for r in records if r.ok and references.get((base, r.prompt_index)) is not None and r.token_ids != references[(base, r.prompt_index)]
    )
    schedule = run.schedule
    realized = (len(schedule) - 1) / (schedule[-1].at_s - schedule[0].at_s) if len(schedule) > 1 and schedule[-1].at_s > schedule[0].at_s else None
    row = {
        "workload": run.workload,
        "drafter": run.drafter.name,
        "policy": run.policy,
        "rate": run.rate,
        "concurrency": run.concurrency,
        "controlled": run.drafter.controlled,
        "controlled_acceptance": run.drafter.acceptance,
        "trace": is_trace,
        "phase_rates": trace_rates(run.rate) if is_trace else None,
        "phase_requests": phase_counts(len(schedule), len(trace_rates(run.rate))) if is_trace else None,
        "schedule_rate": realized,
        "seed": run.seed,
        "max_tokens_cap": cap,
    }
    row.update(summarize(records, stats))
    row["mismatched_outputs"] = mismatched
    row["drafter_stats"] = stats.get("drafters") if stats else None
    return row


async def run_bench(
    address: str,
    config: BenchConfig,
    on_row: Callable[[dict], None] | None = None,
    progress: Progress | None = None,
    on_references: Callable[[Mapping[tuple[str, int], RequestRecord]], None] | None = None,
) -> list[dict]:
    """Runs the whole plan against the router at `address` and returns the results rows (one per run).
    `on_row` sees each row as soon as its run ends (e.g. to save partial results); `on_references` sees
    the reference pass's records by (prompt set, prompt index)."""
    runs = plan(config)
    progress = progress or Progress(len(runs))
    connection = RouterConnection(address)
    rows: list[dict] = []
    try:
        progress.show("reference pass (policy none, drafter none)")
        greedy = await fetch_references(connection, config, config.request_timeout_s)
        if on_references:
            on_references(greedy)
        references = {key: record.token_ids for key, record in greedy.items()}
        await warm_up(connection, config, config.request_timeout_s)
        progress.begin()
        for run in runs:
            base, _ = parse_workload(run.workload)

            def make_request(position: int, arrival: Arrival, run: RunSpec = run, base: str = base):
                # the controlled drafter's draws are seeded per request: the same for every policy
                return connection.request(
                    arrival.prompt, max_tokens_of(arrival.prompt, config.max_tokens), run.drafter, run.policy,
                    references.get((base, arrival.index)), run.seed * 1_000_003 + position,
                )

            progress.show(run.label)
            await connection.stats(reset=True)  # forget what the controller learned in the previous run
            if run.concurrency is not None:
                records = await replay_closed(connection, run.schedule, make_request, config.request_timeout_s, run.concurrency)
            else:
                records = await replay(connection, run.schedule, make_request, config.request_timeout_s, config.max_in_flight)
            stats = await connection.stats(reset=False)
            row = row_of(run, records, stats, references, config.max_tokens)
            rows.append(row)
            if on_row:
                on_row(row)
            progress.step(run.label + _brief(row))
    finally:
        await connection.close()
    return rows


def _brief(row: Mapping) -> str:
    if not row["completed"]:
        return f"  -> all {row['requests']} failed: {next(iter(row['errors']), '?')}"
    text = f"  -> mean {row['mean_latency_s']:.2f}s"
    return text + (f", {row['failed']} failed" if row["failed"] else "")
