"""OpenTelemetry tracing shared by every service: setup from flags, the server interceptor, and the
gRPC metadata that carries a batch's trace contexts.

Off by default (``--trace-exporter off``): no tracer provider is built, no interceptor is installed and
the OpenTelemetry SDK is not even imported, so untraced serving pays nothing.

How a batched RPC joins several request traces. The router's internal calls serve many requests at once
(one Verify for the whole running batch, one Propose per drafter), but a span has one parent. Every
request therefore has its own trace, and a batched call carries the trace contexts of all its requests:
the first one in the standard W3C ``traceparent`` header and the others in ``smartspec-batch-traceparents``
(comma-separated traceparent values). The server's span for the call is a child of the first request's
span, with span links to the others; and for each other request the server also records a span of the
same name and duration as a child of that request's span, linked to the call's span. So every request's
trace holds a span from each service that worked on it, and a batch's spans can be found from any member.
At most ``MAX_BATCH_MEMBERS`` requests of one call are carried (metadata stays a few kB; gRPC rejects
large headers); requests beyond that, or not sampled, get no server span for that call.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import sys
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterable

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from smartspec.config import add_flag

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("smartspec.telemetry")

TRACE_EXPORTERS = ("off", "console", "otlp")
DEFAULT_OTLP_ENDPOINT = "http://127.0.0.1:4317"
TRACEPARENT = "traceparent"
BATCH_HEADER = "smartspec-batch-traceparents"
MAX_BATCH_MEMBERS = 48  # 48 x 56 bytes: well under gRPC's 8 kB default metadata limit
# Health checks and reflection are polled, not served for a request: never traced.
UNTRACED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")

Metadata = tuple[tuple[str, str], ...]
_W3C = TraceContextTextMapPropagator()


class Tracing:
    """One service's tracer provider (its own, not the global one, so several services in one process
    keep their own ``service.name``), exporting in batches from a background thread.

    `new_traces`: whether a call that carries no trace context starts a trace. True for the router,
    where requests enter; False for internal services, whose calls without context are bookkeeping
    (the router's startup Info, its cost-profile sweep, releases), not request work.
    """

    def __init__(self, service_name: str, exporter: "SpanExporter", new_traces: bool = False) -> None:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.service_name = service_name
        self.new_traces = new_traces
        self.provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("smartspec")

    def flush(self, timeout_s: float = 10.0) -> bool:
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        self.provider.shutdown()


def add_trace_flags(parser: argparse.ArgumentParser) -> None:
    """The tracing flags every service (and ``smartspec up``, which passes them on) takes."""
    add_flag(parser, "--trace-exporter", default="off", choices=TRACE_EXPORTERS,
             help="OpenTelemetry traces: off, console (JSON spans on stderr) or otlp (to --otlp-endpoint)")
    add_flag(parser, "--otlp-endpoint", default=DEFAULT_OTLP_ENDPOINT,
             help="OTLP/gRPC collector for --trace-exporter otlp (http:// means no TLS)")


def trace_argv(args: argparse.Namespace) -> list[str]:
    """The tracing flags of `args` as a child's command line (``smartspec up`` passes them on)."""
    return ["--trace-exporter", args.trace_exporter, "--otlp-endpoint", args.otlp_endpoint]


def tracing_from_args(args: argparse.Namespace, service_name: str, new_traces: bool = False) -> Tracing | None:
    """The service's Tracing from its flags, or None when tracing is off."""
    kind = getattr(args, "trace_exporter", "off")
    if kind == "off":
        return None
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        exporter: SpanExporter = ConsoleSpanExporter(out=sys.stderr)  # stdout carries the 'listening' line
    elif kind == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=args.otlp_endpoint)
    else:
        raise ValueError(f"--trace-exporter {kind!r}: expected one of {', '.join(TRACE_EXPORTERS)}")
    log.info("tracing %s to %s", service_name, args.otlp_endpoint if kind == "otlp" else kind)
    return Tracing(service_name, exporter, new_traces=new_traces)


def server_interceptors(tracing: Tracing | None) -> list[grpc.aio.ServerInterceptor]:
    """What ``start_server`` installs: nothing when tracing is off."""
    return [] if tracing is None else [_ServerTracing(tracing)]


# --- the batch carrier -----------------------------------------------------------------------------
def traceparent(span_context: trace.SpanContext) -> str:
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{int(span_context.trace_flags):02x}"


