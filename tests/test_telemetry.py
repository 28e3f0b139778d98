"""Tracing across router, drafters and verifier, and the router's Prometheus metrics, on a real stack in
one process (each service with its own tracer provider, all exporting to one in-memory exporter)."""

from __future__ import annotations

import random
import time
import urllib.request
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from drafter_svc.server import SERVICE_NAME as DRAFTER_SERVICE
from router.server import SERVICE_NAME as ROUTER_SERVICE
from smartspec.telemetry import MAX_BATCH_MEMBERS, Tracing, batch_metadata, batch_members
from smartspec.wire import router_pb2, verifier_pb2_grpc
from tests.support import ServerThread
from tests.test_router_stack import RouterThread, generate_many, lookup_drafter, serve_drafter, tokenizer_for, verifier_for, wait_until
from verifier_svc.server import SERVICE_NAME as VERIFIER_SERVICE

ROUTER, VERIFIER, DRAFT_MODEL, LOOKUP = "smartspec-router", "smartspec-verifier", "smartspec-drafter-draft_model", "smartspec-drafter-prompt_lookup"
GENERATE, PREFILL, VERIFY, PROPOSE = (
    f"{service}/{method}"
    for service, method in ((ROUTER_SERVICE, "Generate"), (VERIFIER_SERVICE, "Prefill"), (VERIFIER_SERVICE, "Verify"), (DRAFTER_SERVICE, "Propose"))
)
PROMPT = "one two three four five six seven eight nine ten, one two three four five six seven eight nine ten,"


@dataclass
class TracedStack:
    """The traced stack, the exporter all its services export to, and the router's metrics endpoint."""

    router: RouterThread
    exporter: InMemorySpanExporter
    tracings: dict[str, Tracing]
    metrics_url: str

    def spans(self):
        for tracing in self.tracings.values():
            tracing.flush()
        return self.exporter.get_finished_spans()

    def trace(self, trace_id: int, requests: int = 1) -> list:
        """The finished spans of one trace, once its request spans and the router's RPC spans (which
        end last) are in."""
        found: list = []

        def complete() -> bool:
            found[:] = [s for s in self.spans() if s.context.trace_id == trace_id]
            rpcs = [s for s in found if s.kind == SpanKind.SERVER and _service(s) == ROUTER]
            return sum(s.name == "smartspec.request" for s in found) >= requests and len(rpcs) >= requests

        assert wait_until(complete, timeout=10), f"trace {trace_id:032x} is incomplete: {[s.name for s in found]}"
        return found


@pytest.fixture(scope="module")
def traced(tiny_target):
    """Verifier, a draft-model drafter (the target as its own draft: always right), prompt lookup and a
    router with tracing and metrics on."""
    from drafter_svc.main import build_servicer as build_drafter
    from router.metrics import RouterMetrics
    from router.telemetry import RouterTelemetry
    from verifier_svc.main import build_servicer as build_verifier

    exporter = InMemorySpanExporter()
    tracings = {name: Tracing(name, exporter, new_traces=name == ROUTER) for name in (ROUTER, VERIFIER, DRAFT_MODEL, LOOKUP)}
    verifier_servicer = build_verifier(str(tiny_target), max_sequences=8)
    verifier = ServerThread(lambda s: verifier_pb2_grpc.add_VerifierServiceServicer_to_server(verifier_servicer, s), [VERIFIER_SERVICE], tracings[VERIFIER])
    drafters = {
        "self_draft": serve_drafter(build_drafter("draft_model", draft_model=str(tiny_target)), tracings[DRAFT_MODEL]),
        "prompt_lookup": serve_drafter(build_drafter("prompt_lookup"), tracings[LOOKUP]),
    }
    metrics = RouterMetrics(ROUTER)
    port = metrics.serve("127.0.0.1", 0)
    telemetry = RouterTelemetry(tracings[ROUTER], metrics)
    router = RouterThread(
        tokenizer_for(str(tiny_target)), verifier.address, {n: d.address for n, d in drafters.items()}, telemetry=telemetry, cost_profile="off"
    )
    yield TracedStack(router, exporter, tracings, f"http://127.0.0.1:{port}/metrics")
    router.stop()
    telemetry.close()
    for server in (verifier, *drafters.values()):
        server.stop()
    for tracing in tracings.values():
        tracing.shutdown()


