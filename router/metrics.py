"""The router's metrics: OpenTelemetry instruments read by a Prometheus scrape endpoint.

Every instrument is here, behind the few calls the router makes (a request refused, admitted, finished;
a step done). A step costs a few histogram records plus plain integer additions: the per-request and
per-position drafter counts are summed in dictionaries here and handed to OpenTelemetry only when the
endpoint is scraped (observable counters), so the step loop never pays per-request SDK calls. Names as
Prometheus shows them (labels in braces):

router
  smartspec_router_requests_total{finish_reason,status}   requests by outcome: finish_reason length, eos,
                                                          stop or none; status OK or the gRPC status code
                                                          (CANCELLED, RESOURCE_EXHAUSTED, INVALID_ARGUMENT...)
  smartspec_router_request_duration_seconds               arrival to last token, finished requests
  smartspec_router_time_to_first_token_seconds            arrival to first token, finished requests
  smartspec_router_time_per_output_token_seconds          first to last token / (tokens - 1), finished requests
  smartspec_router_queue_wait_seconds                     arrival to admission into the running batch
  smartspec_router_queue_length                           requests waiting for admission (gauge)
  smartspec_router_running_requests                       requests in the running batch (gauge)
  smartspec_router_preemptions_total                      requests sent back to the queue because the verifier's
                                                          KV cache was full (re-admitted token-exact later)
  smartspec_router_cost_profile_recalibrations_total      times live steps replaced a cost profile they contradicted
  smartspec_router_batch_size                             requests per step
  smartspec_router_step_duration_seconds                  a step's measured wall time (drafting + verify)
  smartspec_router_step_predicted_duration_seconds        the controller's prediction of it
  smartspec_router_step_time_error_ratio                  |predicted - measured| / measured
  smartspec_router_verify_rpc_duration_seconds            a step's Verify call, seen by the router (part of the step)
  smartspec_verifier_handler_duration_seconds             of it, the verifier's handler, as the verifier reports it
  smartspec_verifier_forward_duration_seconds             of that, the model forward (what is left of each is
                                                          router work, the RPC hop and the handler's bookkeeping)
per drafter (label drafter: the request's drafter that step; "none" when it had none)
  smartspec_drafter_chosen_k_total{drafter,k}             request-steps that verified k draft tokens (k = 0: none)
  smartspec_drafter_drafts_total{drafter}                 request-steps that verified at least one draft token
  smartspec_drafter_draft_tokens_total{drafter}           draft tokens verified
  smartspec_drafter_accepted_tokens_total{drafter}        of those, accepted
  smartspec_drafter_position_drafts_total{drafter,position}     draft tokens verified at position 1, 2, ...
  smartspec_drafter_position_accepted_total{drafter,position}   of those, accepted (their ratio: acceptance by position)
  smartspec_drafter_propose_duration_seconds{drafter}     wall time of one Propose call, seen by the router
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, start_http_server

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Observation

    from router.request import RequestState

log = logging.getLogger("smartspec.router.metrics")

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RATIO_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class RouterMetrics:
    """One router's instruments, its MeterProvider and its Prometheus registry (its own, not the
    process-wide one, so routers in one process do not mix). ``serve`` opens the scrape endpoint."""

    def __init__(self, service_name: str) -> None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource

        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        reader = PrometheusMetricReader(registry=self.registry, scope_info_enabled=False)
        self.provider = MeterProvider(metric_readers=[reader], resource=Resource.create({SERVICE_NAME: service_name}))
        meter = self.provider.get_meter("smartspec.router")
        self._http = None
        self._queue_length: Callable[[], int] = lambda: 0
        self._running: Callable[[], int] = lambda: 0
        self._preemptions: Callable[[], int] = lambda: 0
        self._recalibrations: Callable[[], int] = lambda: 0
        # Summed by step(), read at scrape time; keys are label tuples.
        self._chosen_k: collections.Counter[tuple[str, int]] = collections.Counter()
        self._drafts: collections.Counter[str] = collections.Counter()
        self._draft_tokens: collections.Counter[str] = collections.Counter()
        self._accepted: collections.Counter[str] = collections.Counter()
        self._position_drafts: collections.Counter[tuple[str, int]] = collections.Counter()
        self._position_accepted: collections.Counter[tuple[str, int]] = collections.Counter()

        def histogram(name: str, unit: str, description: str, buckets: Sequence[float]):
            return meter.create_histogram(name, unit=unit, description=description, explicit_bucket_boundaries_advisory=list(buckets))

        def totals(name: str, unit: str, description: str, counts: collections.Counter, labels: tuple[str, ...]) -> None:
            def observe(options: "CallbackOptions") -> Iterable["Observation"]:
                from opentelemetry.metrics import Observation

                # list() copies under the GIL: the step loop may add a key meanwhile.
                return [Observation(n, dict(zip(labels, key if isinstance(key, tuple) else (key,)))) for key, n in list(counts.items())]

            meter.create_observable_counter(name, [observe], unit=unit, description=description)

        def reading(read: Callable[[], Callable[[], int]]) -> Callable[["CallbackOptions"], Iterable["Observation"]]:
            def observe(options: "CallbackOptions") -> Iterable["Observation"]:
                from opentelemetry.metrics import Observation

                return [Observation(read()())]

            return observe

        def gauge(name: str, description: str, read: Callable[[], Callable[[], int]]) -> None:
            meter.create_observable_gauge(name, [reading(read)], unit="{request}", description=description)

        def count(name: str, unit: str, description: str, read: Callable[[], Callable[[], int]]) -> None:
            meter.create_observable_counter(name, [reading(read)], unit=unit, description=description)

        self.requests = meter.create_counter("smartspec_router_requests", unit="{request}", description="requests by finish reason and gRPC status")
        self.duration = histogram("smartspec_router_request_duration", "s", "arrival to last token of finished requests", LATENCY_BUCKETS_S)
        self.ttft = histogram("smartspec_router_time_to_first_token", "s", "arrival to first token", LATENCY_BUCKETS_S)
        self.tpot = histogram("smartspec_router_time_per_output_token", "s", "first to last token divided by tokens - 1", TOKEN_BUCKETS_S)
        self.queue_wait = histogram("smartspec_router_queue_wait", "s", "arrival to admission into the running batch", LATENCY_BUCKETS_S)
        self.batch_size = histogram("smartspec_router_batch_size", "{request}", "requests in one step", BATCH_BUCKETS)
        self.step_s = histogram("smartspec_router_step_duration", "s", "measured wall time of a step (drafting + verify)", STEP_BUCKETS_S)
        self.predicted_s = histogram("smartspec_router_step_predicted_duration", "s", "the controller's predicted step time", STEP_BUCKETS_S)
        self.step_error = histogram("smartspec_router_step_time_error_ratio", "1", "|predicted - measured| / measured step time", RATIO_BUCKETS)
        self.verify_rpc_s = histogram("smartspec_router_verify_rpc_duration", "s", "a step's Verify call, seen by the router", STEP_BUCKETS_S)
        self.handler_s = histogram("smartspec_verifier_handler_duration", "s", "the verifier's handler time of a step's Verify", STEP_BUCKETS_S)
        self.forward_s = histogram("smartspec_verifier_forward_duration", "s", "the model forward of a step's Verify", STEP_BUCKETS_S)
        self.propose_s = histogram("smartspec_drafter_propose_duration", "s", "wall time of one Propose call, seen by the router", STEP_BUCKETS_S)
        gauge("smartspec_router_queue_length", "requests waiting for admission", lambda: self._queue_length)
        gauge("smartspec_router_running_requests", "requests in the running batch", lambda: self._running)
        count("smartspec_router_preemptions", "{request}", "requests requeued because the verifier's KV cache was full", lambda: self._preemptions)
        count("smartspec_router_cost_profile_recalibrations", "1", "cost profiles replaced after live steps contradicted them",
              lambda: self._recalibrations)
        totals("smartspec_drafter_chosen_k", "{draft}", "request-steps by draft tokens verified", self._chosen_k, ("drafter", "k"))
        totals("smartspec_drafter_drafts", "{draft}", "request-steps verifying at least one draft token", self._drafts, ("drafter",))
        totals("smartspec_drafter_draft_tokens", "{token}", "draft tokens verified", self._draft_tokens, ("drafter",))
        totals("smartspec_drafter_accepted_tokens", "{token}", "draft tokens accepted", self._accepted, ("drafter",))
        totals("smartspec_drafter_position_drafts", "{token}", "draft tokens verified by position", self._position_drafts, ("drafter", "position"))
        totals("smartspec_drafter_position_accepted", "{token}", "draft tokens accepted by position", self._position_accepted, ("drafter", "position"))

    # --- the endpoint ---------------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Serves /metrics over HTTP from a daemon thread; port 0 picks a free one. Returns the port."""
        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise OSError(f"cannot serve metrics on {host}:{port}: {err}") from None
        bound = self._http.server_port
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def watch(self, queue_length: Callable[[], int], running: Callable[[], int], preemptions: Callable[[], int],
              recalibrations: Callable[[], int]) -> None:
        """Where the scrape reads the queue length, the running batch size and the scheduler's counts."""
        self._queue_length, self._running = queue_length, running
        self._preemptions, self._recalibrations = preemptions, recalibrations

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        self.provider.shutdown()

    # --- hooks ----------------------------------------------------------------------------------------
    def finished(self, status: str, finish_reason: str, request: "RequestState | None", now: float) -> None:
        """A request's outcome; latencies only for a request that finished (status OK)."""
        self.requests.add(1, {"finish_reason": finish_reason, "status": status})
        if request is None or status != "OK":
            return
        self.duration.record(now - request.arrived)
        if request.first_token is not None:
            self.ttft.record(request.first_token - request.arrived)
            if request.generated > 1:
                self.tpot.record((now - request.first_token) / (request.generated - 1))

    def admitted(self, batch: Sequence["RequestState"]) -> None:
        for request in batch:
            if request.admitted is not None:
                self.queue_wait.record(request.admitted - request.arrived)

    def verified(self, rpc_s: float, handler_s: float, forward_s: float) -> None:
        self.verify_rpc_s.record(rpc_s)
        self.handler_s.record(handler_s)
        self.forward_s.record(forward_s)

    def step(
        self,
        drafters: Sequence[str],
        drafted: Sequence[int],
        accepted: Sequence[int],
        propose_s: dict[str, float],
        predicted_s: float,
        step_s: float,
    ) -> None:
        """One step: per request its drafter, draft tokens verified and accepted; per drafter called,
        its Propose time; the step's predicted and measured time."""
        self.batch_size.record(len(drafters))
        self.step_s.record(step_s)
        self.predicted_s.record(predicted_s)
        if step_s > 0:
            self.step_error.record(abs(predicted_s - step_s) / step_s)
        for drafter, seconds in propose_s.items():
            self.propose_s.record(seconds, {"drafter": drafter})
        for drafter, k, n in zip(drafters, drafted, accepted):
            self._chosen_k[drafter, k] += 1
            if k == 0:
                continue
            self._drafts[drafter] += 1
            self._draft_tokens[drafter] += k
            self._accepted[drafter] += n
            for position in range(1, k + 1):
                self._position_drafts[drafter, position] += 1
                self._position_accepted[drafter, position] += position <= n  # 0 too: the series exists