def batch_metadata(span_contexts: Iterable[trace.SpanContext]) -> Metadata | None:
    """gRPC metadata carrying the sampled ones of `span_contexts` (one per request of a batched call),
    or None when there is none to carry."""
    values: list[str] = []
    for span_context in span_contexts:
        if span_context.is_valid and span_context.trace_flags.sampled:
            values.append(traceparent(span_context))
            if len(values) == MAX_BATCH_MEMBERS:
                break
    if not values:
        return None
    if len(values) == 1:
        return ((TRACEPARENT, values[0]),)
    return ((TRACEPARENT, values[0]), (BATCH_HEADER, ",".join(values[1:])))


def _span_context(value: str) -> trace.SpanContext | None:
    span_context = trace.get_current_span(_W3C.extract({TRACEPARENT: value.strip()})).get_span_context()
    return span_context if span_context.is_valid else None


def batch_members(metadata: dict[str, str]) -> list[trace.SpanContext]:
    """The other requests' span contexts a batched call carries (see the module's docstring)."""
    raw = metadata.get(BATCH_HEADER)
    if not raw:
        return []
    members = [_span_context(value) for value in raw.split(",")[:MAX_BATCH_MEMBERS]]
    return [m for m in members if m is not None]


# --- the server side -------------------------------------------------------------------------------
class _CallSpans:
    """The spans of one served call: its own span (current while the handler runs) and one per other
    batch member; all end together with the call's status."""

    def __init__(self, tracing: Tracing, method: str, metadata: dict[str, str]) -> None:
        name = method.lstrip("/")
        service, _, rpc = name.rpartition("/")
        self.attributes: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}
        members = batch_members(metadata)
        if members:
            self.attributes["smartspec.batch_traces"] = len(members) + 1
        tracer = tracing.tracer
        parent = _W3C.extract(metadata)
        self.span = tracer.start_span(
            name, context=parent, kind=trace.SpanKind.SERVER, attributes=self.attributes, links=[trace.Link(m) for m in members]
        )
        own = [trace.Link(self.span.get_span_context())]
        self.members = [
            tracer.start_span(
                name, context=trace.set_span_in_context(trace.NonRecordingSpan(m)), kind=trace.SpanKind.SERVER,
                attributes=self.attributes, links=own, start_time=self.span.start_time,
            )
            for m in members
        ]
        self.context = trace.set_span_in_context(self.span, parent)

    def end(self, code: grpc.StatusCode, details: str | None) -> None:
        for span in (self.span, *self.members):
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code.name}: {details or ''}"))
            span.end()


def _status(context: grpc.aio.ServicerContext, error: BaseException | None) -> tuple[grpc.StatusCode, str | None]:
    """The call's outcome: the code the handler set (or aborted with), else from how it ended."""
    code = context.code()
    if code is not None:
        return code, context.details()
    if error is None:
        return grpc.StatusCode.OK, None
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):  # the client went away
        return grpc.StatusCode.CANCELLED, "cancelled"
    return grpc.StatusCode.UNKNOWN, f"{type(error).__name__}: {error}"


class _ServerTracing(grpc.aio.ServerInterceptor):
    """A SERVER span per call (per batch member, see the module's docstring), current while the handler
    runs, so spans the handler starts (the router's request span) are its children."""

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(UNTRACED_PREFIXES):
            return handler
        metadata = {key: value for key, value in (details.invocation_metadata or ()) if isinstance(value, str)}
        if not self.tracing.new_traces and TRACEPARENT not in metadata:
            return handler
        codec = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, details.method, metadata), **codec)
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(self._stream(handler.unary_stream, details.method, metadata), **codec)
        return handler  # smartspec has no other kind of method

    def _unary(self, behavior: Callable, method: str, metadata: dict[str, str]) -> Callable:
        async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
            spans = _CallSpans(self.tracing, method, metadata)
            token = otel_context.attach(spans.context)
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as err:
                error = err
                raise
            finally:
                otel_context.detach(token)
                spans.end(*_status(context, error))

        return traced

    def _stream(self, behavior: Callable, method: str, metadata: dict[str, str]) -> Callable:
        async def traced(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            spans = _CallSpans(self.tracing, method, metadata)
            error: BaseException | None = None
            responses = behavior(request, context)
            try:
                while True:
                    # Current only while the handler runs (never across our own yield, whose resumer
                    # may run in another context).
                    token = otel_context.attach(spans.context)
                    try:
                        item = await responses.__anext__()
                    except StopAsyncIteration:
                        return
                    finally:
                        otel_context.detach(token)
                    yield item
            except BaseException as err:
                error = err
                raise
            finally:
                await responses.aclose()
                spans.end(*_status(context, error))

        return traced