def _service(span) -> str:
    return span.resource.attributes["service.name"]


def _named(spans, name: str) -> list:
    return [s for s in spans if s.name == name]


# --- tracing -----------------------------------------------------------------------------------------
def test_one_request_is_one_trace_across_router_drafter_and_verifier(traced):
    trace_id, client_span = random.getrandbits(128), random.getrandbits(64)
    request = router_pb2.GenerateRequest(prompt=PROMPT, max_tokens=12, drafter="self_draft", policy="fixed:3")
    reply = traced.router.stub.Generate(request, metadata=(("traceparent", f"00-{trace_id:032x}-{client_span:016x}-01"),), timeout=30)
    spans = traced.trace(trace_id)

    assert {_service(s) for s in spans} == {ROUTER, VERIFIER, DRAFT_MODEL}
    (rpc,) = _named(spans, GENERATE)
    assert rpc.kind == SpanKind.SERVER and rpc.parent.span_id == client_span  # joined the caller's trace
    (req,) = _named(spans, "smartspec.request")
    assert req.parent.span_id == rpc.context.span_id
    assert req.attributes["smartspec.prompt_tokens"] == reply.stats.prompt_tokens
    assert req.attributes["smartspec.generated_tokens"] == len(reply.token_ids) == 12
    assert (req.attributes["smartspec.drafter"], req.attributes["smartspec.policy"]) == ("self_draft", "fixed:3")
    assert (req.attributes["smartspec.finish_reason"], req.attributes["smartspec.status"]) == ("length", "OK")

    steps = _named(spans, "smartspec.step")
    assert len(steps) == reply.stats.steps >= 2 and all(s.parent.span_id == req.context.span_id for s in steps)
    for step in steps:
        a = step.attributes
        assert a["smartspec.batch_size"] == 1 and a["smartspec.batch_tokens"] == a["smartspec.k"] + 1
        assert 0 < a["smartspec.k"] <= a["smartspec.k_asked"] <= 3 and a["smartspec.accepted"] <= a["smartspec.k"]
        assert a["smartspec.drafter"] == "self_draft" and a["smartspec.step_s"] > 0 and a["smartspec.step_predicted_s"] > 0
    assert sum(s.attributes["smartspec.k"] for s in steps) == reply.stats.proposed
    assert sum(s.attributes["smartspec.accepted"] for s in steps) == reply.stats.accepted

    step_ids = {s.context.span_id for s in steps}
    verifies = _named(spans, VERIFY)
    proposes = _named(spans, PROPOSE)
    (prefill,) = _named(spans, PREFILL)
    assert prefill.parent.span_id == req.context.span_id and _service(prefill) == VERIFIER
    # the Verify that prefilled the prompt (admitted chunked) ran before the request's first step
    (prefilling,) = [v for v in verifies if v.parent.span_id == req.context.span_id]
    verifies.remove(prefilling)
    assert len(verifies) == len(steps) and all(v.parent.span_id in step_ids and _service(v) == VERIFIER for v in verifies)
    assert len(proposes) == len(steps) and all(p.parent.span_id in step_ids and _service(p) == DRAFT_MODEL for p in proposes)
    assert all(s.kind == SpanKind.SERVER and s.attributes["rpc.grpc.status_code"] == 0 for s in (*verifies, *proposes, prefill))
    # Bookkeeping calls without a request's context (the router's startup Info, releases) are not traced.
    assert not [s.name for s in traced.spans() if s.name.endswith(("/Info", "/Release"))]


