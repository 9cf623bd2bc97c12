"""OpenTelemetry tracing: a caller's W3C ``traceparent`` continues into the
request's server span, with the SMTP send and the KV writes as child spans;
without OpenTelemetry nothing is imported and nothing happens.

The tracing module is tested in-process with the SDK's in-memory exporter;
end to end, a relay process with ``OTEL_TRACES_EXPORTER=console`` prints the
spans of a real send. (Not in-process: importing trio_asyncio into the test
process installs its event loop policy, which breaks the session's aiosmtpd
servers started afterwards.)
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import trio
from opentelemetry import trace

try:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
except ImportError as exc:  # a declared test dependency: never skip
    raise ImportError(
        "opentelemetry-sdk is a test dependency of emailrelay (pip install -e '.[test]'); "
        "the tracing tests cannot run without it"
    ) from exc

from emailrelay import api, tracing
from emailrelay.deadline import Deadline
from tests.conftest import RelayFactory
from tests.support.nats_client import SyncNats
from tests.support.send_requests import send_request
from tests.support.servers.relay import REPO_ROOT
from tests.support.servers.smtp import SmtpServer

SERVER_SPAN = f"process {api.SEND_EMAIL_SUBJECT}"
CHILD_SPANS = {"smtp send", "kv create_record", "kv append_to_group"}


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """An in-memory exporter on the process's SDK tracer provider (installed
    once: OpenTelemetry refuses to replace a global provider)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    exporter.clear()
    yield exporter
    exporter.clear()


def new_traceparent() -> tuple[str, int, int]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", int(trace_id, 16), int(span_id, 16)


def email() -> dict[str, str]:
    return send_request()


def finished(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name == name]


# --- the tracing module ------------------------------------------------------


def test_server_span_continues_the_callers_traceparent(spans: InMemorySpanExporter) -> None:
    traceparent, trace_id, parent_span_id = new_traceparent()

    with tracing.server_span(api.SEND_EMAIL_SUBJECT, {"traceparent": traceparent}):
        pass

    (server,) = finished(spans, SERVER_SPAN)
    assert server.context is not None
    assert server.parent is not None
    assert server.context.trace_id == trace_id
    assert server.parent.span_id == parent_span_id
    assert server.parent.is_remote
    assert server.kind == trace.SpanKind.SERVER


def test_traceparent_header_name_is_matched_without_regard_to_case(
    spans: InMemorySpanExporter,
) -> None:
    traceparent, trace_id, _ = new_traceparent()

    with tracing.server_span(api.SEND_EMAIL_SUBJECT, {"Traceparent": traceparent}):
        pass

    (server,) = finished(spans, SERVER_SPAN)
    assert server.context is not None
    assert server.context.trace_id == trace_id


def test_request_without_traceparent_starts_a_new_trace(spans: InMemorySpanExporter) -> None:
    with tracing.server_span(api.SEND_EMAIL_SUBJECT, {}):
        pass

    (server,) = finished(spans, SERVER_SPAN)
    assert server.parent is None


def test_span_is_a_child_of_the_current_span(spans: InMemorySpanExporter) -> None:
    with tracing.server_span(api.SEND_EMAIL_SUBJECT, {}), tracing.span("smtp send"):
        pass

    (server,) = finished(spans, SERVER_SPAN)
    (child,) = finished(spans, "smtp send")
    assert server.context is not None
    assert child.parent is not None
    assert child.parent.span_id == server.context.span_id


def test_without_opentelemetry_nothing_is_imported_and_spans_are_no_ops() -> None:
    script = r"""
import importlib.abc, sys

attempts = []

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] == "opentelemetry":
            attempts.append(name)
            raise ModuleNotFoundError(name)
        return None

sys.meta_path.insert(0, NotInstalled())
from emailrelay import app, server, tracing

assert tracing.enabled is False
attempts.clear()
with tracing.server_span("s", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}) as span:
    assert span is None
    tracing.set_error(span, "internal error")
    with tracing.span("smtp send"):
        pass
sender = object()
assert tracing.traced_sender(sender) is sender
assert tracing.traced_tracking(None) is None
assert attempts == [], attempts
assert not [m for m in sys.modules if m.startswith("opentelemetry")]
print("no-op")
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no-op"


async def test_traced_sender_and_tracking_spans_are_children_of_the_request(
    spans: InMemorySpanExporter,
) -> None:
    class Sender:
        async def send(self, sender: str, recipient: str, message: bytes, deadline: Any) -> None:
            await trio.lowlevel.checkpoint()

    class Tracking:
        async def create_record(self, record: api.TrackingRecord) -> None:
            await trio.lowlevel.checkpoint()

        async def append_to_group(self, group_id: str, email_id: str) -> None:
            await trio.lowlevel.checkpoint()

    sender = tracing.traced_sender(Sender())
    tracking = tracing.traced_tracking(Tracking())
    assert tracking is not None
    record = api.TrackingRecord(
        group_id="g", email_id="e", to="a@b.example", subject="s", sent_at=datetime.now(UTC)
    )

    with tracing.server_span(api.SEND_EMAIL_SUBJECT, {}):
        await sender.send("a@b.example", "c@d.example", b"message", Deadline.never())
        await tracking.create_record(record)
        await tracking.append_to_group("g", "e")

    (server,) = finished(spans, SERVER_SPAN)
    assert server.context is not None
    children = [s for s in spans.get_finished_spans() if s.name in CHILD_SPANS]
    assert {child.name for child in children} == CHILD_SPANS
    for child in children:
        assert child.parent is not None
        assert child.parent.span_id == server.context.span_id


# --- end to end: a relay process exporting to the console ------------------


def printed_spans(stdout: str) -> list[dict[str, Any]]:
    """The spans ConsoleSpanExporter printed (one JSON object after another)."""
    decoder = json.JSONDecoder()
    spans, position = [], 0
    while True:
        start = stdout.find("{", position)
        if start < 0:
            return spans
        span, position = decoder.raw_decode(stdout, start)
        spans.append(span)


def test_relay_continues_the_callers_trace_with_smtp_and_kv_child_spans(
    relay_factory: RelayFactory, nats_client: SyncNats, smtp: SmtpServer
) -> None:
    relay = relay_factory({"OTEL_TRACES_EXPORTER": "console"})
    traceparent, trace_id, caller_span_id = new_traceparent()

    async def send() -> Any:
        return await nats_client.nc.request(
            api.SEND_EMAIL_SUBJECT,
            json.dumps(email()).encode(),
            timeout=10,
            headers={"traceparent": traceparent},
        )

    reply = nats_client.run(send())
    assert json.loads(reply.data)["email_id"]
    assert len(smtp.messages) == 1
    assert relay.stop() == 0  # shutting down flushes the last batch of spans

    spans = {span["name"]: span for span in printed_spans(relay.stdout())}
    server = spans[SERVER_SPAN]
    assert server["context"]["trace_id"] == f"0x{trace_id:032x}"
    assert server["parent_id"] == f"0x{caller_span_id:016x}"
    assert server["kind"] == "SpanKind.SERVER"
    for name in CHILD_SPANS:
        assert spans[name]["context"]["trace_id"] == server["context"]["trace_id"], name
        assert spans[name]["parent_id"] == server["context"]["span_id"], name
