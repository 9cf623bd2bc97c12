"""OpenTelemetry tracing, optional (``pip install emailrelay[otel]``).

All OpenTelemetry code lives here, behind four names:

* :func:`extract` reads a W3C ``traceparent`` (and ``tracestate``) from NATS
  request headers;
* :func:`server_span` opens the span for one request, continuing the caller's
  trace when the headers carry one;
* :func:`span` opens a child span of the current one;
* :func:`traced_sender` / :func:`traced_tracking` wrap the send handler's SMTP
  sender and tracking writer so the SMTP send and the KV writes are child spans.

When OpenTelemetry is not installed (or ``OTEL_SDK_DISABLED=true``), the
import below fails once at start-up, ``enabled`` is false, the span helpers
return one shared no-op context manager and the wrappers return what they are
given: the request path pays nothing. Installed but with no tracer provider
set, the span helpers still return the no-op.

Spans go to whatever tracer provider is installed globally (for example by
``opentelemetry-instrument``). :func:`configure_from_environment` installs the
SDK's own when ``OTEL_TRACES_EXPORTER`` asks for one (``console``, or ``otlp``
with ``opentelemetry-exporter-otlp`` installed).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from emailrelay import __version__, api

if TYPE_CHECKING:
    from emailrelay.deadline import Deadline
    from emailrelay.handlers.send import Sender, TrackingWriter

log = logging.getLogger(__name__)

try:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        raise ImportError("OTEL_SDK_DISABLED=true")  # noqa: TRY301
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:
    enabled = False
else:
    enabled = True

_INSTRUMENTATION = "emailrelay"
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()


_cached_tracer: Any = None


def _tracer() -> Any:
    # Taken before a provider is installed, this is a proxy that follows it.
    global _cached_tracer
    if _cached_tracer is None:
        _cached_tracer = _trace.get_tracer(_INSTRUMENTATION, __version__)
    return _cached_tracer


def _recording() -> bool:
    """Whether spans go anywhere: OpenTelemetry is installed and a tracer
    provider was set (until then the API hands out non-recording spans, which
    would cost about 12 us a request for nothing)."""
    return enabled and not isinstance(_trace.get_tracer_provider(), _trace.ProxyTracerProvider)


def extract(headers: Mapping[str, str]) -> Any:
    """The OpenTelemetry context carried by ``headers`` (names matched without
    regard to case: NATS keeps them as the caller wrote them); ``None`` when
    tracing is off."""
    if not enabled:
        return None
    carrier = {name.lower(): value for name, value in headers.items()}
    return _propagate.extract(carrier)


def server_span(subject: str, headers: Mapping[str, str]) -> contextlib.AbstractContextManager[Any]:
    """The span of one NATS request, a child of the caller's ``traceparent``
    when there is one. Yields the span (``None`` when tracing is off); mark an
    error reply with :func:`set_error`."""
    if not _recording():
        return _NO_SPAN
    return _tracer().start_as_current_span(  # type: ignore[no-any-return]
        f"process {subject}",
        context=extract(headers),
        kind=_trace.SpanKind.SERVER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation": "process",
            "messaging.destination.name": subject,
            "messaging.consumer.group.name": api.QUEUE_GROUP,
        },
    )


def set_error(current: Any, error: str) -> None:
    """Record a contract error reply on ``current`` (a span from :func:`server_span`)."""
    if current is None:
        return
    current.set_attribute("emailrelay.error", error)
    current.set_status(_trace.Status(_trace.StatusCode.ERROR, error))


def span(
    name: str, attributes: Mapping[str, str] | None = None
) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current span (a no-op when tracing is off)."""
    if not _recording():
        return _NO_SPAN
    return _tracer().start_as_current_span(  # type: ignore[no-any-return]
        name, kind=_trace.SpanKind.CLIENT, attributes=dict(attributes or {})
    )


class _TracedSender:
    def __init__(self, sender: Sender) -> None:
        self._sender = sender

    async def send(
        self, sender: str, recipient: str, message: bytes, deadline: Deadline
    ) -> str | None:
        with span("smtp send", {"emailrelay.smtp.bytes": str(len(message))}):
            return await self._sender.send(sender, recipient, message, deadline)


class _TracedTracking:
    def __init__(self, tracking: TrackingWriter) -> None:
        self._tracking = tracking

    async def create_record(self, record: api.TrackingRecord) -> None:
        with span("kv create_record", {"emailrelay.kv.bucket": api.RECIPIENTS_BUCKET}):
            await self._tracking.create_record(record)

    async def append_to_group(self, group_id: str, email_id: str) -> None:
        with span("kv append_to_group", {"emailrelay.kv.bucket": api.GROUP_INDEX_BUCKET}):
            await self._tracking.append_to_group(group_id, email_id)


def traced_sender(sender: Sender) -> Sender:
    """``sender`` with each send in a child span; itself when tracing is off."""
    return _TracedSender(sender) if enabled else sender


def traced_tracking(tracking: TrackingWriter) -> TrackingWriter:
    """``tracking`` with each KV write in a child span; itself when tracing is off."""
    return _TracedTracking(tracking) if enabled else tracking


_installed_provider: Any = None


def configure_from_environment(environ: Mapping[str, str] = os.environ) -> None:
    """Install the SDK's tracer provider when ``OTEL_TRACES_EXPORTER`` names an
    exporter (``console``, ``otlp``). Without it, spans go to whichever provider
    another tool installed, or nowhere."""
    global _installed_provider
    exporter_name = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not enabled or exporter_name in ("", "none"):
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning("OTEL_TRACES_EXPORTER is set but opentelemetry-sdk is not installed")
        return
    exporter: Any
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    elif exporter_name == "otlp":
        try:
            otlp = importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
        except ImportError:
            log.warning(
                "OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-http; "
                "tracing stays off"
            )
            return
        exporter = otlp.OTLPSpanExporter()
    else:
        log.warning(
            "unknown OTEL_TRACES_EXPORTER; tracing stays off", extra={"value": exporter_name}
        )
        return
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": "emailrelay"}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _trace.set_tracer_provider(provider)
    _installed_provider = provider
    log.info("tracing on", extra={"exporter": exporter_name})


def shutdown() -> None:
    """Flush and stop the provider :func:`configure_from_environment` installed."""
    if _installed_provider is not None:
        _installed_provider.shutdown()