def test_concurrent_requests_have_their_own_traces_and_share_batched_calls(traced):
    requests = [router_pb2.GenerateRequest(prompt=f"{PROMPT} {i}", max_tokens=40, drafter="self_draft", policy="fixed:1") for i in range(2)]
    traced.exporter.clear()
    replies = generate_many(traced.router.stub, requests, timeout=60)
    assert all(isinstance(r, router_pb2.GenerateResponse) for r in replies)
    assert wait_until(lambda: len(_named(traced.spans(), "smartspec.request")) == 2, timeout=10)
    requests_spans = _named(traced.spans(), "smartspec.request")
    ids = [s.context.trace_id for s in requests_spans]
    assert len(set(ids)) == 2
    traces = {trace_id: traced.trace(trace_id) for trace_id in ids}
    for trace_id, spans in traces.items():
        assert {_service(s) for s in spans} == {ROUTER, VERIFIER, DRAFT_MODEL}
        # Every step of the request has its verifier and drafter span in the request's own trace, also
        # when the batched call was made under the other request's trace.
        steps = _named(spans, "smartspec.step")
        drafting = [s.context.span_id for s in steps if s.attributes["smartspec.k_asked"] > 0]  # the last step has no room
        assert len(drafting) >= len(steps) - 1
        request = _named(spans, "smartspec.request")[0].context.span_id  # the parent of the Verifies that prefilled its prompt
        chunks = [s for s in _named(spans, VERIFY) if s.parent.span_id == request]  # one per chunk, paced beside the other request
        assert chunks
        for name, parents in ((VERIFY, [request] * len(chunks) + [s.context.span_id for s in steps]), (PROPOSE, drafting)):
            assert sorted(s.parent.span_id for s in _named(spans, name)) == sorted(parents), name
    # The two requests shared Verify calls: each such call is one span in one request's trace, linked to
    # the other request's step, and a span of the same name in the other trace links back to it.
    a, b = ids
    shared = [
        s for s in _named(traces[a] + traces[b], VERIFY)
        if any(link.context.trace_id == (b if s.context.trace_id == a else a) for link in s.links)
    ]
    assert shared, "the two requests never shared a Verify call"
    assert max(s.attributes["smartspec.batch_size"] for s in _named(traces[a], "smartspec.step")) == 2


def test_a_refused_request_ends_its_rpc_span_with_the_status(traced):
    trace_id = random.getrandbits(128)
    metadata = (("traceparent", f"00-{trace_id:032x}-{random.getrandbits(64):016x}-01"),)
    with pytest.raises(grpc.RpcError) as info:
        traced.router.stub.Generate(router_pb2.GenerateRequest(prompt="hi", drafter="no_such_drafter"), metadata=metadata, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def in_trace() -> list:
        return [s for s in traced.spans() if s.context.trace_id == trace_id]

    assert wait_until(lambda: bool(in_trace()), timeout=10)
    spans = in_trace()
    assert [s.name for s in spans] == [GENERATE]  # no request span: it was never queued
    assert spans[0].status.status_code == StatusCode.ERROR and spans[0].attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_streams_are_traced_and_a_cancelled_stream_is_counted(traced, caplog):
    request = router_pb2.GenerateRequest(prompt=PROMPT, max_tokens=6, drafter="prompt_lookup", policy="fixed:2")
    chunks = list(traced.router.stub.GenerateStream(request, timeout=30))
    assert chunks[-1].finish_reason == router_pb2.FINISH_REASON_LENGTH

    before = _scrape(traced.metrics_url)
    trace_id = random.getrandbits(128)
    metadata = (("traceparent", f"00-{trace_id:032x}-{random.getrandbits(64):016x}-01"),)
    long = router_pb2.GenerateRequest(prompt=PROMPT, max_tokens=300, drafter="none", policy="none")
    stream = traced.router.stub.GenerateStream(long, metadata=metadata, timeout=30)
    next(stream)
    stream.cancel()
    spans = traced.trace(trace_id)
    (req,) = _named(spans, "smartspec.request")
    assert req.attributes["smartspec.status"] == "CANCELLED" and req.attributes["smartspec.generated_tokens"] < 300
    (rpc,) = _named(spans, GENERATE + "Stream")
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    after = _scrape(traced.metrics_url)
    key = ("smartspec_router_requests_total", frozenset({"finish_reason": "none", "status": "CANCELLED"}.items()))
    assert after.get(key, 0) - before.get(key, 0) == 1
    assert not [r for r in caplog.records if "detach" in r.getMessage()]  # the span's context was attached and detached cleanly


def test_batch_metadata_carries_sampled_members_up_to_the_cap():
    from opentelemetry.trace import SpanContext, TraceFlags

    contexts = [SpanContext(i + 1, i + 1, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)) for i in range(MAX_BATCH_MEMBERS + 5)]
    unsampled = SpanContext(999, 999, is_remote=False, trace_flags=TraceFlags(TraceFlags.DEFAULT))
    metadata = dict(batch_metadata([unsampled, *contexts]))
    assert metadata["traceparent"] == f"00-{1:032x}-{1:016x}-01"
    members = batch_members(metadata)
    assert [m.trace_id for m in members] == list(range(2, MAX_BATCH_MEMBERS + 1))
    assert batch_metadata([unsampled]) is None and batch_metadata([]) is None
    assert dict(batch_metadata(contexts[:1])) == {"traceparent": metadata["traceparent"]}


