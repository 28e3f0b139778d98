"""What the router reports while it serves: one trace per request and the metrics of router/metrics.py.

The RPC handlers report a request's arrival, refusal and end; the scheduler reports admissions and
steps and asks for the trace metadata of its batched RPCs. With tracing and metrics off (the default)
every call returns at once.

A request's trace (span names of RPCs are full gRPC method names, PACKAGE.RouterService/Generate; see
smartspec/telemetry.py for how batched calls join several traces):

    RouterService/Generate          router, SERVER (a child of the client's traceparent, if it sent one)
      smartspec.request             router: arrival to end; prompt and generated tokens, drafter, policy,
                                    finish reason, status, steps, proposed, accepted, queue and first-token time
        VerifierService/Prefill     verifier (the admission's batched Prefill; chunked, it computes nothing)
        VerifierService/Verify      verifier, for a step that prefills a chunk of the prompt before the
                                    request decodes (chunked prefill: docs/engine.md)
        smartspec.step              router, one per step: batch size and tokens, drafter, k asked and
                                    verified, accepted, Propose time, predicted and measured step time
          DrafterService/Propose    drafter (when the request's drafter was asked for tokens)
          VerifierService/Verify    verifier
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any, Sequence, Sized

from opentelemetry import trace

from router.request import Chunk, RequestState
from smartspec.errors import RequestError
from smartspec.telemetry import Metadata, Tracing, batch_metadata, tracing_from_args
from smartspec.wire import router_pb2

if TYPE_CHECKING:
    from router.metrics import RouterMetrics
    from router.policy import RequestView
    from router.scheduler import Scheduler

SERVICE_NAME = "smartspec-router"
FINISH_REASONS = {
    router_pb2.FINISH_REASON_LENGTH: "length",
    router_pb2.FINISH_REASON_EOS: "eos",
    router_pb2.FINISH_REASON_STOP: "stop",
}


class RouterTelemetry:
    """One router's tracing (None: off) and metrics (None: off)."""

    def __init__(self, tracing: Tracing | None = None, metrics: "RouterMetrics | None" = None) -> None:
        self.tracing = tracing
        self.metrics = metrics
        self._tracer = tracing.tracer if tracing is not None else None
        self._requests: dict[str, trace.Span] = {}  # request id -> its open request span
        self._steps: dict[str, trace.Span] = {}  # request id -> its open step span

    @property
    def enabled(self) -> bool:
        return self._tracer is not None or self.metrics is not None

    def watch(self, scheduler: "Scheduler") -> None:
        """Lets the queue-length and batch gauges and the preemption and recalibration counts read
        `scheduler` when scraped."""
        if self.metrics is not None:
            self.metrics.watch(lambda: len(scheduler.waiting), lambda: len(scheduler.running), lambda: scheduler.preemptions,
                               lambda: sum(c.verify_cost.recalibrations for c in scheduler.controllers))

    def close(self) -> None:
        """Ends what is still open and stops the metrics endpoint (spans are flushed by the provider)."""
        for span in (*self._steps.values(), *self._requests.values()):
            span.end()
        self._steps.clear()
        self._requests.clear()
        if self.metrics is not None:
            self.metrics.close()

    # --- from the RPC handlers ---------------------------------------------------------------------
    def arrived(self, request: RequestState) -> None:
        """A request was queued; its span starts as a child of the current (the RPC's) span."""
        if self._tracer is None:
            return
        params = request.params
        self._requests[request.id] = self._tracer.start_span(
            "smartspec.request",
            attributes={
                "smartspec.request_id": request.id,
                "smartspec.prompt_tokens": len(request.prompt_ids),
                "smartspec.max_tokens": params.max_tokens,
                "smartspec.drafter": params.drafter,
                "smartspec.policy": params.policy.name,
            },
        )

    def refused(self, error: RequestError) -> None:
        """A request refused before it was queued (invalid, overload, shutting down)."""
        if self.metrics is not None:
            self.metrics.finished(error.status, "none", None, 0.0)

    def finished(self, request: RequestState, last: Any) -> None:
        """A request's handler is done with it. `last` is what it took from the request's outbox last:
        the final chunk, the error the request failed with, or anything else if the client went away."""
        if not self.enabled:
            return
        if isinstance(last, Chunk) and last.finish_reason:
            status, reason = "OK", FINISH_REASONS.get(last.finish_reason, "none")
        elif isinstance(last, RequestError):
            status, reason = last.status, "none"
        else:
            status, reason = "CANCELLED", "none"
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.finished(status, reason, request, now)
        if self._tracer is None:
            return
        step = self._steps.pop(request.id, None)
        if step is not None:  # ended in the middle of a step
            step.end()
        span = self._requests.pop(request.id, None)
        if span is None:
            return
        counters = request.counters
        span.set_attributes({
            "smartspec.generated_tokens": request.generated,
            "smartspec.finish_reason": reason,
            "smartspec.status": status,
            "smartspec.steps": counters.steps,
            "smartspec.proposed": counters.proposed,
            "smartspec.accepted": counters.accepted,
            "smartspec.queue_s": (request.admitted or now) - request.arrived,
        })
        if request.first_token is not None:
            span.set_attribute("smartspec.ttft_s", request.first_token - request.arrived)
        if status not in ("OK", "CANCELLED"):
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{status}: {last.message}"))
        span.end()

    # --- from the scheduler --------------------------------------------------------------------------
    def admitted(self, batch: Sequence[RequestState]) -> None:
        """Requests joined the running batch (their Prefill succeeded)."""
        if self.metrics is not None:
            self.metrics.admitted(batch)
        if self._tracer is not None:
            for request in batch:
                span = self._requests.get(request.id)
                if span is not None:
                    span.add_event("admitted")

    def rpc_metadata(self, requests: Sequence[RequestState]) -> Metadata | None:
        """Metadata for a batched call on behalf of `requests`: their trace contexts (each one's open
        step span, else its request span); None when tracing is off."""
        if self._tracer is None:
            return None
        spans = (self._steps.get(r.id) or self._requests.get(r.id) for r in requests)
        return batch_metadata(span.get_span_context() for span in spans if span is not None)

    def step_started(self, batch: Sequence[RequestState]) -> None:
        if self._tracer is None:
            return
        for request in batch:
            parent = self._requests.get(request.id)
            if parent is None:
                continue
            previous = self._steps.pop(request.id, None)
            if previous is not None:  # a step that failed before it finished
                previous.end()
            self._steps[request.id] = self._tracer.start_span("smartspec.step", context=trace.set_span_in_context(parent))

    def verified(self, rpc_s: float, handler_s: float, forward_s: float) -> None:
        """A step's Verify: its wall time seen by the router and, as the verifier reported them, its
        handler's time and the forward's (the step's time split by where it went)."""
        if self.metrics is not None:
            self.metrics.verified(rpc_s, handler_s, forward_s)

    def step_finished(
        self,
        batch: Sequence[RequestState],
        views: Sequence["RequestView"],
        asked: Sequence[int],
        drafts: Sequence[Sized],
        accepted: Sequence[int],
        draft_times: dict[str, tuple[tuple[int, ...], float]],
        predicted_s: float,
        step_s: float,
    ) -> None:
        """A step's outcome, per request: its drafter this step, the k asked of it, the drafts verified
        and how many were accepted; per drafter called, its Propose time; the predicted and measured
        step time."""
        if not self.enabled:
            return
        drafters = [view.drafter for view in views]
        drafted = [len(draft) for draft in drafts]
        propose_s = {name: seconds for name, (_, seconds) in draft_times.items()}
        if self.metrics is not None:
            self.metrics.step(drafters, drafted, accepted, propose_s, predicted_s, step_s)
        if self._tracer is None:
            return
        shared = {
            "smartspec.batch_size": len(batch),
            "smartspec.batch_tokens": sum(drafted) + len(batch),
            "smartspec.step_predicted_s": predicted_s,
            "smartspec.step_s": step_s,
        }
        for request, drafter, k_asked, k, n in zip(batch, drafters, asked, drafted, accepted):
            span = self._steps.pop(request.id, None)
            if span is None:
                continue
            span.set_attributes(shared)
            span.set_attributes({"smartspec.drafter": drafter, "smartspec.k_asked": k_asked, "smartspec.k": k, "smartspec.accepted": n})
            if drafter in propose_s:
                span.set_attribute("smartspec.propose_s", propose_s[drafter])
            span.end()


def telemetry_from_args(args: argparse.Namespace) -> RouterTelemetry:
    """The router's telemetry from its flags (--trace-exporter, --otlp-endpoint, --metrics-port);
    starts the metrics endpoint on the router's --host when a port is given. Metrics are also kept when
    the HTTP API is on (--http-port), which serves them at /metrics."""
    tracing = tracing_from_args(args, SERVICE_NAME, new_traces=True)
    metrics = None
    if args.metrics_port or getattr(args, "http_port", -1) >= 0:
        from router.metrics import RouterMetrics

        metrics = RouterMetrics(SERVICE_NAME)
        if args.metrics_port:
            metrics.serve(args.host, args.metrics_port)
    return RouterTelemetry(tracing, metrics)