# --- metrics -----------------------------------------------------------------------------------------
def _scrape(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_are_scraped_with_plausible_values(traced):
    before = _scrape(traced.metrics_url)
    requests = [
        router_pb2.GenerateRequest(prompt=PROMPT, max_tokens=10, drafter="self_draft", policy="fixed:3"),
        router_pb2.GenerateRequest(prompt=PROMPT, max_tokens=10, drafter="prompt_lookup", policy="fixed:2"),
        router_pb2.GenerateRequest(prompt=PROMPT, max_tokens=6, drafter="none", policy="none"),
    ]
    started = time.perf_counter()
    replies = generate_many(traced.router.stub, requests, timeout=60)
    wall = time.perf_counter() - started
    assert all(isinstance(r, router_pb2.GenerateResponse) for r in replies)
    with pytest.raises(grpc.RpcError):
        traced.router.stub.Generate(router_pb2.GenerateRequest(prompt="hi", drafter="no_such_drafter"), timeout=10)
    after = _scrape(traced.metrics_url)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("smartspec_router_requests_total", finish_reason="length", status="OK") == 3
    assert delta("smartspec_router_requests_total", finish_reason="none", status="INVALID_ARGUMENT") == 1
    for name in ("request_duration_seconds", "time_to_first_token_seconds", "time_per_output_token_seconds", "queue_wait_seconds"):
        assert delta(f"smartspec_router_{name}_count") == 3, name
    assert 0 < delta("smartspec_router_request_duration_seconds_sum") <= 3 * wall
    assert 0 < delta("smartspec_router_time_to_first_token_seconds_sum") < delta("smartspec_router_request_duration_seconds_sum")

    steps = delta("smartspec_router_batch_size_count")
    assert steps > 0
    assert delta("smartspec_router_batch_size_sum") == sum(r.stats.steps for r in replies)  # a step counts each request in it
    for name in ("step_duration_seconds", "step_predicted_duration_seconds", "step_time_error_ratio"):
        assert delta(f"smartspec_router_{name}_count") == steps, name
    assert delta("smartspec_router_step_duration_seconds_sum") > 0
    # where a step's time went: the Verify call within the step, the verifier's handler within the call, the forward within that
    split = ["smartspec_router_step_duration_seconds", "smartspec_router_verify_rpc_duration_seconds",
             "smartspec_verifier_handler_duration_seconds", "smartspec_verifier_forward_duration_seconds"]
    assert all(delta(f"{name}_count") == steps for name in split)
    sums = [delta(f"{name}_sum") for name in split]
    assert sums[0] >= sums[1] >= sums[2] >= sums[3] > 0, sums
    assert after[("smartspec_router_queue_length", frozenset())] == 0 and after[("smartspec_router_running_requests", frozenset())] == 0
    scheduler = traced.router.servicer.scheduler  # the counts are read from the scheduler when scraped
    scheduler.preemptions += 2
    scraped = _scrape(traced.metrics_url)
    scheduler.preemptions -= 2
    assert scraped[("smartspec_router_preemptions_total", frozenset())] == after[("smartspec_router_preemptions_total", frozenset())] + 2
    assert scraped[("smartspec_router_cost_profile_recalibrations_total", frozenset())] == scheduler.controller.verify_cost.recalibrations

    for reply, drafter in zip(replies, ("self_draft", "prompt_lookup", "none")):
        by_k = {k: delta("smartspec_drafter_chosen_k_total", drafter=drafter, k=str(k)) for k in range(9)}
        assert sum(by_k.values()) == reply.stats.steps, drafter  # every step of the request, once
        assert sum(k * n for k, n in by_k.items()) == reply.stats.proposed, drafter
        assert delta("smartspec_drafter_draft_tokens_total", drafter=drafter) == reply.stats.proposed, drafter
        assert delta("smartspec_drafter_accepted_tokens_total", drafter=drafter) == reply.stats.accepted, drafter
    self_draft = replies[0].stats
    assert 0 < self_draft.accepted <= self_draft.proposed
    assert delta("smartspec_drafter_drafts_total", drafter="self_draft") == delta("smartspec_drafter_position_drafts_total", drafter="self_draft", position="1") > 0
    by_position = [delta("smartspec_drafter_position_drafts_total", drafter="self_draft", position=str(j)) for j in (1, 2, 3)]
    accepted_by_position = [delta("smartspec_drafter_position_accepted_total", drafter="self_draft", position=str(j)) for j in (1, 2, 3)]
    assert by_position == sorted(by_position, reverse=True) and sum(by_position) == self_draft.proposed
    assert all(a <= d for a, d in zip(accepted_by_position, by_position)) and sum(accepted_by_position) == self_draft.accepted
    assert 1 <= delta("smartspec_drafter_propose_duration_seconds_count", drafter="self_draft") <= self_draft.steps
    target = [labels for (name, labels) in after if name == "target_info"]
    assert target and ("service_name", ROUTER) in target[0]


# --- off by default ----------------------------------------------------------------------------------
def test_tracing_and_metrics_are_off_by_default_and_cost_nothing(tiny_target, monkeypatch):
    """Default flags: no tracer provider, no span (anywhere in the process), no metrics endpoint."""
    from opentelemetry.sdk import trace as sdk_trace

    from router.main import add_arguments
    from router.telemetry import telemetry_from_args
    from smartspec.config import new_parser

    for variable in ("SMARTSPEC_TRACE_EXPORTER", "SMARTSPEC_METRICS_PORT"):
        monkeypatch.delenv(variable, raising=False)
    started: list[str] = []
    providers: list[object] = []
    start_span, provider_init = sdk_trace.Tracer.start_span, sdk_trace.TracerProvider.__init__
    monkeypatch.setattr(sdk_trace.Tracer, "start_span", lambda self, name, *a, **k: started.append(name) or start_span(self, name, *a, **k))
    monkeypatch.setattr(sdk_trace.TracerProvider, "__init__", lambda self, *a, **k: providers.append(self) or provider_init(self, *a, **k))

    parser = new_parser("router", "test")
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.trace_exporter, args.metrics_port) == ("off", 0)
    telemetry = telemetry_from_args(args)
    assert not telemetry.enabled and telemetry.tracing is None and telemetry.metrics is None

    router = RouterThread(
        tokenizer_for(str(tiny_target)), verifier_for(str(tiny_target)).address, {"prompt_lookup": lookup_drafter().address},
        telemetry=telemetry, cost_profile="off",
    )
    try:
        reply = router.stub.Generate(router_pb2.GenerateRequest(prompt=PROMPT, max_tokens=8, drafter="prompt_lookup", policy="fixed:2"), timeout=30)
        assert len(reply.token_ids) == 8
    finally:
        router.stop()
    assert started == [] and providers == []


def test_trace_flags_build_the_exporter_and_up_passes_them_on():
    from router.main import add_arguments
    from smartspec.commands.up import router_argv, service_argvs, stack_options
    from smartspec.config import new_parser
    from smartspec.telemetry import tracing_from_args

    parser = new_parser("router", "test")
    add_arguments(parser)
    tracing = tracing_from_args(parser.parse_args(["--trace-exporter", "console"]), ROUTER, new_traces=True)
    try:
        assert tracing is not None and tracing.new_traces
        assert tracing.provider.resource.attributes["service.name"] == ROUTER
    finally:
        tracing.shutdown()
    with pytest.raises(SystemExit):
        parser.parse_args(["--trace-exporter", "jaeger"])

    args = stack_options(trace_exporter="otlp", otlp_endpoint="http://collector:4317", metrics_port=9464, drafters="prompt_lookup")
    flags = ["--trace-exporter", "otlp", "--otlp-endpoint", "http://collector:4317"]
    for argv in (*service_argvs(args, "target", "draft").values(), router_argv(args, "target", {"verifier": "v:1", "prompt_lookup": "d:2"})):
        joined = " ".join(argv)
        assert " ".join(flags) in joined, argv
    assert "--metrics-port 9464" in " ".join(router_argv(args, "target", {"verifier": "v:1", "prompt_lookup": "d:2"}))
    assert all("--metrics-port" not in argv for argv in service_argvs(args, "target", "draft").values())
